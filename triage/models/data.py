"""Training/evaluation data: study sources and a preprocessed on-disk cache.

A *source* is a list of keys plus a loader returning a :class:`Study` (HU volume with ground truth).
Sources: ``phantom:START-END[:key=value,...]`` generates synthetic studies on the fly with the seeds
START..END-1 (options are passed to ``PhantomOptions``; ``subtypes=epidural/subdural``); any other
path goes through ``triage.datasets`` when that package provides ``open_dataset``.

The cache stores each study already preprocessed on the network grid (uint8 windows, soft
segmentation targets), about 1 MB per study, so training epochs never touch 512x512 data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from triage.labels import LABELS, SUBTYPES
from triage.models.preprocess import PreprocessConfig, downsize, prepare, resize_u8, to_network_grid

TRAIN_SEEDS = (0, 100000)
VAL_SEEDS = (100000, 200000)
TEST_SEEDS = (200000, 300000)


@dataclass
class Study:
    """One study with ground truth, in the geometry of its HU array."""

    key: str
    hu: np.ndarray  # float32 (Z, Y, X)
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    masks: dict[str, np.ndarray]  # subtype -> bool (Z, Y, X); absent = empty
    slice_labels: np.ndarray  # (Z, 6)
    exam_labels: np.ndarray  # (6,)
    kind: str = ""
    volumes_ml: dict[str, float] = field(default_factory=dict)
    brain_mask: np.ndarray | None = None
    # What the source really labels (None = everything, as for phantoms). ``label_known`` (Z,): the
    # slice's labels are known; ``seg_known`` (Z,): its subtype masks are complete (a slice known to be
    # negative has known, empty masks). ``mask_any``: a blood mask without subtypes (CT-ICH).
    label_known: np.ndarray | None = None
    seg_known: np.ndarray | None = None
    mask_any: np.ndarray | None = None

    @property
    def has_volume_truth(self) -> bool:
        """Voxel ground truth for all the blood (phantoms, CT-ICH), so Dice and volumes can be scored."""
        return self.mask_any is not None or (self.seg_known is None or bool(self.seg_known.all()))

    def truth_any(self) -> np.ndarray:
        out = np.zeros(self.hu.shape, bool) if self.mask_any is None else self.mask_any.copy()
        for m in self.masks.values():
            out |= m
        return out


@dataclass
class Source:
    name: str
    keys: list[str]
    load: Callable[[str], Study]
    description: str = ""


def _parse_options(text: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        try:
            opts[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            opts[k.strip()] = v
    return opts


class PhantomLoader:
    """Generates one phantom study per seed (a picklable callable, for worker processes)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def __call__(self, key: str) -> Study:
        from triage.phantom.generator import PhantomOptions, generate_study

        s = generate_study(int(key), PhantomOptions(**self.options))
        masks = {k: np.asarray(v, bool) for k, v in s.masks.items() if k in SUBTYPES}
        return Study(key=key, hu=np.asarray(s.hu, np.float32), pixel_spacing=tuple(s.pixel_spacing),
                     slice_spacing=float(s.slice_spacing), masks=masks,
                     slice_labels=np.asarray(s.slice_labels, np.float32),
                     exam_labels=np.asarray(s.exam_labels, np.float32), kind=str(getattr(s, "kind", "")),
                     volumes_ml={k: float(v) for k, v in dict(getattr(s, "volumes_ml", {})).items()},
                     brain_mask=None)


def open_source(spec: str, fmt: str = "auto") -> Source:
    """Resolve a dataset argument into a :class:`Source`; ``A+B`` joins several."""
    if "+" in spec:
        parts = [open_source(p, fmt) for p in spec.split("+")]
        return Source(spec, [f"{i}|{k}" for i, p in enumerate(parts) for k in p.keys], JoinedLoader(parts),
                      "; ".join(p.description for p in parts))
    if spec.startswith("phantom:"):
        rng, _, opts = spec[len("phantom:"):].partition(":")
        start, _, end = rng.partition("-")
        keys = [str(i) for i in range(int(start), int(end))]
        if not keys:
            raise ValueError(f"empty seed range in {spec!r}")
        options = _parse_options(opts)
        if isinstance(options.get("subtypes"), str):  # subtypes=epidural/subdural (',' separates options)
            options["subtypes"] = tuple(options["subtypes"].split("/"))
        from triage.phantom.generator import PhantomOptions

        try:
            PhantomOptions(**options).validate()
        except TypeError as exc:
            raise ValueError(f"{spec!r}: {exc}") from exc
        return Source(spec, keys, PhantomLoader(options),
                      f"synthetic phantom studies, seeds {start}..{int(end) - 1}, options {options or 'default'}")
    if spec.startswith("slices:"):  # slices:PATH[:split=train|val,fraction=F,seed=N]
        from triage.datasets.slices import SlicesDataset, parse_spec

        path, opts = parse_spec(spec)
        return _dataset_source(spec, SlicesDataset(path, **opts))
    try:
        from triage.datasets import open_dataset  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ValueError(f"{spec!r}: use phantom:START-END, or install a dataset reader (triage.datasets)") from exc
    ds = open_dataset(spec, fmt)
    return _dataset_source(spec, ds)


