"""Reader for folders written by ``triage phantom`` (manifest.json + study-NNNN/truth/)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from triage.datasets.base import Dataset, DatasetError, Sample
from triage.phantom.truth import load_truth


class PhantomDataset(Dataset):
    """Synthetic studies with voxel masks per subtype, slice and exam labels.

    ``from_dicom=True`` reads the HU volume from the DICOM head series (the node's own assembly
    code) instead of ``truth.npz``; both give the same voxels.
    """

    format = "phantom"

    def __init__(self, root: str | Path, from_dicom: bool = False) -> None:
        super().__init__(root)
        self.from_dicom = from_dicom
        if not (self.root / "manifest.json").is_file():
            raise DatasetError(f"{self.root}: no manifest.json (not a triage phantom folder)")

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.root / "manifest.json").read_text())

    @cached_property
    def _rows(self) -> dict[str, dict[str, Any]]:
        return {r["study_id"]: r for r in self.manifest["studies"]}

    def ids(self) -> list[str]:
        return list(self._rows)

    def exam_labels(self, exam_id: str) -> np.ndarray:
        r = self._rows[exam_id]
        return np.array([int(r[f"label_{k}"]) for k in self.manifest["labels"]], np.uint8)

    def load(self, exam_id: str) -> Sample:
        if exam_id not in self._rows:
            raise KeyError(exam_id)
        d = self.root / self._rows[exam_id]["path"]
        arrays, doc = load_truth(d / "truth")
        hu = arrays["hu"]
        if self.from_dicom:
            from triage.dicom.assembly import load_volume

            files = sorted((d / "dicom" / "head").glob("*.dcm"))
            vol, _ = load_volume(files)
            hu = vol.hu.astype(np.float32)
        return Sample(
            id=exam_id,
            hu=hu,
            pixel_spacing=tuple(doc["pixel_spacing"]),  # type: ignore[arg-type]
            slice_spacing=float(doc["slice_spacing"]),
            exam_labels=arrays["exam_labels"].astype(np.uint8),
            slice_labels=arrays["slice_labels"].astype(np.uint8),
            masks=arrays["masks"],
            meta={"kind": doc["kind"], "seed": doc["seed"], "volumes_ml": doc["volumes_ml"],
                  "brain_mask": arrays["brain_mask"], "path": str(d)},
        )
