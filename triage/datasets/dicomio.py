"""Small DICOM helpers for dataset readers: header index and HU stacks sorted along the normal."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

HEADER_TAGS = [
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "ConvolutionKernel", "ImageType", "SeriesDescription", "BodyPartExamined",
    "Modality", "Rows", "Columns",
]


def read_header(path: Path) -> dict[str, Any] | None:
    """Selected header fields without pixels; None when the file is not DICOM."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except Exception:
        return None
    h = {k: ds.get(k) for k in HEADER_TAGS}
    h["path"] = path
    return h


def normal_position(h: dict[str, Any]) -> float:
    iop = [float(x) for x in (h.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0])]
    ipp = [float(x) for x in (h.get("ImagePositionPatient") or [0, 0, 0])]
    return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))


def sort_slices(headers: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(headers, key=normal_position)


def slice_hu(ds: pydicom.Dataset, rsna_fix: bool = False) -> np.ndarray:
    """Pixel data in HU. ``rsna_fix`` repairs the RSNA 2019 files stored as 12-bit unsigned with a
    wrong intercept (values wrapped at 4096), as described by the challenge's participants."""
    px = ds.pixel_array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if rsna_fix and int(ds.get("BitsStored", 16)) == 12 and int(ds.get("PixelRepresentation", 0)) == 0 \
            and intercept > -100:
        px += 1000
        px[px >= 4096] -= 4096
        intercept = -1000
    return px * slope + intercept


def stack(headers: list[dict[str, Any]], rsna_fix: bool = False) -> tuple[np.ndarray, tuple[float, float], float]:
    """HU volume (Z, Y, X) of already sorted slices, pixel spacing and median slice spacing."""
    vol = np.stack([slice_hu(pydicom.dcmread(h["path"]), rsna_fix) for h in headers]).astype(np.float32)
    ps = headers[0].get("PixelSpacing") or [1.0, 1.0]
    pos = [normal_position(h) for h in headers]
    gaps = np.diff(pos)
    spacing = float(np.median(gaps)) if len(gaps) else float(headers[0].get("SliceThickness") or 1.0)
    return vol, (float(ps[0]), float(ps[1])), spacing