class JoinedLoader:
    """Loader for joined sources; keys are ``<part index>|<key>``."""

    def __init__(self, parts: list[Source]) -> None:
        self.parts = parts

    def __call__(self, key: str) -> Study:
        i, _, k = key.partition("|")
        return self.parts[int(i)].load(k)

    def part_name(self, key: str) -> str:
        return self.parts[int(key.partition("|")[0])].name


def _dataset_source(spec: str, ds: Any) -> Source:
    """Adapter for :mod:`triage.datasets` (``ds.ids()``, ``ds.load(id)`` -> ``Sample``)."""
    return Source(spec, [str(i) for i in ds.ids()], DatasetLoader(ds), f"dataset {spec} ({ds.format}, {len(ds)} exams)")


class DatasetLoader:
    """Turns a real dataset's :class:`~triage.datasets.base.Sample` into a training :class:`Study`,
    saying what is known: RSNA has slice labels but no masks, CQ500 exam labels only, CT-ICH slice
    labels and one blood mask without subtypes. Unknown targets are masked out of the losses
    instead of being read as "no blood"."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __call__(self, key: str) -> Study:
        smp = self.ds.load(key)
        z = smp.hu.shape[0]
        if smp.slice_labels is not None:
            sl = np.asarray(smp.slice_labels, np.float32)
            label_known = np.ones(z, bool)
        else:
            sl = np.zeros((z, len(LABELS)), np.float32)
            label_known = np.zeros(z, bool)
        if smp.exam_labels is not None:
            ex = np.asarray(smp.exam_labels, np.float32)
        elif smp.slice_labels is not None:
            ex = sl.max(axis=0)
        else:
            raise ValueError(f"{key}: the dataset gives neither exam nor slice labels")
        if not ex[0]:  # a negative exam: every slice is known to be negative
            label_known[:] = True
            sl[:] = 0
        seg_known = label_known & (sl[:, 0] == 0)
        given = smp.masks or {}
        masks = {k: np.asarray(v, bool) for k, v in given.items() if k in SUBTYPES}
        mask_any = np.asarray(given["any"], bool) if "any" in given else None
        if masks:
            seg_known[:] = True
        elif mask_any is not None:
            # one subtype on a slice: the blood mask is that subtype's mask there
            for zi in np.nonzero(label_known & (sl[:, 0] > 0))[0]:
                present = [k for k, sub in enumerate(SUBTYPES) if sl[zi, LABELS.index(sub)] > 0]
                if len(present) == 1:
                    sub = SUBTYPES[present[0]]
                    masks.setdefault(sub, np.zeros(smp.hu.shape, bool))[zi] = mask_any[zi]
                    seg_known[zi] = True
        return Study(key=key, hu=np.asarray(smp.hu, np.float32), pixel_spacing=tuple(smp.pixel_spacing),
                     slice_spacing=float(smp.slice_spacing), masks=masks, slice_labels=sl, exam_labels=ex,
                     kind=str(smp.meta.get("kind", "positive" if ex[0] else "negative")),
                     label_known=label_known, seg_known=seg_known, mask_any=mask_any)


@dataclass
class Cached:
    """A study preprocessed on the network grid."""

    key: str
    windows: np.ndarray  # uint8 (Z, W, S, S)
    brain_small: np.ndarray  # bool (Z, S, S)
    target: np.ndarray  # uint8 (Z, 5, S, S) area fraction * 255
    slice_labels: np.ndarray  # float32 (Z, 6)
    exam_labels: np.ndarray  # float32 (6,)
    meta: dict[str, Any]
    label_known: np.ndarray | None = None  # bool (Z,); None = all known
    seg_known: np.ndarray | None = None  # bool (Z,); None = all known


def cache_key(source_name: str, key: str, cfg: PreprocessConfig) -> str:
    d = cfg.to_dict()
    d["size"] = d.pop("base_size")  # the cache holds the base grid, whatever the network size
    h = hashlib.sha1(json.dumps([source_name.split(":")[0], source_name.partition(":")[2].partition(":")[2],
                                 key, d], sort_keys=True).encode()).hexdigest()[:16]
    return f"{key.replace('/', '_')}-{h}.npz"  # slice-set exam ids hold a "/"


def preprocess_study(study: Study, cfg: PreprocessConfig) -> Cached:
    """Preprocess on the base grid (``cfg.base_size``); :func:`cached_studies` downsizes on load."""
    base = replace(cfg, size=cfg.base_size)
    prep = prepare(study.hu, study.pixel_spacing, base, brain_mask=study.brain_mask)
    z = study.hu.shape[0]
    target = np.zeros((z, len(SUBTYPES), base.size, base.size), np.uint8)
    for k, sub in enumerate(SUBTYPES):
        m = study.masks.get(sub)
        if m is not None and m.any():
            target[:, k] = np.round(to_network_grid(m, prep.box, base.size) * 255).astype(np.uint8)
    meta = {"kind": study.kind, "volumes_ml": study.volumes_ml, "shape": list(study.hu.shape),
            "pixel_spacing": list(study.pixel_spacing), "slice_spacing": study.slice_spacing,
            "box": list(prep.box)}
    # Blood on a slice the preprocessing leaves out (no intracranial mask: skull-base and vertex caps)
    # cannot be seen by the network: its labels and masks are not targets (the exam label still is).
    blind = ~prep.brain_small.reshape(z, -1).any(axis=1) & (
        (study.slice_labels.reshape(z, -1) > 0).any(axis=1) | target.reshape(z, -1).any(axis=1))
    label_known, seg_known = study.label_known, study.seg_known
    if blind.any():
        label_known = known_flags(label_known, z) & ~blind
        seg_known = known_flags(seg_known, z) & ~blind
    return Cached(study.key, prep.windows, prep.brain_small, target, study.slice_labels.astype(np.float32),
                  study.exam_labels.astype(np.float32), meta, label_known, seg_known)


def known_flags(flags: np.ndarray | None, n: int) -> np.ndarray:
    """Per-slice "known" flags, None meaning every slice is known (a fresh array)."""
    return np.ones(n, bool) if flags is None else np.asarray(flags, bool).copy()


def _save(path: Path, c: Cached) -> None:
    tmp = path.with_suffix(".tmp.npz")
    known = {k: v for k, v in (("label_known", c.label_known), ("seg_known", c.seg_known)) if v is not None}
    np.savez_compressed(tmp, windows=c.windows, brain_small=c.brain_small, target=c.target,
                        slice_labels=c.slice_labels, exam_labels=c.exam_labels,
                        meta=np.frombuffer(json.dumps(c.meta).encode(), np.uint8), **known)
    os.replace(tmp, path)


_GRID_ARRAYS = ("windows", "brain_small", "target")  # the large arrays, memory-mapped with ``mmap``


def _load(path: Path, key: str, arrays: bool = True) -> Cached:
    """One cached study; ``arrays=False`` leaves the large arrays empty (memory-mapped elsewhere)."""
    with np.load(path) as z:
        big = [z[n] if arrays else np.zeros(0, np.uint8) for n in _GRID_ARRAYS]
        return Cached(key, *big, z["slice_labels"], z["exam_labels"],
                      json.loads(bytes(z["meta"]).decode()),
                      z["label_known"] if "label_known" in z.files else None,
                      z["seg_known"] if "seg_known" in z.files else None)


def _build_one(args: tuple[Source, str, PreprocessConfig, str]) -> str:
    source, key, cfg, path = args
    import torch

    torch.set_num_threads(1)
    _save(Path(path), preprocess_study(source.load(key), cfg))
    return key


def cached_studies(source: Source, cfg: PreprocessConfig, cache_dir: Path, workers: int = 1,
                   progress: bool = True, target_size: int | None = None, mmap: bool = False) -> list[Cached]:
    """Preprocess every study of the source once (in ``workers`` processes) and load the cache.

    ``target_size``: the grid of the segmentation targets when it is coarser than the input grid
    (a stem network's U-Net grid), which keeps a 256 px training set in memory.
    ``mmap``: the large arrays (windows, intracranial mask, targets) on the network grid are kept
    as uncompressed ``.npy`` files beside the cache and memory-mapped (copy-on-write), so a training
    set larger than RAM is paged in by the kernel instead of being held by the process.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    def name_of(k: str) -> str:
        return source.load.part_name(k) if isinstance(source.load, JoinedLoader) else source.name

    paths = {k: cache_dir / cache_key(name_of(k), k.rpartition("|")[2], cfg) for k in source.keys}
    todo = [(source, k, cfg, str(p)) for k, p in paths.items() if not p.exists()]
    if todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"cache {source.name}", disable=not progress, unit="study")
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_build_one, todo):
                    bar.update()
        else:
            for item in todo:
                _build_one(item)
                bar.update()
        bar.close()
    out = []
    for k, p in paths.items():
        grid = p.parent / "grid" / f"{p.stem}-{cfg.size}-{target_size or 0}"
        if mmap and all(grid.with_suffix(f".{name}.npy").exists() for name in _GRID_ARRAYS):
            c = _load(p, k, arrays=False)
        else:
            c = _load(p, k)
            c.windows, c.brain_small, c.target = downsize(c.windows, c.brain_small, c.target, cfg.size)
            if target_size and c.target is not None:
                c.target = resize_u8(c.target, target_size)
            if mmap:
                _save_grid(grid, c)
        if mmap:
            c.windows, c.brain_small, c.target = (np.load(grid.with_suffix(f".{name}.npy"), mmap_mode="c")
                                                  for name in _GRID_ARRAYS)
        out.append(c)
    return out


