"""RSNA 2019 Intracranial Hemorrhage Detection challenge layout.

``stage_2_train/ID_xxxxxxxxx.dcm`` (one slice per file) and ``stage_2_train.csv`` with rows
``ID_xxxxxxxxx_<label>,Label`` for the six labels. Slices are grouped into exams by
StudyInstanceUID + SeriesInstanceUID and sorted by position along the slice normal.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from functools import cached_property
from pathlib import Path

import numpy as np

from triage.datasets.base import Dataset, DatasetError, Sample, labels_vector
from triage.datasets.dicomio import read_header, sort_slices, stack
from triage.labels import LABELS


def find_rsna(root: Path) -> tuple[Path, Path] | None:
    """(image folder, label CSV) of an RSNA layout under ``root``, or None."""
    for name in ("stage_2_train", "stage_1_train", "stage_2_train_images", "stage_1_train_images"):
        d = root / name
        csvs = [root / f"{name.replace('_images', '')}.csv", root / "stage_2_train.csv", root / "stage_1_train.csv"]
        if d.is_dir():
            for c in csvs:
                if c.is_file():
                    return d, c
    return None


class RSNADataset(Dataset):
    format = "rsna"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        found = find_rsna(self.root)
        if found is None:
            raise DatasetError(f"{self.root}: expected stage_2_train/ and stage_2_train.csv (RSNA 2019 layout)")
        self.images, self.csv = found

    @cached_property
    def image_labels(self) -> dict[str, dict[str, int]]:
        """image id -> {label: 0/1} from the CSV."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        with self.csv.open(newline="") as fh:
            for row in csv.DictReader(fh):
                image, _, label = row["ID"].rpartition("_")
                if label not in LABELS or not image:
                    raise DatasetError(f"{self.csv}: bad ID {row['ID']!r} (expected ID_<image>_<label>)")
                out[image][label] = int(row["Label"])
        return dict(out)

    @cached_property
    def _exams(self) -> dict[str, list[dict]]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for p in sorted(self.images.glob("*.dcm")):
            h = read_header(p)
            if h is None:
                continue
            groups[f"{h['StudyInstanceUID']}_{h['SeriesInstanceUID']}"].append(h)
        return {k: sort_slices(v) for k, v in sorted(groups.items())}

    def ids(self) -> list[str]:
        return list(self._exams)

    def _slice_labels(self, headers: list[dict]) -> np.ndarray:
        rows = []
        for h in headers:
            key = h["path"].stem
            lab = self.image_labels.get(key) or self.image_labels.get(str(h["SOPInstanceUID"]), {})
            rows.append(labels_vector(lab))
        return np.stack(rows).astype(np.uint8)

    def exam_labels(self, exam_id: str) -> np.ndarray:
        return self._slice_labels(self._exams[exam_id]).max(axis=0)

    def load(self, exam_id: str) -> Sample:
        headers = self._exams[exam_id]
        hu, ps, spacing = stack(headers, rsna_fix=True)
        sl = self._slice_labels(headers)
        return Sample(
            id=exam_id, hu=hu, pixel_spacing=ps, slice_spacing=spacing, exam_labels=sl.max(axis=0),
            slice_labels=sl, meta={"files": [str(h["path"]) for h in headers]},
        )
