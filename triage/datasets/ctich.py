"""PhysioNet "Computed Tomography Images for Intracranial Hemorrhage Detection and Segmentation"
(CT-ICH): ``ct_scans/NNN.nii``, ``masks/NNN.nii`` and ``hemorrhage_diagnosis_raw_ct.csv`` (one row per
slice: PatientNumber, SliceNumber, Intraventricular, Intraparenchymal, Subarachnoid, Epidural,
Subdural, No_Hemorrhage). The masks mark blood without subtype: ``Sample.masks = {"any": ...}``.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from functools import cached_property
from pathlib import Path

import numpy as np

from triage.datasets.base import Dataset, DatasetError, Sample, labels_vector

CSV_COLUMNS = {"Intraventricular": "intraventricular", "Intraparenchymal": "intraparenchymal",
               "Subarachnoid": "subarachnoid", "Epidural": "epidural", "Subdural": "subdural"}


def find_csv(root: Path) -> Path | None:
    for name in ("hemorrhage_diagnosis_raw_ct.csv", "hemorrhage_diagnosis.csv"):
        if (root / name).is_file():
            return root / name
    return None


def _nii(d: Path, stem: str) -> Path | None:
    for ext in (".nii", ".nii.gz"):
        if (d / f"{stem}{ext}").is_file():
            return d / f"{stem}{ext}"
    return None


def to_lps_zyx(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, list[int], tuple[float, float, float]]:
    """Reorient a NIfTI array to (Z, Y, X) in the DICOM display convention.

    Returns the array, the original slice index of each output slice, and voxel sizes (z, y, x).
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)  # to RAS
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if int(ornt[2, 0]) != 2:
        raise DatasetError("CT-ICH volume is not axial (third axis is not superior-inferior)")
    ras = nib.orientations.apply_orientation(data, ornt)
    order = list(range(data.shape[2]))
    if ornt[2, 1] < 0:
        order = order[::-1]
    # RAS+ (+i toward the right, +j anterior) -> LPS display: flip i and j, then order (k, j, i)
    lps = ras[::-1, ::-1, :].transpose(2, 1, 0)
    sizes = {int(ornt[a, 0]): float(zooms[a]) for a in range(3)}
    return np.ascontiguousarray(lps), order, (sizes[2], sizes[1], sizes[0])


class CTICHDataset(Dataset):
    format = "ctich"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        c = find_csv(self.root)
        if c is None or not (self.root / "ct_scans").is_dir():
            raise DatasetError(f"{self.root}: expected ct_scans/, masks/ and hemorrhage_diagnosis_raw_ct.csv")
        self.csv = c

    @cached_property
    def slice_rows(self) -> dict[int, dict[int, np.ndarray]]:
        """patient -> slice number (1-based, file order) -> labels."""
        out: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
        with self.csv.open(newline="") as fh:
            for row in csv.DictReader(fh):
                vals = {label: int(float(row.get(col, 0) or 0)) for col, label in CSV_COLUMNS.items()}
                if "No_Hemorrhage" in row:
                    vals["any"] = int(not int(float(row["No_Hemorrhage"])) or any(vals.values()))
                out[int(row["PatientNumber"])][int(row["SliceNumber"])] = labels_vector(vals)
        return dict(out)

    def ids(self) -> list[str]:
        return [f"{n:03d}" for n in sorted(self.slice_rows) if _nii(self.root / "ct_scans", f"{n:03d}")]

    def exam_labels(self, exam_id: str) -> np.ndarray:
        rows = self.slice_rows[int(exam_id)]
        return np.stack(list(rows.values())).max(axis=0).astype(np.uint8)

    def load(self, exam_id: str) -> Sample:
        import nibabel as nib

        ct_path = _nii(self.root / "ct_scans", exam_id)
        if ct_path is None:
            raise KeyError(exam_id)
        img = nib.load(ct_path)
        hu, order, (sz, sy, sx) = to_lps_zyx(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        rows = self.slice_rows[int(exam_id)]
        sl = np.stack([rows.get(k + 1, np.zeros(6, np.uint8)) for k in order]).astype(np.uint8)
        masks = None
        mp = _nii(self.root / "masks", exam_id)
        if mp is not None:
            mimg = nib.load(mp)
            m, _, _ = to_lps_zyx(np.asarray(mimg.dataobj), mimg.affine)
            masks = {"any": m > 0}
        return Sample(id=exam_id, hu=hu.astype(np.float32), pixel_spacing=(sy, sx), slice_spacing=sz,
                      exam_labels=sl.max(axis=0), slice_labels=sl, masks=masks, meta={"path": str(ct_path)})