def _save_grid(grid: Path, c: Cached) -> None:
    """The network-grid arrays of one study as .npy files (written whole, then renamed)."""
    grid.parent.mkdir(parents=True, exist_ok=True)
    for name in _GRID_ARRAYS:
        tmp = grid.with_suffix(f".{name}.tmp.npy")
        np.save(tmp, getattr(c, name))
        os.replace(tmp, grid.with_suffix(f".{name}.npy"))


def iter_studies(source: Source) -> Iterator[Study]:
    for k in source.keys:
        yield source.load(k)


def label_vector(names: list[str]) -> np.ndarray:
    v = np.zeros(len(LABELS), np.float32)
    for n in names:
        v[LABELS.index(n)] = 1
    if v[1:].any():
        v[0] = 1
    return v


def _study_path(cache_dir: Path, source_name: str, key: str) -> Path:
    opts = source_name.partition(":")[2].partition(":")[2]
    h = hashlib.sha1(json.dumps([source_name.split(":")[0], opts, key]).encode()).hexdigest()[:16]
    return cache_dir / f"study-{key.rpartition('|')[2].replace('/', '_')}-{h}.npz"


def save_study(path: Path, s: Study) -> None:
    """Store a full-resolution study compactly (HU as int16, masks bit-packed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    masks = {f"mask_{k}": np.packbits(v.ravel()) for k, v in s.masks.items() if v.any()}
    extra = {k: v for k, v in (("label_known", s.label_known), ("seg_known", s.seg_known)) if v is not None}
    if s.mask_any is not None:
        extra["any_mask"] = np.packbits(s.mask_any.ravel())
    meta = {"key": s.key, "pixel_spacing": list(s.pixel_spacing), "slice_spacing": s.slice_spacing,
            "kind": s.kind, "volumes_ml": s.volumes_ml, "shape": list(s.hu.shape)}
    np.savez_compressed(tmp, hu=np.clip(np.rint(s.hu), -32768, 32767).astype(np.int16),
                        slice_labels=s.slice_labels, exam_labels=s.exam_labels,
                        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **masks, **extra)
    os.replace(tmp, path)


def read_study(path: Path) -> Study:
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        shape = tuple(meta["shape"])
        n = int(np.prod(shape))
        def bits(name: str) -> np.ndarray:
            return np.unpackbits(z[name])[:n].reshape(shape).astype(bool)

        masks = {k[5:]: bits(k) for k in z.files if k.startswith("mask_")}
        return Study(meta["key"], z["hu"].astype(np.float32), tuple(meta["pixel_spacing"]),
                     float(meta["slice_spacing"]), masks, z["slice_labels"].astype(np.float32),
                     z["exam_labels"].astype(np.float32), meta["kind"], meta["volumes_ml"],
                     label_known=z["label_known"] if "label_known" in z.files else None,
                     seg_known=z["seg_known"] if "seg_known" in z.files else None,
                     mask_any=bits("any_mask") if "any_mask" in z.files else None)


def _store_one(args: tuple[Source, str, str]) -> str:
    source, key, path = args
    save_study(Path(path), source.load(key))
    return key


def stored_studies(source: Source, cache_dir: Path | None, workers: int = 1, progress: bool = True) -> Iterator[Study]:
    """Yield the source's studies, generating/loading them through a full-resolution cache when given."""
    if cache_dir is None:
        yield from iter_studies(source)
        return
    paths = {k: _study_path(cache_dir, source.name, k) for k in source.keys}
    todo = [(source, k, str(p)) for k, p in paths.items() if not p.exists()]
    if todo and workers > 1:
        from tqdm import tqdm

        with ProcessPoolExecutor(workers) as pool:
            for _ in tqdm(pool.map(_store_one, todo), total=len(todo), desc="generate", disable=not progress):
                pass
    for k, p in paths.items():
        if not p.exists():
            _store_one((source, k, str(p)))
        yield read_study(p)
