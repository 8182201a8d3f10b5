"""One dataset interface for training and evaluation, whatever the source layout.

A :class:`Dataset` lists exam ids up front (cheap) and loads one :class:`Sample` at a time
(``ds[i]``, ``ds.load(id)``, or iteration). Volumes are float32 HU, shape (Z, Y, X), slices ascending
along the slice normal (caudal -> cranial), rows posterior-down and columns toward the patient's left
(the DICOM LPS display convention), whatever the file format stored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triage.labels import LABELS, SUBTYPES


class DatasetError(ValueError):
    """The folder is not a dataset of the expected layout; the message says what is missing."""


@dataclass
class Sample:
    """One exam. Labels follow :data:`triage.labels.LABELS` order ("any" first).

    ``masks``: voxel masks when the source has them: subtype -> bool (Z, Y, X); sources that only
    mark blood without a subtype (CT-ICH) give the single key ``"any"``. ``slice_labels`` (Z, 6)
    and ``exam_labels`` (6,) are uint8, or None when the source has no such labels.
    """

    id: str
    hu: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    exam_labels: np.ndarray | None = None
    slice_labels: np.ndarray | None = None
    masks: dict[str, np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing / 1000.0

    @property
    def any_mask(self) -> np.ndarray | None:
        if not self.masks:
            return None
        if "any" in self.masks:
            return self.masks["any"]
        out = np.zeros(self.hu.shape, bool)
        for s in SUBTYPES:
            if s in self.masks:
                out |= self.masks[s]
        return out


class Dataset(ABC):
    """A folder of exams in one layout; subclasses set ``format`` and implement the two methods."""

    format: str = ""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root} is not a directory")

    @abstractmethod
    def ids(self) -> list[str]:
        """Exam ids in a stable order."""

    @abstractmethod
    def load(self, exam_id: str) -> Sample:
        """Read one exam."""

    def exam_labels(self, exam_id: str) -> np.ndarray | None:
        """Exam labels without loading the volume when the source allows (default: load)."""
        return self.load(exam_id).exam_labels

    def __len__(self) -> int:
        return len(self.ids())

    def __getitem__(self, index: int) -> Sample:
        return self.load(self.ids()[index])

    def __iter__(self) -> Iterator[Sample]:
        for exam_id in self.ids():
            yield self.load(exam_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} exams)"


def labels_vector(values: dict[str, int | bool]) -> np.ndarray:
    """uint8 (6,) in LABELS order; "any" is derived from the subtypes when absent."""
    out = np.array([int(bool(values.get(k, 0))) for k in LABELS], np.uint8)
    if "any" not in values:
        out[0] = out[1:].max()
    return out
