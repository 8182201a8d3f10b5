"""Training data of the ``brain_window`` model: real slice sets, phantom studies and real bleed
shapes pasted into real blood-free slices, all on one network grid through one preprocessing.

Every exam goes through :func:`~triage.models.preprocess.prepare` (``input="brain_window"``), the
function the node runs on DICOM, so training and inference see the same input. What each source
labels is kept apart from what it does not:

* slice labels: a (6,) "known" flag per slice (phe-sich labels "any" only; its subtypes are not
  targets, except on slices without blood, where every subtype is known absent);
* segmentation: ``seg_known`` per slice (the subtype masks are complete), ``unknown`` pixels inside
  a known slice (blood of unknown subtype, the inside of a box) that no subtype channel is scored
  on, and boxes (weak localisation: the most probable pixel of each box should be blood; outside
  every box, nothing is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from triage.labels import LABELS, SUBTYPES
from triage.logging import get_logger
from triage.models.preprocess import PreprocessConfig, key_slice_input, pixels_to_hu, prepare, to_network_grid
from triage.models.train import random_affine

log = get_logger(__name__)


@dataclass
class GridSlice:
    """Targets of one slice on the network grid (None = all zero / none)."""

    labels: np.ndarray  # float32 (6,)
    label_known: np.ndarray  # bool (6,)
    seg_known: bool
    target: np.ndarray | None = None  # uint8 (5, S, S) area fraction * 255
    unknown: np.ndarray | None = None  # bool (S, S): no subtype loss here
    any_blood: np.ndarray | None = None  # bool (S, S): blood of unknown subtype
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # y0, y1, x0, x1 on the grid

    @property
    def has_blood_pixels(self) -> bool:
        """Pixel truth of blood: a drawn mask (or a pseudo-mask), of a known subtype or not."""
        return self.target is not None or self.any_blood is not None


@dataclass
class GridExam:
    key: str
    source: str  # "real", "phantom"
    windows: np.ndarray  # uint8 (Z, 1, S, S)
    head: np.ndarray  # bool (Z, S, S)
    slices: list[GridSlice]
    exam_labels: np.ndarray  # float32 (6,), NaN unknown
    window_known: bool = True
    meta: dict = field(default_factory=dict)


def _grid_box(box: tuple[float, float, float, float], crop: tuple[int, int, int, int],
              size: int) -> tuple[int, int, int, int]:
    """An image box ``x0 y0 x1 y1`` -> (y0, y1, x0, x1) on the network grid of a head crop."""
    x0, y0, x1, y1 = box
    cy0, cy1, cx0, cx1 = crop
    sy, sx = size / (cy1 - cy0), size / (cx1 - cx0)
    gy0 = int(np.clip(math.floor((y0 - cy0) * sy), 0, size - 1))
    gx0 = int(np.clip(math.floor((x0 - cx0) * sx), 0, size - 1))
    gy1 = int(np.clip(math.ceil((y1 - cy0) * sy), gy0 + 1, size))
    gx1 = int(np.clip(math.ceil((x1 - cx0) * sx), gx0 + 1, size))
    return gy0, gy1, gx0, gx1


def grid_exam_from_slices(exam, cfg: PreprocessConfig, set_name: str = "") -> GridExam:  # noqa: ANN001 - a SliceExam
    """A slice-set exam (:class:`~triage.datasets.slices.SliceExam`) on the network grid."""
    from triage.datasets.slices import ASSUMED_PIXEL_MM, exam_masks

    prep = prepare(exam.hu, (ASSUMED_PIXEL_MM, ASSUMED_PIXEL_MM), cfg)
    size = cfg.size
    masks = exam_masks(exam)
    grids = {k: to_network_grid(v, prep.box, size) for k, v in masks.items() if v.any()}
    out = []
    for z in range(exam.pixels.shape[0]):
        lab = exam.labels[z].copy()
        known = ~np.isnan(lab)
        if known[0] and lab[0] == 0:  # no blood: every subtype is known absent
            lab[1:], known[1:] = 0.0, True
        lab = np.nan_to_num(lab, nan=0.0).astype(np.float32)
        gs = GridSlice(lab, known, seg_known=False)
        if exam.mask_known[z]:
            gs.seg_known = True
            tgt = np.zeros((len(SUBTYPES), size, size), np.float32)
            for k, sub in enumerate(SUBTYPES):
                if sub in grids:
                    tgt[k] = grids[sub][z]
            if tgt.any():
                gs.target = np.round(tgt * 255).astype(np.uint8)
            if "any" in grids:
                blood = grids["any"][z] > 0.5
                sub_blood = tgt.max(axis=0) > 0.25
                unknown_blood = blood & ~sub_blood
                if unknown_blood.any():
                    gs.any_blood = unknown_blood
                    gs.unknown = ndimage.binary_dilation(unknown_blood, iterations=1)
        elif known[0] and lab[0] == 0:
            gs.seg_known = True  # a slice without blood: every mask is known empty
        elif exam.boxes[z]:
            gs.seg_known = True  # outside the boxes nothing; inside, the box loss
            gs.boxes = [_grid_box(b, prep.box, size) for b in exam.boxes[z]]
            unknown = np.zeros((size, size), bool)
            for y0, y1, x0, x1 in gs.boxes:
                unknown[y0:y1, x0:x1] = True
            gs.unknown = unknown
        out.append(gs)
    ex_lab = np.array([np.nanmax(exam.labels[:, i]) if (~np.isnan(exam.labels[:, i])).any() else np.nan
                       for i in range(len(LABELS))], np.float32)
    return GridExam(exam.id, "real", prep.windows, prep.brain_small, out, ex_lab, exam.window_known,
                    {"study": exam.study, "set": set_name})


def grid_exam_from_study(study, cfg: PreprocessConfig) -> GridExam:  # noqa: ANN001 - a data.Study
    """A phantom (full voxel truth) study on the network grid."""
    prep = prepare(study.hu, study.pixel_spacing, cfg)
    size = cfg.size
    z = study.hu.shape[0]
    tgt = np.zeros((z, len(SUBTYPES), size, size), np.float32)
    for k, sub in enumerate(SUBTYPES):
        m = study.masks.get(sub)
        if m is not None and m.any():
            tgt[:, k] = to_network_grid(m, prep.box, size)
    out = []
    for zi in range(z):
        gs = GridSlice(np.asarray(study.slice_labels[zi], np.float32), np.ones(len(LABELS), bool), True)
        if tgt[zi].any():
            gs.target = np.round(tgt[zi] * 255).astype(np.uint8)
        out.append(gs)
    return GridExam(f"phantom:{study.key}", "phantom", prep.windows, prep.brain_small, out,
                    np.asarray(study.exam_labels, np.float32), True, {"kind": study.kind})


# --- real bleed shapes pasted into blood-free real slices ----------------------------------------

SHAPE_MIN_PIXELS = 40  # of a 0.49 mm slice: smaller cross-sections are partial-volume specks
BLOOD_HU = (55.0, 85.0)
# the window augmentation's width range, HU: slices published in a wider window than the assumed
# 40/80 (phe-sich's) reach the contrast of the node's own 40/80 window only at the range's low end
WINDOW_WIDTHS = (60.0, 130.0)


def load_shapes(root: str | Path, limit: int = 0) -> list[tuple[str, np.ndarray]]:
    """(subtype, bool (Y, X) cross-section cropped to its extent) from the bleed-shape NIfTI masks,
    each mask's slices with at least :data:`SHAPE_MIN_PIXELS` pixels (at 0.49 mm)."""
    import csv

    import nibabel as nib

    root = Path(root)
    kinds = {}
    with (root / "shapes.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            kinds[r["file"]] = r["subtype"]
    out = []
    for i, (name, sub) in enumerate(sorted(kinds.items())):
        if limit and i >= limit:
            break
        if sub not in SUBTYPES:
            continue
        vol = np.asarray(nib.load(str(root / name)).dataobj) > 0  # (X, Y, Z) NIfTI order
        for z in range(vol.shape[2]):
            m = vol[:, :, z].T
            if m.sum() < SHAPE_MIN_PIXELS:
                continue
            ys, xs = np.nonzero(m)
            out.append((sub, m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy()))
    return out


MIN_CAVITY_PX = 400  # a skull cavity smaller than this on the grid is not taken as a closed skull


def _skull_cavity(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cavity, tissue) of one brain-window slice (float (S, S), 0-255): the inside of the closed
    saturated bone ring, and its brain or CSF pixels (not air, not bone) two pixels in."""
    bone = ndimage.binary_closing(img >= 250, iterations=3)
    cavity = ndimage.binary_fill_holes(bone) & ~bone
    return cavity, ndimage.binary_erosion(cavity & (img > 8) & (img < 235), iterations=2)


def _arc_offset(cavity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per pixel, its angle seen from the cavity's centre less a random direction, wrapped to
    (-pi, pi]: ``abs(off) < half`` is an arc of the skull of ``2 * half`` radians."""
    ys, xs = np.nonzero(cavity)
    yy, xx = np.indices(cavity.shape)
    angle = np.arctan2(yy - ys.mean(), xx - xs.mean())
    return np.angle(np.exp(1j * (angle - rng.uniform(-np.pi, np.pi))))


def _blend_blood(img: np.ndarray, m: np.ndarray, tissue: np.ndarray, rng: np.random.Generator,
                 hu_range: tuple[float, float], window_setting: tuple[float, float]) -> np.ndarray:
    """``img`` (float, 0-255) with acute blood painted where the soft mask ``m`` (same shape) is: a
    density drawn from ``hu_range`` (in the window), the slice's own noise and a partial-volume edge."""
    c, wd = window_setting
    level = (rng.uniform(*hu_range) - (c - wd / 2)) / wd * 255.0
    noise_sd = float(np.std(img[tissue] - ndimage.uniform_filter(img, 3)[tissue])) if tissue.any() else 3.0
    out = img.copy()
    ys, xs = np.nonzero(m > 0)
    if not len(ys):
        return np.round(out.clip(0, 255)).astype(np.uint8)
    # only the mask's box (with room for the soft edge) changes: noise and blur are drawn there alone
    box = (slice(max(0, ys.min() - 3), ys.max() + 4), slice(max(0, xs.min() - 3), xs.max() + 4))
    soft = ndimage.gaussian_filter(m[box].astype(np.float32), 0.6).clip(0, 1)
    blood = level + rng.normal(0, max(noise_sd, 1.0), soft.shape)
    out[box] = img[box] * (1 - soft) + blood * soft
    return np.round(out.clip(0, 255)).astype(np.uint8)


def paste_crescent(windows: np.ndarray, z: int, grid_px_mm: float, rng: np.random.Generator,
                   hu_range: tuple[float, float] = BLOOD_HU, window_setting: tuple[float, float] = (40.0, 80.0)
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """Paint a thin extra-axial collection (subdural-like crescent) along the inner table of slice
    ``z`` of a blood-free exam (uint8 (Z, 1, S, S)): the band of the skull cavity within a lens-shaped
    depth (thickest mid-arc: 1-7 mm, over an arc of 30-100 degrees) of the bone, on brain or CSF.
    The bleed-shape set holds intraparenchymal and intraventricular shapes only; thin collections at
    the brain's edge, which real sets show and the detector misses most, get real anatomy this way.
    Returns (new windows of slice ``z`` (1, S, S), mask (S, S)) or None when the slice has no closed
    skull."""
    img = windows[z, 0].astype(np.float32)
    cavity, tissue = _skull_cavity(img)
    if cavity.sum() < MIN_CAVITY_PX:
        return None
    depth = ndimage.distance_transform_edt(cavity) * grid_px_mm  # mm from the inner table
    off = _arc_offset(cavity, rng)
    half = np.deg2rad(rng.uniform(15, 50))
    thick = rng.uniform(1.0, 7.0) * np.cos(np.clip(off / half, -1, 1) * np.pi / 2)
    m = cavity & (np.abs(off) < half) & (depth <= thick) & (img > 8) & (img < 235)
    if m.sum() < 6:
        return None
    mask = m.astype(np.float32)
    return _blend_blood(img, mask, tissue, rng, hu_range, window_setting)[None], mask


SINUS_ABOVE_BRAIN = (12.0, 24.0)  # HU over the slice's median brain: flowing venous blood reads 45-62 HU


def paste_sinus(windows: np.ndarray, z: int, grid_px_mm: float, rng: np.random.Generator,
                above: tuple[float, float] = SINUS_ABOVE_BRAIN, window_setting: tuple[float, float] = (40.0, 80.0)
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """A dural venous sinus made conspicuous on slice ``z`` of a blood-free exam (uint8 (Z, 1, S, S)):
    *not* a bleed, a mimic, ``above`` HU denser than the slice's median brain (read through
    ``window_setting``; publishers' windows differ, so not an absolute HU).

    Normal sinus blood reads 45-62 HU, and in the node's 40/80 window the superior sagittal sinus (a
    triangle on the midline against the inner table, its base 6-10 mm) and the transverse sinuses (a
    band 4-8 mm deep along the posterolateral table) look like blood; on the real normal CT the
    transverse sinus backed a more sensitive fine-tune's false call. The midline is the cavity's
    long axis (heads are longer front to back), either end. Returns (new windows of slice ``z``
    (1, S, S), mask (S, S)) or None without a closed skull."""
    img = windows[z, 0].astype(np.float32)
    cavity, tissue = _skull_cavity(img)
    if cavity.sum() < MIN_CAVITY_PX or not tissue.any():
        return None
    ys, xs = np.nonzero(cavity)
    centre = np.array([ys.mean(), xs.mean()])
    pts = np.stack([ys, xs], 1) - centre
    axis = np.linalg.eigh(pts.T @ pts)[1][:, -1] * (1 if rng.random() < 0.5 else -1)  # toward one end
    ends = pts @ axis
    reach = float(ends.max())  # the inner table on the midline, from the centre (pixels)
    yy, xx = np.indices(cavity.shape)
    rel = np.stack([yy - centre[0], xx - centre[1]], -1)
    along, across = rel @ axis, rel @ np.array([-axis[1], axis[0]])
    if rng.random() < 0.6:  # superior sagittal sinus: a triangle pointing inward from the table
        half = rng.uniform(3.0, 5.0) / grid_px_mm
        height = rng.uniform(6.0, 10.0) / grid_px_mm
        t = (reach - along) / height  # 0 at the table, 1 at the apex
        m = cavity & (t >= 0) & (t <= 1) & (np.abs(across) <= half * (1 - t))
    else:  # a transverse sinus: a band along the table, 25-60 degrees off the midline, either side
        depth = ndimage.distance_transform_edt(cavity) * grid_px_mm
        angle = np.arctan2(across, along) - rng.choice([-1, 1]) * np.deg2rad(rng.uniform(25, 60))
        off = np.angle(np.exp(1j * angle))
        half_arc = np.deg2rad(rng.uniform(10, 20))
        m = cavity & (np.abs(off) < half_arc) & (depth <= rng.uniform(4.0, 8.0))
    m &= (img > 8) & (img < 235)
    if m.sum() < 6:
        return None
    brain = float(pixels_to_hu(np.median(img[tissue]), window_setting))
    mask = m.astype(np.float32)
    return _blend_blood(img, mask, tissue, rng, (brain + above[0], brain + above[1]), window_setting)[None], mask


CSF_BLOOD_HU = (45.0, 70.0)  # blood mixed with CSF reads lower than a clot
CSF_BELOW_BRAIN = 11.0  # HU under the slice's median brain: CSF (sulci, cisterns, ventricles) and its partial volume


def paste_csf(windows: np.ndarray, z: int, grid_px_mm: float, rng: np.random.Generator, subtype: str,
              hu_range: tuple[float, float] = CSF_BLOOD_HU, window_setting: tuple[float, float] = (40.0, 80.0)
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """Blood in the slice's own CSF spaces (slice ``z`` of a blood-free exam, uint8 (Z, 1, S, S)).

    ``subarachnoid``: the CSF of the sulci within 4-20 mm of the inner table over an arc of 40-140
    degrees, or of a deep cistern (the CSF within 8-18 mm of a point more than 25 mm in); blood
    takes the shape of the patient's own sulci and cisterns. ``intraventricular``: the dependent
    part of a deep CSF space of at least 25 mm² (a ventricle) beyond a blood-CSF level, as blood
    layers in the occipital horns of a patient lying supine. At least 10 mm² of blood, at
    :data:`CSF_BLOOD_HU` (blood mixed with CSF). phe-sich's real positives are
    spontaneous intraparenchymal bleeds and the bleed-shape set has IPH / IVH shapes only, so this is
    where subarachnoid blood meets real anatomy. Returns (new windows of slice ``z`` (1, S, S), mask
    (S, S)) or None when the slice shows too little CSF there."""
    img = windows[z, 0].astype(np.float32)
    cavity, tissue = _skull_cavity(img)
    if cavity.sum() < MIN_CAVITY_PX or tissue.sum() < 100:
        return None
    # CSF: clearly darker than the slice's brain (publishers' windows differ, so not an absolute HU)
    csf_level = float(np.median(img[tissue])) - CSF_BELOW_BRAIN / window_setting[1] * 255.0
    smooth = ndimage.gaussian_filter(img, 0.7)
    csf = ndimage.binary_erosion(cavity, iterations=2) & (smooth < csf_level) & (smooth > 8)  # not air
    csf = ndimage.binary_opening(csf, np.ones((2, 1))) | ndimage.binary_opening(csf, np.ones((1, 2)))  # no lone pixels
    depth = ndimage.distance_transform_edt(cavity) * grid_px_mm  # mm from the inner table
    if subtype == "intraventricular":
        lab, n = ndimage.label(csf & (depth > 20.0))
        if not n:
            return None
        sizes = ndimage.sum_labels(np.ones_like(img), lab, index=np.arange(1, n + 1)) * grid_px_mm**2
        big = np.nonzero(sizes >= 25.0)[0] + 1
        if not len(big):
            return None
        comp = lab == int(rng.choice(big))
        # blood settles on the dependent side below a level; slices are stored face-up or face-left,
        # so the side is drawn
        axis, sign = int(rng.integers(2)), float(rng.choice([-1.0, 1.0]))
        along = sign * np.nonzero(comp)[axis]
        level = np.quantile(along, rng.uniform(0.3, 0.85))
        m = np.zeros_like(comp)
        m[tuple(ix[along >= level] for ix in np.nonzero(comp))] = True
    elif rng.random() < 0.7:  # sulcal: a cortical sector
        off = _arc_offset(cavity, rng)
        m = csf & (np.abs(off) < np.deg2rad(rng.uniform(20, 70))) & (depth >= 1.0) & (depth <= rng.uniform(4, 20))
    else:  # cisternal: deep CSF around a point far from the table
        deep = np.argwhere(csf & (depth > 25.0))
        if not len(deep):
            return None
        cy, cx = deep[int(rng.integers(len(deep)))]
        yy, xx = np.ogrid[: img.shape[0], : img.shape[1]]
        m = csf & ((yy - cy) ** 2 + (xx - cx) ** 2 <= (rng.uniform(8, 18) / grid_px_mm) ** 2)
    if m.sum() * grid_px_mm**2 < 10.0:  # specks: too like a calcification or noise to call blood
        return None
    mask = m.astype(np.float32)
    return _blend_blood(img, mask, tissue, rng, hu_range, window_setting)[None], mask


def paste_shape(windows: np.ndarray, z: int, shape: np.ndarray, subtype: str, grid_px_mm: float,
                rng: np.random.Generator, window_setting: tuple[float, float] = (40.0, 80.0),
                hu_range: tuple[float, float] = BLOOD_HU) -> tuple[np.ndarray, np.ndarray] | None:
    """Paste one real bleed cross-section into slice ``z`` of a blood-free exam (uint8 (Z, 1, S, S)).

    The shape is scaled from 0.49 mm pixels to the grid, rotated and flipped at random, and placed
    where every pixel lies inside the head on brain or CSF (not air, not bone); its density is
    acute blood (:data:`BLOOD_HU`, in the exam's window) with the slice's own noise and a
    partial-volume edge. Returns (new windows of slice ``z`` (1, S, S), soft mask (S, S)) or None
    when no place fits."""
    size = windows.shape[-1]
    scale = 0.49 / grid_px_mm * rng.uniform(0.8, 1.25)
    m = ndimage.rotate(shape.astype(np.float32), rng.uniform(0, 360), order=1, reshape=True)
    m = ndimage.zoom(m, scale, order=1)
    if rng.random() < 0.5:
        m = m[:, ::-1]
    if m.shape[0] < 2 or m.shape[1] < 2 or max(m.shape) > size // 2:
        return None
    img = windows[z, 0].astype(np.float32)
    _, tissue = _skull_cavity(img)  # inside the skull only, on brain or CSF
    hard = m > 0.5
    h, w = m.shape
    ys, xs = np.nonzero(tissue[: size - h, : size - w])
    if not len(ys):
        return None
    for _ in range(12):
        i = int(rng.integers(len(ys)))
        y0, x0 = int(ys[i]), int(xs[i])
        if tissue[y0 : y0 + h, x0 : x0 + w][hard].all():
            break
    else:
        return None
    mask = np.zeros((size, size), np.float32)
    mask[y0 : y0 + h, x0 : x0 + w] = m.clip(0, 1)
    return _blend_blood(img, mask, tissue, rng, hu_range, window_setting)[None], mask


def _cavity_box(cavity: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(cavity)
    return float(ys.min()), float(ys.max() + 1), float(xs.min()), float(xs.max() + 1)


def transplant_blood(windows: np.ndarray, z: int, donor: GridExam, dz: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None] | None:
    """Move the drawn blood of a donor slice (another source's slice with a blood mask) into slice
    ``z`` of a blood-free exam (uint8 (Z, 1, S, S)): the donor's skull cavity is mapped onto the
    recipient's (their boxes matched, mirrored at random), the donor's blood pixels (their texture and
    their contrast to the donor's brain, scaled to the recipient's window and set on its brain level)
    are blended in over a soft edge, and only what falls inside the recipient's cavity is kept.

    The masked sets publish bleeding slices only, so a model shown them whole can learn their look
    (scanner, window, anatomy) as a cue for blood; moved into another source's blood-free anatomy,
    their real subdural, subarachnoid and ventricular blood is taught without that shortcut.
    Returns (new windows of slice ``z`` (1, S, S), subtype targets (5, S, S) in 0..1, blood of unknown
    subtype (S, S) bool or None, the donor's unknown-subtype zone (S, S) bool or None), or None when
    a cavity is not closed or too little blood lands inside."""
    ds = donor.slices[dz]
    rimg = windows[z, 0].astype(np.float32)
    dimg = donor.windows[dz, 0].astype(np.float32)
    r_cav, r_tissue = _skull_cavity(rimg)
    d_cav, d_tissue = _skull_cavity(dimg)
    if min(r_cav.sum(), d_cav.sum()) < MIN_CAVITY_PX or not (r_tissue.any() and d_tissue.any()):
        return None
    size = rimg.shape[0]
    maps = [np.zeros((size, size), np.float32) if ds.target is None else ds.target[k] / 255.0
            for k in range(len(SUBTYPES))]
    maps.append(np.zeros((size, size), np.float32) if ds.any_blood is None else ds.any_blood.astype(np.float32))
    maps.append(np.zeros((size, size), np.float32) if ds.unknown is None else ds.unknown.astype(np.float32))
    if max(float(m.max()) for m in maps[:-1]) <= 0.5:
        return None
    ry0, ry1, rx0, rx1 = _cavity_box(r_cav)
    dy0, dy1, dx0, dx1 = _cavity_box(d_cav)
    sy, sx = (dy1 - dy0) / (ry1 - ry0), (dx1 - dx0) / (rx1 - rx0)  # donor pixels per recipient pixel
    if rng.random() < 0.5:  # mirrored left-right: x counts back from the donor box's far side
        matrix, offset = np.diag([sy, -sx]), np.array([dy0 - ry0 * sy, dx1 - 1 + rx0 * sx])
    else:
        matrix, offset = np.diag([sy, sx]), np.array([dy0 - ry0 * sy, dx0 - rx0 * sx])
    moved = [ndimage.affine_transform(m, matrix, offset, order=1, mode="constant") for m in [dimg, *maps]]
    dimg_t, sub_t, anyb_t, unk_t = moved[0], np.stack(moved[1:6]), moved[6], moved[7]
    blood = np.maximum(sub_t.max(axis=0), anyb_t)
    inside = blood * r_cav
    if inside.sum() < 6 or inside.sum() < 0.6 * blood.sum():
        return None
    # the donor's blood keeps its contrast to the donor's brain, scaled to the recipient's window:
    # publishers' windows differ, and blood brighter against its brain than the recipient's own
    # anatomy would teach contrast, not blood (the spread of brain and CSF levels gauges the window)
    r_mid, d_mid = float(np.median(rimg[r_tissue])), float(np.median(dimg[d_tissue]))
    r_iqr, d_iqr = (float(np.subtract(*np.percentile(v, [75, 25]))) for v in (rimg[r_tissue], dimg[d_tissue]))
    gain = float(np.clip(r_iqr / max(d_iqr, 1.0), 0.4, 1.5))
    soft = np.maximum(ndimage.gaussian_filter(inside, 0.6), inside).clip(0, 1)
    out = rimg * (1 - soft) + (r_mid + (dimg_t - d_mid) * gain) * soft
    anyb = (anyb_t * r_cav) > 0.5
    unk = (unk_t > 0.5) & r_cav
    return (np.round(out.clip(0, 255)).astype(np.uint8)[None], sub_t * r_cav,
            anyb if anyb.any() else None, unk if unk.any() else None)


def erase_blood(windows: np.ndarray, z: int, blood: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A counterfactual negative: slice ``z`` (uint8 (Z, C, S, S) with neighbours) with its drawn
    blood (bool (S, S) on the grid) replaced by the tissue around it.

    The blood, dilated by two pixels (edge partial volume), is filled with the median of a ring of
    brain-density pixels around it (not bone, not air) plus that ring's own fine-grained noise,
    blended over a soft edge. The same anatomy, scanner and window without the bleed, so that the
    look of a source whose published slices all bleed (masked sets publish positives only) does not
    become a cue for blood. Returns the new channels (C, S, S) or None when no ring tissue is found."""
    img = windows[z].astype(np.float32)
    core = ndimage.binary_dilation(blood, iterations=2)
    ring = ndimage.binary_dilation(core, iterations=6) & ~core
    ref = img[0]
    tissue = ring & (ref > 30) & (ref < 200)  # brain and CSF levels of a brain window, not bone or air
    if tissue.sum() < 20:
        return None
    level = float(np.median(ref[tissue]))
    noise_sd = float(np.std(ref[tissue] - ndimage.uniform_filter(ref, 3)[tissue]))
    fill = level + rng.normal(0, max(noise_sd, 1.0), ref.shape)
    soft = ndimage.gaussian_filter(core.astype(np.float32), 1.0).clip(0, 1)
    soft = np.maximum(soft, core)
    out = img * (1 - soft) + fill[None] * soft
    return np.round(out.clip(0, 255)).astype(np.uint8)


# --- robustness augmentation ---------------------------------------------------------------------


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of each channel of one (C, S, S) image in [0, 1]."""
    import io

    from PIL import Image

    out = []
    for ch in x:
        buf = io.BytesIO()
        Image.fromarray((ch.numpy() * 255).round().astype(np.uint8)).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buf), np.float32) / 255.0))
    return torch.stack(out)


RIM_RISE_HU = (5.0, 20.0)  # how much denser the brain reads at the inner table
RIM_DECAY_MM = (3.0, 10.0)  # over what depth the rise fades


def peripheral_rise(img: np.ndarray, rng: np.random.Generator, grid_px_mm: float) -> np.ndarray:
    """(S, S) HU to add to a slice (``img``: its brain window, 0-255): inside the skull cavity, a
    density rise that fades with the distance from the inner table (:data:`RIM_RISE_HU` at the bone,
    decaying over :data:`RIM_DECAY_MM`). Scanners and reconstructions differ in how far they correct
    beam hardening, and under-corrected brain reads denser near the skull (the real normal CT here
    reads 46-51 HU 3-10 mm from the bone); with no label change, it teaches that a smooth density
    rise at the brain's edge is not blood. Zero where no closed skull is found."""
    cavity, _ = _skull_cavity(img)
    if cavity.sum() < MIN_CAVITY_PX:
        return np.zeros(img.shape, np.float32)
    depth = ndimage.distance_transform_edt(cavity) * grid_px_mm
    rise = rng.uniform(*RIM_RISE_HU) * np.exp(-depth / rng.uniform(*RIM_DECAY_MM))
    return (rise * cavity).astype(np.float32)


SHADING_HU = (3.0, 10.0)  # peak of a smooth density field across the slice


def scanner_look(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float, float, float]:
    """One draw of what another scanner's reconstruction changes, labels untouched: a smooth density
    field across the slice (shading, ``img``'s shape, in HU, peak :data:`SHADING_HU`), then the
    kernel's sharpness (unsharp amount, and its blur sigma in pixels) and the noise's grain (sigma of
    the blur that correlates it). Reconstruction kernels and dose differ between hospitals far more
    than within one source, the one real training source here."""
    size = img.shape[-1]
    shade = ndimage.zoom(rng.normal(size=(5, 5)), size / 5.0, order=3)[:size, :size]  # a few waves across
    shade *= rng.uniform(*SHADING_HU) / max(float(np.abs(shade).max()), 1e-6)
    return shade.astype(np.float32), float(rng.uniform(0.3, 1.2)), float(rng.uniform(0.6, 1.5)), \
        float(rng.uniform(0.5, 1.2))


def sharpen_and_grain(x: np.ndarray, amount: float, blur: float, grain: float,
                       rng: np.random.Generator) -> np.ndarray:
    """(C, S, S) in [0, 1]: an unsharp mask (a sharper kernel) and correlated noise, each channel its own."""
    x = x + amount * (x - ndimage.gaussian_filter(x, (0, blur, blur)))
    noise = ndimage.gaussian_filter(rng.normal(size=x.shape), (0, grain, grain))
    return (x + noise * (rng.uniform(0.01, 0.04) / max(float(noise.std()), 1e-6))).astype(np.float32)


def robust_augment(x: torch.Tensor, maps: torch.Tensor, rng: np.random.Generator,
                   widths: tuple[float, float] = WINDOW_WIDTHS, rim: float = 0.0,
                   grid_px_mm: float = 0.82, scanner: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What a publisher, a scanner or a crop may change and the labels do not.

    ``x`` (N, C, S, S) brain-window input in [0, 1]; ``maps`` (N, K, S, S) targets moved alike.
    Geometry: mirror, quarter turns, rotation +-15 deg, scale 0.8-1.15 (crop), shift +-4 %. Intensity, the same
    for every channel of a sample: another window (centre 30-50 HU, width ``widths`` HU, read from the
    pixels as HU in the assumed 40/80), contrast and brightness, gamma; then blur, noise and JPEG
    artefacts on some samples; on a quarter the neighbour slices are replaced by the slice itself
    (slice sets without order, thin series). ``rim``: share of samples given a smooth rise of density
    toward the inner table (:func:`peripheral_rise`), before the window is changed; ``scanner``: share
    of samples given another reconstruction's look (:func:`scanner_look`: shading before the window is
    changed, a sharper kernel and grainy noise after it)."""
    n = x.shape[0]
    flip = torch.from_numpy(rng.random(n) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    maps = torch.where(flip[:, None, None, None], maps.flip(-1), maps)
    # quarter turns: publishers store slices face-up or face-left (phe-sich); the node's DICOM is
    # face-up, but a model that does not care is one quirk fewer to generalise across
    quarter = rng.integers(0, 4, n)
    for k in range(1, 4):
        sel = torch.from_numpy(quarter == k)
        if sel.any():
            x[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
            maps[sel] = torch.rot90(maps[sel], k, dims=(-2, -1))
    # zooming in (> 1) kept small: the head crop's margin is 4 %
    x, maps = random_affine(x, maps, rng, 15.0, (0.8, 1.15), 0.04)

    def col(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).float()[:, None, None, None]

    hu = x * 80.0  # the assumed 40/80 window read back as HU
    for i in np.flatnonzero(rng.random(n) < rim):
        hu[i] += torch.from_numpy(peripheral_rise(x[i, 0].numpy() * 255.0, rng, grid_px_mm))
    looks = ({int(i): scanner_look(x[i, 0].numpy(), rng) for i in np.flatnonzero(rng.random(n) < scanner)}
             if scanner > 0 else {})  # no draw without it: earlier seeded recipes replay as they ran
    for i, (shade, *_) in looks.items():
        hu[i] += torch.from_numpy(shade)
    centre, width = col(rng.uniform(30, 50, n)), col(rng.uniform(widths[0], widths[1], n))
    keep = col((rng.random(n) < 0.3).astype(np.float64))  # some samples keep the exact window
    centre, width = keep * 40 + (1 - keep) * centre, keep * 80 + (1 - keep) * width
    # saturated levels stand for "at or below 0 HU" and "at or above 80 HU": another window keeps them
    dark, bright = x <= 0.5 / 255, x >= 254.5 / 255
    x = ((hu - (centre - width / 2)) / width).clamp(0, 1)
    x = torch.where(dark, torch.zeros_like(x), torch.where(bright, torch.ones_like(x), x))
    x = (x * col(rng.uniform(0.85, 1.15, n)) + col(rng.uniform(-0.05, 0.05, n))).clamp(0, 1)
    x = x.pow(col(np.exp(rng.uniform(-0.3, 0.3, n))))
    for i in range(n):
        r = rng.random()
        if r < 0.25:
            s = float(rng.uniform(0.4, 1.2))
            x[i] = torch.from_numpy(ndimage.gaussian_filter(x[i].numpy(), (0, s, s)))
        elif r < 0.45:
            x[i] = _jpeg(x[i].clamp(0, 1), int(rng.integers(25, 90)))
        if i in looks:
            x[i] = torch.from_numpy(sharpen_and_grain(x[i].numpy(), *looks[i][1:], rng))
        elif rng.random() < 0.4:
            x[i] = x[i] + torch.from_numpy(rng.normal(0, rng.uniform(0.005, 0.03), x[i].shape)).float()
        if x.shape[1] > 1 and rng.random() < 0.25:
            x[i, 1:] = x[i, :1]
    return x.clamp_(0, 1), maps


# --- pseudo-masks inside boxes ------------------------------------------------------------------


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of uint8-range values (64 bins)."""
    hist, edges = np.histogram(values, bins=64, range=(0, 256))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = float(hist.sum()) - w0
    m0 = np.cumsum(hist * centres)[:-1]
    total = float((hist * centres).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 / hist.sum() - m0) ** 2 / (w0 * w1)
    return float(centres[int(np.nanargmax(np.nan_to_num(between, nan=-1.0)))])


PSEUDO_GAP = 25  # levels of the 40/80 window (~8 HU) a pseudo-mask pixel must lie above the brain around the box


def box_pseudo_mask(win: np.ndarray, head: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
    """Bool (S, S): the blood inside a loose box around a haematoma on a brain-window slice, or None.

    Blood is the bright tissue of the box: at or above Otsu's threshold of the box's tissue and at
    least :data:`PSEUDO_GAP` levels above the median brain of an 8-pixel ring around the box;
    saturated pixels (bone, calcification) and 2 pixels around them, air and CSF stay out; opened,
    pieces under a tenth of the largest dropped, holes filled. None where the box holds no such
    tissue or is mostly bright (no contrast to find). Measured against drawn masks (boxes made from
    them with phe-sich-like margins): Dice 0.63 on bhsd-mini, 0.60 on mbhseg25-mini."""
    y0, y1, x0, x1 = box
    region = win[y0:y1, x0:x1].astype(np.float32)
    sat = ndimage.binary_dilation(win >= 250, iterations=2)[y0:y1, x0:x1]
    valid = ~sat & head[y0:y1, x0:x1] & (region > 20)
    if valid.sum() < 10:
        return None
    ring = np.zeros(win.shape, bool)
    ring[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = True
    ring[y0:y1, x0:x1] = False
    around = win[ring & head & (win > 20) & (win < 250)]
    brain = float(np.median(around)) if around.size else float(np.median(region[valid]))
    m = (region >= max(_otsu(region[valid]), brain + PSEUDO_GAP)) & valid
    m = ndimage.binary_opening(m)
    lab, n = ndimage.label(m)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
    m = ndimage.binary_fill_holes(np.isin(lab, 1 + np.flatnonzero(sizes >= max(4.0, 0.1 * sizes.max()))))
    if m.mean() > 0.8:
        return None
    out = np.zeros(win.shape, bool)
    out[y0:y1, x0:x1] = m
    return out


def add_box_pseudo_masks(exams: list[GridExam]) -> int:
    """Real slices labelled by boxes only get pixel targets: the pseudo-mask of each box is blood of
    unknown subtype (``any_blood``); the box beyond 3 pixels of it is known blood-free; the 3-pixel
    ring, and a box whose pseudo-mask was refused, stay unscored. Returns the number of slices given
    one."""
    given = 0
    for ex in exams:
        if ex.source != "real":
            continue
        for z, s in enumerate(ex.slices):
            if not s.boxes or s.has_blood_pixels:
                continue
            blood = np.zeros(ex.windows.shape[-2:], bool)
            refused = np.zeros_like(blood)
            for b in s.boxes:
                pm = box_pseudo_mask(ex.windows[z, 0], ex.head[z], b)
                if pm is not None:
                    blood |= pm
                else:
                    y0, y1, x0, x1 = b
                    refused[y0:y1, x0:x1] = True
            if blood.any():
                s.any_blood = blood
                s.unknown = ndimage.binary_dilation(blood, iterations=3) | refused
                given += 1
    return given


# --- batches ----------------------------------------------------------------------------------


class MixedSampler:
    """Batches of (input, targets) from real exams, phantom exams and pasted shapes.

    Shares of a batch: real slices with blood, real slices without, real blood-free slices with a
    pasted real bleed shape, phantom slices (half with blood)."""

    def __init__(self, exams: list[GridExam], shapes: list[tuple[str, np.ndarray]], rng: np.random.Generator,
                 shares: dict[str, float] | None = None, grid_px_mm: float = 0.9,
                 paste_hu: tuple[float, float] = BLOOD_HU, crescents: float = 0.0, csf: float = 0.0,
                 window_widths: tuple[float, float] = WINDOW_WIDTHS, transplant: float = 0.0,
                 donors: list[GridExam] | None = None, rim: float = 0.0, sinus: float = 0.0,
                 scanner: float = 0.0) -> None:
        """``paste_hu``: density range of pasted blood; ``crescents``: share of the pastes that are
        extra-axial crescents (:func:`paste_crescent`) and ``csf`` of those that are blood in the
        slice's CSF spaces (:func:`paste_csf`: subarachnoid 60 %, intraventricular 40 %, at
        :data:`CSF_BLOOD_HU`), instead of bleed shapes; ``window_widths``: the range of the window
        augmentation's width (:func:`robust_augment`); ``transplant``: share of the pastes that are
        the drawn blood of a ``donors`` slice (another source's, never sampled whole; erased, it is an
        ``erase`` sample where the exams have no drawn masks) moved into a
        blood-free real slice (:func:`transplant_blood`); ``rim``: share of samples with a density
        rise toward the inner table (:func:`peripheral_rise`); ``sinus``: share of the real blood-free
        samples given a conspicuous dural venous sinus, still blood-free (:func:`paste_sinus`);
        ``scanner``: share of samples given another reconstruction's look (:func:`scanner_look`)."""
        self.exams, self.shapes, self.rng = exams, shapes, rng
        self.grid_px_mm = grid_px_mm
        self.paste_hu, self.crescents, self.csf = paste_hu, crescents, csf
        self.window_widths = window_widths
        self.rim, self.scanner = rim, scanner
        self.sinus = sinus
        self.sinuses = 0  # sinus mimics painted so far
        self.transplant = transplant if donors else 0.0
        self.donors = [(ex, z) for ex in donors or [] for z, s in enumerate(ex.slices)
                       if s.has_blood_pixels]
        idx: dict[str, list[tuple[int, int]]] = {"real_pos": [], "real_neg": [], "clean": [], "real_masked": [],
                                                 "phantom_pos": [], "phantom_neg": []}
        for i, ex in enumerate(exams):
            for z, s in enumerate(ex.slices):
                if not (s.label_known.any() or s.seg_known):
                    continue
                pos = bool(s.label_known[0] and s.labels[0] > 0)
                if ex.source == "phantom":
                    idx["phantom_pos" if pos else "phantom_neg"].append((i, z))
                else:
                    idx["real_pos" if pos else "real_neg"].append((i, z))
                    if s.has_blood_pixels:
                        idx["real_masked"].append((i, z))  # drawn blood masks: pixel truth on real anatomy
                    if not pos and s.label_known.all() and s.seg_known:
                        idx["clean"].append((i, z))
        self.index = {k: np.array(v, np.int64).reshape(-1, 2) for k, v in idx.items()}
        self.pasted = 0  # bleeds pasted so far
        self.erased = 0  # drawn bleeds erased so far (counterfactual negatives)
        self.shares = shares or {"real_pos": 0.25, "real_neg": 0.3, "paste": 0.15, "phantom": 0.3}

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.index.items()} | {"shapes": len(self.shapes),
                                                                "donor_slices": len(self.donors)}

    def _pick(self, kind: str) -> tuple[int, int]:
        arr = self.index[kind]
        i, z = arr[self.rng.integers(len(arr))]
        return int(i), int(z)

    def _erase_source(self) -> tuple[GridExam, int]:
        """A slice with drawn blood to erase (``erase``): one of the training set's masked slices, or,
        where it has none, a donor's (``--transplant-from``): another source's anatomy and scanner
        shown only without its blood, as a real negative the training set lacks."""
        if len(self.index["real_masked"]):
            i, z = self._pick("real_masked")
            return self.exams[i], z
        return self.donors[int(self.rng.integers(len(self.donors)))]

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        kinds = []
        for k, share in self.shares.items():
            kinds += [k] * int(round(share * n))
        kinds = (kinds + ["real_neg"] * n)[:n]
        xs, tg, unk, anyb, boxm, lab, lknown, sknown, has_box = [], [], [], [], [], [], [], [], []
        # 1.0 where the sample teaches something the model it starts from did not see (a phantom
        # slice, a pasted bleed, a drawn mask, an erased bleed, a sinus mimic): distillation leaves those free
        free = []
        size = self.exams[0].windows.shape[-1]
        for kind in kinds:
            if kind == "real_masked" and not len(self.index["real_masked"]):
                kind = "real_pos"
            if kind == "erase" and not (len(self.index["real_masked"]) or self.donors):
                kind = "real_neg"
            if kind == "phantom":
                kind = "phantom_pos" if self.rng.random() < 0.5 else "phantom_neg"
            if kind == "paste" and (not (self.shapes or self.crescents > 0 or self.csf > 0 or self.transplant > 0)
                                    or not len(self.index["clean"])):
                kind = "real_neg"
            # missing: same class elsewhere
            if kind not in ("paste", "real_masked", "erase") and not len(self.index[kind]):
                same = ("real_pos", "phantom_pos") if kind.endswith("pos") else ("real_neg", "phantom_neg")
                kind = next(k for k in (*same, "real_pos", "real_neg", "phantom_pos", "phantom_neg")
                             if len(self.index[k]))
            pasted = None
            moved = None  # a transplant: (targets (5, S, S), blood of unknown subtype, its zone)
            if kind == "paste":
                for _ in range(6):
                    i, z = self._pick("clean")
                    # without bleed shapes, the draw falls among the other kinds only
                    r = self.rng.random() * (1.0 if self.shapes else self.crescents + self.csf + self.transplant)
                    if r < self.crescents:
                        sub = "subdural"
                        pasted = paste_crescent(self.exams[i].windows, z, self.grid_px_mm, self.rng, self.paste_hu)
                    elif r < self.crescents + self.csf:
                        sub = "subarachnoid" if self.rng.random() < 0.6 else "intraventricular"
                        pasted = paste_csf(self.exams[i].windows, z, self.grid_px_mm, self.rng, sub)
                    elif r < self.crescents + self.csf + self.transplant:
                        donor, dz = self.donors[int(self.rng.integers(len(self.donors)))]
                        got = transplant_blood(self.exams[i].windows, z, donor, dz, self.rng)
                        if got is not None:
                            pasted, moved = (got[0], None), (got[1], got[2], got[3], donor.slices[dz])
                    else:
                        sub, shape = self.shapes[int(self.rng.integers(len(self.shapes)))]
                        pasted = paste_shape(self.exams[i].windows, z, shape, sub, self.grid_px_mm, self.rng,
                                             hu_range=self.paste_hu)
                    if pasted is not None:
                        self.pasted += 1
                        break
                if pasted is None:
                    i, z = self._pick("clean")
            erased = None
            ex: GridExam | None = None
            if kind == "erase":
                for _ in range(6):
                    ex, z = self._erase_source()
                    s = ex.slices[z]
                    blood = np.zeros(ex.windows.shape[-2:], bool)
                    if s.target is not None:
                        blood |= s.target.max(axis=0) > 25
                    if s.any_blood is not None:
                        blood |= s.any_blood
                    erased = erase_blood(ex.windows, z, blood, self.rng) if blood.any() else None
                    if erased is not None:
                        self.erased += 1
                        break
                if erased is None:
                    ex = None
                    i, z = self._pick("real_neg")
            elif kind != "paste":
                i, z = self._pick(kind)
            ex = self.exams[i] if ex is None else ex
            s = ex.slices[z]
            free.append(float(ex.source == "phantom" or pasted is not None or erased is not None
                              or kind == "real_masked"))
            if erased is not None:
                # alone, the erased slice is its own neighbour (the real ones may show the same bleed)
                x = key_slice_input(erased[None], 1, [0])[0]
                s = GridSlice(np.zeros(len(LABELS), np.float32), np.ones(len(LABELS), bool), seg_known=True)
            else:
                x = key_slice_input(ex.windows, 1, [z])[0]
                if (kind == "real_neg" and self.sinus > 0 and self.rng.random() < self.sinus
                        and s.label_known[0] and s.labels[0] == 0):
                    mimic = paste_sinus(ex.windows, z, self.grid_px_mm, self.rng)
                    if mimic is not None:
                        x[0] = torch.from_numpy(mimic[0][0] / 255.0).float()
                        self.sinuses += 1
                        free[-1] = 1.0  # a mimic the starting model never saw: distillation leaves it free
            t = np.zeros((len(SUBTYPES), size, size), np.float32) if s.target is None else s.target / 255.0
            labels, known = s.labels.copy(), s.label_known.copy()
            if moved is not None:
                x[0] = torch.from_numpy(pasted[0][0] / 255.0).float()
                t, anyb_m, unk_m, donor_slice = moved
                # a subtype is present where its moved blood is; one the donor's labels leave
                # unknown stays unknown unless its blood came along
                has = (t > 0.5).reshape(len(SUBTYPES), -1).sum(axis=1) >= 3
                known = np.concatenate([[True], donor_slice.label_known[1:] | has])
                labels = np.concatenate([[1.0], has.astype(np.float32)]).astype(np.float32)
                s = GridSlice(labels, known, seg_known=True, unknown=unk_m, any_blood=anyb_m)
            elif pasted is not None:
                x[0] = torch.from_numpy(pasted[0][0] / 255.0).float()
                k = SUBTYPES.index(sub)
                t = t.copy()
                t[k] = np.maximum(t[k], pasted[1])
                labels[0] = labels[1 + k] = 1.0
                known[:] = True
            xs.append(x)
            tg.append(torch.from_numpy(np.asarray(t, np.float32)))
            unk.append(torch.from_numpy(np.zeros((size, size), np.float32) if s.unknown is None
                                        else s.unknown.astype(np.float32)))
            anyb.append(torch.from_numpy(np.zeros((size, size), np.float32) if s.any_blood is None
                                         else s.any_blood.astype(np.float32)))
            bm = np.zeros((4, size, size), np.float32)  # up to four boxes, one map each
            for b, (y0, y1, x0, x1) in enumerate(s.boxes[:4]):
                bm[b, y0:y1, x0:x1] = 1.0
            boxm.append(torch.from_numpy(bm))
            has_box.append(len(s.boxes) > 0)
            lab.append(torch.from_numpy(labels))
            lknown.append(torch.from_numpy(known.astype(np.float32)))
            sknown.append(float(s.seg_known))
        x = torch.stack(xs)
        maps = torch.cat([torch.stack(tg), torch.stack(unk)[:, None], torch.stack(anyb)[:, None], torch.stack(boxm)], 1)
        x, maps = robust_augment(x, maps, self.rng, self.window_widths, self.rim, self.grid_px_mm,
                                 self.scanner)
        return {"x": x, "target": maps[:, :5], "unknown": (maps[:, 5] > 0.5).float(), "any_blood": maps[:, 6],
                "boxes": (maps[:, 7:] > 0.5).float(), "labels": torch.stack(lab),
                "label_known": torch.stack(lknown), "seg_known": torch.tensor(sknown),
                "free": torch.tensor(free)}


POS_PIXEL_WEIGHT = 3.0


def mixed_loss(out: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Slice BCE on known labels ("any" x2); subtype segmentation BCE (blood pixels x3) + soft Dice
    on known pixels; the box loss (each box's most probable pixel is blood) and blood of unknown
    subtype (some channel is blood there)."""
    w = torch.ones(len(LABELS))
    w[0] = 2.0
    elem = F.binary_cross_entropy_with_logits(out["slice"], b["labels"], reduction="none") * w * b["label_known"]
    cls = elem.sum() / b["label_known"].sum().clamp(min=1.0)
    seg = out["seg"]
    known_px = b["seg_known"][:, None, None, None] * (1 - b["unknown"][:, None])
    pw = 1.0 + (POS_PIXEL_WEIGHT - 1.0) * (b["target"] > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(seg, b["target"], weight=pw * known_px, reduction="sum")
    bce = bce / (known_px.sum() * seg.shape[1]).clamp(min=1.0)
    p = torch.sigmoid(seg) * known_px
    t = b["target"] * known_px
    inter, denom = (p * t).sum(dim=(0, 2, 3)), (p + t).sum(dim=(0, 2, 3))
    present = t.sum(dim=(0, 2, 3)) > 0
    dice = (1 - (2 * inter + 1) / (denom + 1))[present].mean() if present.any() else seg.sum() * 0
    top = seg.amax(dim=1)  # (N, S, S): the most probable subtype's logit
    boxes = b["boxes"]
    has = boxes.flatten(2).amax(dim=2) > 0  # (N, 4)
    if has.any():
        box_max = (top[:, None] + (boxes - 1) * 1e4).flatten(2).amax(dim=2)  # max logit inside each box
        box = F.binary_cross_entropy_with_logits(box_max[has], torch.ones_like(box_max[has]))
    else:
        box = seg.sum() * 0
    ab = b["any_blood"]
    blood = (F.binary_cross_entropy_with_logits(top, torch.ones_like(top), weight=ab, reduction="sum")
             / ab.sum().clamp(min=1.0)) if bool(ab.any()) else seg.sum() * 0
    total = cls + bce + 0.5 * dice + 0.3 * box + 0.3 * blood
    return {"loss": total, "cls": cls, "seg": bce + 0.5 * dice, "box": box}
