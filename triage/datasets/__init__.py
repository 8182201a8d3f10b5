"""Datasets for training and evaluation: one interface (:class:`Dataset` of :class:`Sample`),
readers for the phantom's own format, RSNA 2019, CQ500, PhysioNet CT-ICH and
slice sets (labelled windowed PNG slices, :mod:`triage.datasets.slices`).

``open_dataset(path, format="auto")`` detects the layout.
"""

from __future__ import annotations

from pathlib import Path

from triage.datasets.base import Dataset, DatasetError, Sample

FORMATS = ("phantom", "rsna", "cq500", "ctich", "slices")


def detect_format(path: str | Path) -> str:
    from triage.datasets.cq500 import find_reads
    from triage.datasets.ctich import find_csv
    from triage.datasets.rsna import find_rsna

    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
    if (root / "manifest.json").is_file():
        return "phantom"
    from triage.datasets.slices import is_slice_set

    if is_slice_set(root):
        return "slices"
    if find_rsna(root):
        return "rsna"
    if (root / "ct_scans").is_dir() and find_csv(root):
        return "ctich"
    if find_reads(root):
        return "cq500"
    raise DatasetError(
        f"{root}: unknown dataset layout (expected a phantom manifest.json, RSNA stage_2_train/ + CSV, "
        "CT-ICH ct_scans/ + hemorrhage_diagnosis_raw_ct.csv, or CQ500 reads.csv, or a slice set labels.csv + images/)"
    )


def open_dataset(path: str | Path, format: str = "auto") -> Dataset:
    """Open a dataset folder; ``format`` is one of FORMATS or "auto"."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "phantom":
        from triage.datasets.phantom import PhantomDataset

        return PhantomDataset(path)
    if fmt == "rsna":
        from triage.datasets.rsna import RSNADataset

        return RSNADataset(path)
    if fmt == "cq500":
        from triage.datasets.cq500 import CQ500Dataset

        return CQ500Dataset(path)
    if fmt == "ctich":
        from triage.datasets.ctich import CTICHDataset

        return CTICHDataset(path)
    if fmt == "slices":
        from triage.datasets.slices import SlicesDataset

        return SlicesDataset(path)
    raise DatasetError(f"unknown dataset format {fmt!r} (known: {', '.join(FORMATS)})")


__all__ = ["Dataset", "DatasetError", "Sample", "open_dataset", "detect_format", "FORMATS"]
