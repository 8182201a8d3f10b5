"""Synthetic non-contrast head CT studies with exact voxel ground truth for the five ICH subtypes.

``generate_study(seed, options)`` is deterministic for a seed: every random choice comes from one
``numpy.random.Generator`` seeded with it. The in-memory result is a :class:`SyntheticStudy`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from triage.labels import LABELS, SUBTYPES
from triage.phantom import artefacts
from triage.phantom.anatomy import Head, HeadParams, build_head, compose
from triage.phantom.canvas import Canvas
from triage.phantom.geometry import F32, Geometry, upsample
from triage.phantom.hemorrhage import PAINTERS, SIZE_CLASSES, Lesion

KINDS = ("negative", "hard_negative_calcification", "hard_negative_artefact", "positive")
KIND_WEIGHTS = (0.25, 0.125, 0.125, 0.5)
SIZE_WEIGHTS = (0.15, 0.35, 0.30, 0.20)
SUBTYPE_WEIGHTS = {"epidural": 0.12, "intraparenchymal": 0.26, "intraventricular": 0.16,
                   "subarachnoid": 0.22, "subdural": 0.24}
MIN_LESION_ML = 0.03
"""A painted bleed with less blood-dense volume than this (30 mm3: a few voxels at 5 mm slices, below
what a reader reports or a labelled data set marks) is redrawn rather than kept as a positive."""


@dataclass
class PhantomOptions:
    """Knobs for :func:`generate_study`; ``None`` means "draw at random from the seed"."""

    size: int = 512  # rows = columns; pixel size scales so the field of view stays 205-256 mm
    kind: str | None = None  # one of KINDS
    subtypes: tuple[str, ...] | None = None  # force these subtypes (implies kind="positive")
    size_class: str | None = None  # tiny | small | medium | large, for every lesion
    slice_spacing: float | None = None  # mm (2.5-5)
    tilt_deg: float | None = None
    noise: float = 1.0  # multiplies the noise SD
    artefacts: float = 1.0  # multiplies streak / cupping strength (0 = none)
    calcifications: bool = True
    internal_size: int | None = None  # anatomy grid (default min(size, 256)); upsampled to ``size``
    min_atrophy: float = 0.0  # 0-1: lowest brain atrophy drawn (0 = the default age mix)
    bone_glare: float = 0.0  # HU of the glare band under the inner table (0 = none, the default)

    @classmethod
    def from_strings(cls, pairs: list[str] | dict[str, str]) -> PhantomOptions:
        """Parse ``key=value`` pairs (the CLI's ``--extra``); raise ValueError naming a bad key."""
        items = pairs.items() if isinstance(pairs, dict) else [p.split("=", 1) for p in pairs]
        kw: dict[str, Any] = {}
        names = {f.name: f for f in fields(cls)}
        for item in items:
            if len(item) != 2:
                raise ValueError(f"expected key=value, got {item!r}")
            key, raw = item[0].strip(), item[1].strip()
            if key not in names:
                raise ValueError(f"unknown phantom option {key!r} (known: {', '.join(names)})")
            if key == "subtypes":
                kw[key] = tuple(s.strip() for s in raw.split(",") if s.strip())
            elif key in ("size", "internal_size"):
                kw[key] = int(raw)
            elif key in ("slice_spacing", "tilt_deg", "noise", "artefacts", "min_atrophy", "bone_glare"):
                kw[key] = float(raw)
            elif key == "calcifications":
                kw[key] = raw.lower() in ("1", "true", "yes", "on")
            else:
                kw[key] = raw or None
        opts = cls(**kw)
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.size < 64 or self.size > 1024:
            raise ValueError("size must be 64-1024")
        if self.internal_size is not None and (self.internal_size < 64 or self.size % self.internal_size):
            raise ValueError("internal_size must divide size")
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        for s in self.subtypes or ():
            if s not in SUBTYPES:
                raise ValueError(f"unknown subtype {s!r} (known: {', '.join(SUBTYPES)})")
        if self.size_class is not None and self.size_class not in SIZE_CLASSES:
            raise ValueError(f"size_class must be one of {SIZE_CLASSES}")
        if self.slice_spacing is not None and not 0.5 <= self.slice_spacing <= 10:
            raise ValueError("slice_spacing must be 0.5-10 mm")
        if self.tilt_deg is not None and not 0 <= abs(self.tilt_deg) <= 30:
            raise ValueError("tilt_deg must be within +-30")
        if not 0.0 <= self.min_atrophy <= 1.0:
            raise ValueError("min_atrophy must be 0-1")
        if not 0.0 <= self.bone_glare <= 200.0:
            raise ValueError("bone_glare must be 0-200 HU")


@dataclass
class SyntheticStudy:
    """One generated head CT with its ground truth (see module docstring)."""

    seed: int
    hu: np.ndarray  # float32 (Z, Y, X), caudal -> cranial
    pixel_spacing: tuple[float, float]
    slice_spacing: float  # along the slice normal
    slice_thickness: float
    masks: dict[str, np.ndarray]  # subtype -> bool (Z, Y, X)
    brain_mask: np.ndarray
    slice_labels: np.ndarray  # uint8 (Z, 6), LABELS order
    exam_labels: np.ndarray  # uint8 (6,)
    volumes_ml: dict[str, float]
    kind: str
    meta: dict[str, Any]
    geometry: Geometry
    coarse_regions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _regions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def regions(self) -> dict[str, np.ndarray]:
        """Anatomical masks at output resolution (computed on first use): ``ventricles`` and
        ``csf_spaces`` (sulci, cisterns, fissures, the CSF over the convexity)."""
        if not self._regions:
            n = self.hu.shape[-1]
            for k, occ in self.coarse_regions.items():
                self._regions[k] = (upsample(occ, n) if occ.shape[-1] != n else occ) >= 0.5
        return self._regions

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing / 1000.0

    @property
    def positions(self) -> np.ndarray:
        return self.geometry.positions()

    @property
    def orientation(self) -> tuple[float, ...]:
        return tuple(float(x) for x in (*self.geometry.row_dir, *self.geometry.col_dir))

    @property
    def any_mask(self) -> np.ndarray:
        out = np.zeros(self.hu.shape, bool)
        for m in self.masks.values():
            out |= m
        return out


def _choose(rng: np.random.Generator, items: tuple[str, ...], weights: tuple[float, ...]) -> str:
    w = np.asarray(weights, dtype=float)
    return str(items[int(rng.choice(len(items), p=w / w.sum()))])


def _geometry(rng: np.random.Generator, p: HeadParams, opts: PhantomOptions) -> Geometry:
    n = opts.size
    outer_b = p.b + p.skull + p.scalp
    ps512 = max(float(rng.uniform(0.40, 0.50)), (2 * outer_b + 16) / 512)
    ps = ps512 * 512 / n
    ss = opts.slice_spacing or float(rng.choice([2.5, 3.0, 4.0, 5.0, 5.0, 5.0, 4.0]))
    tilt = opts.tilt_deg if opts.tilt_deg is not None else (0.0 if rng.random() < 0.6 else float(rng.uniform(8, 25)))
    t = math.radians(tilt)
    step = ss / math.cos(t)
    w_bottom = -float(rng.uniform(8, 20))
    w_top = p.zc + p.c_up + p.skull + p.scalp + float(rng.uniform(0, 6))
    nz = int(math.ceil((w_top - w_bottom) / step)) + 1
    fov = n * ps
    cx, cy = float(rng.normal(0, 5)), float(rng.normal(0, 5))
    center = (cx, cy, 0.0)
    # slice 0 passes through w_bottom at the head's centre row
    x0 = -fov / 2 + ps / 2
    y0 = -fov / 2 * math.cos(t) + ps / 2
    i_c = (cy - y0) / (ps * math.cos(t))
    z0 = w_bottom + i_c * ps * math.sin(t)
    return Geometry(
        n=n, nz=nz, pixel_spacing=ps, table_step=step, slice_thickness=ss, tilt_deg=tilt,
        yaw_deg=float(rng.normal(0, 4)), roll_deg=float(rng.normal(0, 2)),
        origin=(x0, y0, z0), center=center,
    )


def generate_study(seed: int, options: PhantomOptions | None = None) -> SyntheticStudy:
    """Generate one study; same seed and options give the same arrays.

    A positive study is drawn again (from a generator seeded with ``[seed, attempt]``) when one of
    its bleeds ends up under :data:`MIN_LESION_ML` in the truth, which happens when the bone-spill
    rule takes most of a thin bleed against the inner table: blood that no mask marks would teach a
    model that visible blood can be negative.
    """
    opts = options or PhantomOptions()
    opts.validate()
    study = _generate(seed, opts, np.random.default_rng(seed))
    for attempt in range(1, 6):
        if not _has_faint_bleed(study):
            break
        study = _generate(seed, opts, np.random.default_rng([seed, attempt]))
        study.meta["attempt"] = attempt
    return study


def _has_faint_bleed(study: SyntheticStudy) -> bool:
    painted = {les["subtype"] for les in study.meta["lesions"]}
    return any(study.volumes_ml[s] < MIN_LESION_ML for s in painted)


def _generate(seed: int, opts: PhantomOptions, rng: np.random.Generator) -> SyntheticStudy:
    kind = opts.kind or ("positive" if opts.subtypes else _choose(rng, KINDS, KIND_WEIGHTS))
    p = HeadParams.sample(rng, opts.min_atrophy)
    fine = _geometry(rng, p, opts)
    factor = opts.size // (opts.internal_size or min(opts.size, 256))
    geo = fine.coarsened(factor)
    cv = Canvas.from_geometry(geo)
    head = build_head(cv, p, rng)
    brain = head.brain  # painted in place from here on

    # --- hemorrhage
    lesions: list[Lesion] = []
    if kind == "positive":
        if opts.subtypes:
            chosen = list(opts.subtypes)
        else:
            k = int(rng.choice([1, 1, 1, 2, 2, 3]))
            names = list(SUBTYPE_WEIGHTS)
            w = np.array([SUBTYPE_WEIGHTS[s] for s in names])
            chosen = [names[i] for i in rng.choice(len(names), size=k, replace=False, p=w / w.sum())]
        min_voxels = MIN_LESION_ML * 1000.0 / (geo.pixel_spacing**2 * geo.slice_spacing)
        for sub in chosen:
            for _attempt in range(6):
                size = opts.size_class or _choose(rng, SIZE_CLASSES, SIZE_WEIGHTS)
                les = PAINTERS[sub](head, rng, size)
                if les is not None and float((les.frac * head.f_ic[les.sl] >= 0.5).sum()) >= min_voxels:
                    les.info["size_class"] = size
                    lesions.append(les)
                    break
    # oedema first, then calcifications (never under blood), then blood
    for les in lesions:
        if les.edema is not None:
            brain[les.sl] -= les.edema
    calcs: list[dict] = []
    if opts.calcifications:
        calcs = artefacts.calcifications(head, brain, rng, hard=kind == "hard_negative_calcification")
    frac = {s: np.zeros(cv.shape, F32) for s in SUBTYPES}
    for les in lesions:
        np.maximum(frac[les.subtype][les.sl], les.frac, out=frac[les.subtype][les.sl])
    total = np.zeros(cv.shape, F32)
    blood_hu = np.zeros(cv.shape, F32)
    for les in lesions:
        t, b = total[les.sl], blood_hu[les.sl]
        better = les.frac > t
        b[better] = F32(les.hu)
        np.maximum(t, les.frac, out=t)
    if lesions:
        grain = F32(2.5) * head.sulci_field  # slight heterogeneity inside clots
        brain += total * (blood_hu + grain - brain)

    # --- bone, scalp, air; artefacts; reconstruction
    hu = compose(head, brain, rng)
    strength = opts.artefacts * (2.0 if kind == "hard_negative_artefact" else float(rng.uniform(0.3, 1.0)))
    art: dict[str, Any] = {}
    if strength > 0:
        art.update(artefacts.streaks(head, hu, rng, strength))
        art.update(artefacts.cupping_and_pseudo_enhancement(head, hu, rng, strength))
    if opts.bone_glare > 0:  # drawn only when asked for: the default stream stays as it was
        art.update(artefacts.bone_glare(head, hu, rng, opts.bone_glare))
    if rng.random() < 0.5:
        artefacts.head_holder(head, hu, rng)
        art["head_holder"] = True
    # how much the kernel blur carries bone / calcium into each voxel (computed on the anatomy grid):
    # blood voxels next to the inner table that read > +20 HU from that spill do not show blood
    # density and are left out of the masks
    spill = artefacts.blur(np.maximum(hu - F32(150.0), F32(0.0)), geo.pixel_spacing) if lesions else None

    # --- to the output grid, then the reconstruction kernel and noise there
    f_ic = head.f_ic
    if factor > 1:
        hu = upsample(hu, fine.n)
        f_ic = upsample(f_ic, fine.n)
        frac = {s: (upsample(frac[s], fine.n) if frac[s].any() else None) for s in SUBTYPES}
        spill = upsample(spill, fine.n) if spill is not None else None
    noise_sd = opts.noise * float(rng.uniform(2.2, 4.2)) * math.sqrt(5.0 / fine.slice_thickness)
    if kind == "hard_negative_artefact":
        noise_sd *= 1.4
    artefacts.reconstruct(hu, fine.pixel_spacing, fine.slice_thickness, rng, noise_sd)
    np.clip(np.rint(hu, out=hu), -1024, 3071, out=hu)

    # --- ground truth: a voxel is blood when at least half of it is blood
    shape = hu.shape
    masks = {s: (frac[s] * f_ic >= 0.5) if frac[s] is not None else np.zeros(shape, bool) for s in SUBTYPES}
    spill_excluded = 0
    if spill is not None:
        clean = spill < 20.0
        for s in SUBTYPES:
            before = int(masks[s].sum())
            masks[s] &= clean
            spill_excluded += before - int(masks[s].sum())
    any_mask = np.zeros(shape, bool)
    for m in masks.values():
        any_mask |= m
    slice_labels = np.zeros((fine.nz, len(LABELS)), np.uint8)
    slice_labels[:, 0] = any_mask.any(axis=(1, 2))
    for i, s in enumerate(SUBTYPES, start=1):
        slice_labels[:, i] = masks[s].any(axis=(1, 2))
    exam_labels = slice_labels.max(axis=0).astype(np.uint8)
    vox_ml = fine.pixel_spacing**2 * fine.slice_spacing / 1000.0
    volumes = {"any": float(any_mask.sum()) * vox_ml}
    volumes.update({s: float(masks[s].sum()) * vox_ml for s in SUBTYPES})
    if kind == "positive" and not exam_labels[0]:
        kind = "negative"  # every painter missed the volume (cannot normally happen)
    meta = {
        "generator": "triage.phantom", "version": 2, "seed": seed, "kind": kind,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "head": {k: round(v, 2) for k, v in asdict(p).items()},
        "geometry": {"size": fine.n, "internal_size": geo.n, "slices": fine.nz,
                     "pixel_spacing_mm": round(fine.pixel_spacing, 4), "slice_spacing_mm": round(fine.slice_spacing, 3),
                     "slice_thickness_mm": fine.slice_thickness, "tilt_deg": round(fine.tilt_deg, 2),
                     "yaw_deg": round(fine.yaw_deg, 2), "roll_deg": round(fine.roll_deg, 2)},
        "lesions": [{"subtype": les.subtype, "hu": round(les.hu, 1), **_jsonable(les.info)} for les in lesions],
        "subtypes": [s for s in SUBTYPES if exam_labels[LABELS.index(s)]],
        "calcifications": calcs,
        "artefacts": {**art, "noise_sd_hu": round(noise_sd, 2)},
        "mask_voxels_excluded_for_bone_spill": spill_excluded,
    }
    regions = {"ventricles": head.ventricles, "csf_spaces": head.csf_spaces}
    return SyntheticStudy(
        seed=seed, hu=hu, pixel_spacing=(fine.pixel_spacing, fine.pixel_spacing), slice_spacing=fine.slice_spacing,
        slice_thickness=fine.slice_thickness, masks=masks, brain_mask=f_ic >= 0.5, slice_labels=slice_labels,
        exam_labels=exam_labels, volumes_ml=volumes, kind=kind, meta=meta, geometry=fine, coarse_regions=regions,
    )


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, tuple | list):
            out[k] = [round(float(x), 2) if isinstance(x, int | float) else x for x in v]
        elif isinstance(v, float):
            out[k] = round(v, 2)
        else:
            out[k] = v
    return out


__all__ = ["PhantomOptions", "SyntheticStudy", "generate_study", "KINDS", "Head"]
