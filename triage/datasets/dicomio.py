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


def _rsna_wrapped(ds: pydicom.Dataset) -> bool:
    return (int(ds.get("BitsStored", 16)) == 12 and int(ds.get("PixelRepresentation", 0)) == 0
            and float(ds.get("RescaleIntercept", 0) or 0) > -100)


def fix_rsna_wrap(hu: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Repair one slice of the RSNA 2019 files stored as 12-bit unsigned with a wrong intercept
    (values wrapped at 4096), as described by the challenge's participants."""
    if not _rsna_wrapped(ds):
        return hu
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    px = (hu - intercept) / slope + 1000
    px[px >= 4096] -= 4096
    return px * slope - 1000


def stack(headers: list[dict[str, Any]], rsna_fix: bool = False) -> tuple[np.ndarray, tuple[float, float], float]:
    """HU volume (Z, Y, X), pixel spacing and median slice spacing of one series, built by the node's
    assembler (:func:`triage.dicom.assembly.load_volume`: the worker's sorting, geometry checks and
    rescale), so training and serving read DICOM the same way."""
    from triage.dicom.assembly import load_volume

    volume, sources = load_volume([h["path"] for h in headers])
    hu = volume.hu
    if rsna_fix:
        for i, ds in enumerate(sources):
            hu[i] = fix_rsna_wrap(hu[i], ds)
    return hu, volume.pixel_spacing, float(volume.slice_spacing)
