"""Reader for "slice sets": labelled 2-D head CT slices published as windowed 8-bit PNGs.

Layout: ``labels.csv`` + ``images/`` (+ ``masks/``). Columns: ``image`` (PNG path under the set),
``study`` (patient or exam id), ``slice`` (index in the study, empty when unknown), the six labels
(``1``, ``0`` or empty = unknown), ``mask`` (label-map PNG: 0 none, 1 EDH, 2 IPH, 3 IVH, 4 SAH,
5 SDH, 6 blood of unknown subtype), ``boxes`` (``x0 y0 x1 y1`` per box, ``;``-separated) and
``window`` (``C/W`` in HU of the 0..255 range, or ``unknown``).

Exams: a study whose slices are ordered is one exam (a series, neighbours stacked); slices of a
study without order are an exam each. Splits are always by study (``split=train|val``,
``fraction``, ``seed``): neighbouring slices of one patient are near-duplicates.

Pixels become HU through their window (:func:`~triage.models.preprocess.pixels_to_hu`); an unknown
window is read as the brain window 40/80, the window the node's ``brain_window`` input uses, so the
network sees the publisher's pixels unchanged. Pixel spacing is unknown for PNGs: 0.45 mm is
assumed (a 23 cm field of view on 512 pixels) and recorded in ``meta``.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triage.datasets.base import Dataset, DatasetError, Sample
from triage.labels import LABELS, SUBTYPES

ASSUMED_WINDOW = (40.0, 80.0)
ASSUMED_PIXEL_MM = 0.45
ASSUMED_SLICE_MM = 5.0
UNKNOWN_SUBTYPE = 6  # mask value: blood whose subtype the publisher does not give
SPLITS = ("all", "train", "val")


@dataclass
class SliceRow:
    image: str
    study: str
    slice: int | None
    labels: np.ndarray  # float32 (6,), NaN = unknown
    mask: str | None
    boxes: list[tuple[float, float, float, float]]
    window: tuple[float, float] | None


@dataclass
class SliceExam:
    """One exam of a slice set, in slice order. ``labels`` (Z, 6) float32 with NaN for unknown;
    ``label_map`` (Z, Y, X) uint8 mask values where ``mask_known`` (Z,), else 0."""

    id: str
    study: str
    pixels: np.ndarray  # uint8 (Z, Y, X)
    window: tuple[float, float]
    window_known: bool
    labels: np.ndarray
    label_map: np.ndarray | None
    mask_known: np.ndarray
    boxes: list[list[tuple[float, float, float, float]]]
    images: list[str] = field(default_factory=list)

    @property
    def hu(self) -> np.ndarray:
        from triage.models.preprocess import pixels_to_hu

        return pixels_to_hu(self.pixels, self.window)


def _label(text: str) -> float:
    text = (text or "").strip()
    if text == "":
        return float("nan")
    if text not in ("0", "1"):
        raise DatasetError(f"label {text!r} is not 0, 1 or empty")
    return float(text)


def _boxes(text: str) -> list[tuple[float, float, float, float]]:
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        vals = [float(v) for v in part.split()]
        if len(vals) != 4:
            raise DatasetError(f"box {part!r} is not 'x0 y0 x1 y1'")
        out.append((vals[0], vals[1], vals[2], vals[3]))
    return out


def _window(text: str) -> tuple[float, float] | None:
    text = (text or "").strip().lower()
    if text in ("", "unknown"):
        return None
    c, _, w = text.partition("/")
    try:
        return float(c), float(w)
    except ValueError as exc:
        raise DatasetError(f"window {text!r} is not 'C/W' or 'unknown'") from exc


def read_rows(root: Path) -> list[SliceRow]:
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{root}: no labels.csv (a slice set has labels.csv and images/)")
    rows = []
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "study"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {sorted(missing)}")
        for n, r in enumerate(reader, start=2):
            try:
                labels = np.array([_label(r.get(k, "")) for k in LABELS], np.float32)
                if np.isnan(labels[0]) and np.nanmax(np.r_[labels[1:], 0.0]) > 0:
                    labels[0] = 1.0  # a named subtype means blood
                sl = (r.get("slice") or "").strip()
                rows.append(SliceRow(r["image"], str(r["study"]), int(sl) if sl else None, labels,
                                     (r.get("mask") or "").strip() or None, _boxes(r.get("boxes", "")),
                                     _window(r.get("window", ""))))
            except (DatasetError, ValueError) as exc:
                raise DatasetError(f"{csv_path} line {n}: {exc}") from exc
    if not rows:
        raise DatasetError(f"{csv_path}: no rows")
    return rows


def split_studies(studies: list[str], split: str, fraction: float, seed: int) -> list[str]:
    """The studies of ``split``: each study's place is fixed by a hash of (seed, study), so the split
    does not depend on the order of the CSV or on the other studies."""
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return studies
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"fraction must be within (0, 1), got {fraction}")

    def rank(s: str) -> str:
        return hashlib.sha1(f"{seed}:{s}".encode()).hexdigest()

    order = sorted(studies, key=rank)
    n_val = max(1, int(round(fraction * len(order))))
    val = set(order[:n_val])
    return [s for s in studies if (s in val) == (split == "val")]


def parse_spec(spec: str) -> tuple[Path, dict[str, Any]]:
    """``slices:PATH[:split=val,fraction=0.25,seed=0]`` -> (path, options)."""
    body = spec[len("slices:"):] if spec.startswith("slices:") else spec
    path, _, opts = body.partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in opts.split(","))):
        k, _, v = part.partition("=")
        k = k.strip()
        if k == "split":
            options[k] = v.strip()
        elif k == "fraction":
            options[k] = float(v)
        elif k == "seed":
            options[k] = int(v)
        else:
            raise DatasetError(f"{spec!r}: unknown option {k!r} (split, fraction, seed)")
    return Path(path), options


class SliceSet:
    """A slice set folder, optionally one side of a by-study split."""

    def __init__(self, root: str | Path, split: str = "all", fraction: float = 0.25, seed: int = 0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root} is not a directory")
        self.split, self.fraction, self.seed = split, fraction, seed
        rows = read_rows(self.root)
        studies = list(dict.fromkeys(r.study for r in rows))
        keep = set(split_studies(studies, split, fraction, seed))
        self.rows = [r for r in rows if r.study in keep]
        self._exams: dict[str, list[SliceRow]] = {}
        for study in (s for s in studies if s in keep):
            members = [r for r in self.rows if r.study == study]
            if all(r.slice is not None for r in members):
                self._exams[study] = sorted(members, key=lambda r: r.slice or 0)
            else:  # no order: every slice is an exam of its own (still split with its study)
                for r in members:
                    self._exams[f"{study}/{Path(r.image).stem}"] = [r]

    @property
    def name(self) -> str:
        return self.root.name

    def studies(self) -> list[str]:
        return list(dict.fromkeys(r.study for r in self.rows))

    def exam_ids(self) -> list[str]:
        return list(self._exams)

    def describe(self) -> str:
        n_pos = sum(1 for r in self.rows if r.labels[0] == 1)
        part = "" if self.split == "all" else f", split {self.split} (fraction {self.fraction:g}, seed {self.seed})"
        return (f"slice set {self.name}: {len(self.rows)} slices ({n_pos} with blood) of "
                f"{len(self.studies())} studies{part}")

    def load(self, exam_id: str) -> SliceExam:
        from PIL import Image

        members = self._exams[exam_id]
        pixels, maps, known, boxes = [], [], [], []
        for r in members:
            path = self.root / r.image
            try:
                img = np.asarray(Image.open(path).convert("L"), np.uint8)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{path}: unreadable image ({exc})") from exc
            pixels.append(img)
            if r.mask:
                lm = np.asarray(Image.open(self.root / r.mask), np.uint8)
                if lm.shape != img.shape:
                    raise DatasetError(f"{r.mask}: mask {lm.shape} does not match image {img.shape}")
                if lm.max() > UNKNOWN_SUBTYPE:
                    raise DatasetError(f"{r.mask}: mask value {int(lm.max())} is not 0..6")
                maps.append(lm)
                known.append(True)
            else:
                maps.append(np.zeros(img.shape, np.uint8))
                known.append(False)
            boxes.append(list(r.boxes))
        shapes = {p.shape for p in pixels}
        if len(shapes) > 1:
            raise DatasetError(f"exam {exam_id}: slices of different sizes {sorted(shapes)}")
        windows = {r.window for r in members}
        window = next(iter(windows)) if len(windows) == 1 else None
        if len(windows) > 1:
            raise DatasetError(f"exam {exam_id}: slices with different windows {sorted(map(str, windows))}")
        return SliceExam(id=exam_id, study=members[0].study, pixels=np.stack(pixels),
                         window=window or ASSUMED_WINDOW, window_known=window is not None,
                         labels=np.stack([r.labels for r in members]),
                         label_map=np.stack(maps) if any(known) else None, mask_known=np.array(known, bool),
                         boxes=boxes, images=[r.image for r in members])


def exam_masks(exam: SliceExam) -> dict[str, np.ndarray]:
    """Subtype -> bool (Z, Y, X) from the label map, plus ``"any"`` for all blood (value 6 included)."""
    if exam.label_map is None:
        return {}
    out = {sub: exam.label_map == k + 1 for k, sub in enumerate(SUBTYPES)}
    out["any"] = exam.label_map > 0
    return out


class SlicesDataset(Dataset):
    """The :class:`~triage.datasets.base.Dataset` view of a slice set (exams as samples); unknown
    labels and masks are in ``meta`` (``label_known`` (Z, 6), ``mask_known`` (Z,), ``boxes``)."""

    format = "slices"

    def __init__(self, root: str | Path, split: str = "all", fraction: float = 0.25, seed: int = 0) -> None:
        super().__init__(root)
        self.set = SliceSet(root, split, fraction, seed)

    def ids(self) -> list[str]:
        return self.set.exam_ids()

    def load(self, exam_id: str) -> Sample:
        ex = self.set.load(exam_id)
        known = ~np.isnan(ex.labels)
        slice_labels = np.nan_to_num(ex.labels, nan=0.0).astype(np.uint8)
        exam = slice_labels.max(axis=0)
        masks = exam_masks(ex) or None
        if masks is not None:
            masks = {k: v for k, v in masks.items() if k == "any" or v.any()}
        return Sample(id=exam_id, hu=ex.hu, pixel_spacing=(ASSUMED_PIXEL_MM, ASSUMED_PIXEL_MM),
                      slice_spacing=ASSUMED_SLICE_MM, exam_labels=exam, slice_labels=slice_labels, masks=masks,
                      meta={"label_known": known, "mask_known": ex.mask_known, "boxes": ex.boxes,
                            "window": list(ex.window), "window_known": ex.window_known, "study": ex.study,
                            "images": ex.images, "pixel_spacing_assumed": True})


def is_slice_set(root: Path) -> bool:
    return (root / "labels.csv").is_file() and (root / "images").is_dir()
