"""CQ500 (qure.ai) layout: one folder per patient with several DICOM series, and ``reads.csv``.

Labels are exam-level reads by three radiologists (``R1:ICH``, ``R1:EDH``... ``R3:SAH``); a label
is positive when at least two of the three readers marked it. Per patient the reader picks one
head series: soft-tissue kernel (no bone/sharp kernel or "BONE" in the description), at least
``min_slices`` slices, slice spacing closest to 5 mm.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from functools import cached_property
from pathlib import Path

import numpy as np

from triage.datasets.base import Dataset, DatasetError, Sample
from triage.datasets.dicomio import normal_position, read_header, sort_slices, stack

READ_COLUMNS = {"ICH": "any", "EDH": "epidural", "IPH": "intraparenchymal", "IVH": "intraventricular",
                "SAH": "subarachnoid", "SDH": "subdural"}
BONE_WORDS = ("BONE", "SHARP", "LUNG", "EDGE", "H70", "H60", "B70", "B60", "YC")
_NUM = re.compile(r"(\d+)\s*$")


def _number(name: str) -> int | None:
    m = _NUM.search(name.replace("-", " ").strip())
    return int(m.group(1)) if m else None


def find_reads(root: Path) -> Path | None:
    for name in ("reads.csv", "cq500_reads.csv"):
        if (root / name).is_file():
            return root / name
    return None


class CQ500Dataset(Dataset):
    format = "cq500"

    def __init__(self, root: str | Path, min_slices: int = 16) -> None:
        super().__init__(root)
        reads = find_reads(self.root)
        if reads is None:
            raise DatasetError(f"{self.root}: no reads.csv (CQ500 layout)")
        self.reads_csv = reads
        self.min_slices = min_slices

    @cached_property
    def reads(self) -> dict[int, np.ndarray]:
        """patient number -> exam labels by majority of three readers."""
        out: dict[int, np.ndarray] = {}
        with self.reads_csv.open(newline="") as fh:
            for row in csv.DictReader(fh):
                num = _number(row.get("name") or row.get("Name") or "")
                if num is None:
                    continue
                vec = np.zeros(6, np.uint8)
                for col, label in READ_COLUMNS.items():
                    votes = sum(int(float(row.get(f"R{r}:{col}", 0) or 0)) for r in (1, 2, 3))
                    vec[["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid",
                         "subdural"].index(label)] = int(votes >= 2)
                out[num] = vec
        return out

    @cached_property
    def patients(self) -> dict[str, Path]:
        """exam id ("CQ500-CT-<n>") -> patient folder, for patients that have reads."""
        out = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            num = _number(d.name.split()[0])
            if num is not None and num in self.reads:
                out[f"CQ500-CT-{num}"] = d
        return dict(sorted(out.items(), key=lambda kv: _number(kv[0]) or 0))

    def ids(self) -> list[str]:
        return list(self.patients)

    def exam_labels(self, exam_id: str) -> np.ndarray:
        return self.reads[_number(exam_id)]  # type: ignore[index]

    def choose_series(self, exam_id: str) -> list[dict]:
        """Headers of the chosen head series, sorted along the normal."""
        series: dict[str, list[dict]] = defaultdict(list)
        for p in sorted(self.patients[exam_id].rglob("*")):
            if p.is_file():
                h = read_header(p)
                if h is not None and str(h.get("Modality") or "CT") == "CT":
                    series[str(h["SeriesInstanceUID"])].append(h)
        best, best_score = None, float("inf")
        for headers in series.values():
            h0 = headers[0]
            text = f"{h0.get('ConvolutionKernel') or ''} {h0.get('SeriesDescription') or ''}".upper()
            itype = [str(x).upper() for x in (h0.get("ImageType") or [])]
            if len(headers) < self.min_slices or any(w in text for w in BONE_WORDS) or "LOCALIZER" in itype:
                continue
            pos = sorted(normal_position(h) for h in headers)
            spacing = float(np.median(np.diff(pos))) if len(pos) > 1 else 0.0
            score = abs(spacing - 5.0)
            if score < best_score:
                best, best_score = headers, score
        if best is None:
            raise DatasetError(f"{exam_id}: no soft-tissue head series with >= {self.min_slices} slices")
        return sort_slices(best)

    def load(self, exam_id: str) -> Sample:
        headers = self.choose_series(exam_id)
        hu, ps, spacing = stack(headers)
        return Sample(
            id=exam_id, hu=hu, pixel_spacing=ps, slice_spacing=spacing, exam_labels=self.exam_labels(exam_id),
            meta={"series_uid": str(headers[0]["SeriesInstanceUID"]),
                  "series_description": str(headers[0].get("SeriesDescription") or "")},
        )
