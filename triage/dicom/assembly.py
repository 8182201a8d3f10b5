"""Build a :class:`~triage.imaging.volume.Volume` (HU) from the files of one series.

Slices are sorted by their position along the slice normal (row × column direction cosines,
dotted with ImagePositionPatient), never by instance number or file name. Pixel data in any
transfer syntax the node accepts is decoded by pydicom with the pylibjpeg / pyjpegls plugins.
Enhanced CT (multi-frame) instances contribute one slice per frame.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread

from triage.dicom.header import normal_of, tilt_from_normal
from triage.dicom.selection import spacing_stats
from triage.imaging.volume import Volume

GEOMETRY_TOLERANCE = 1e-3  # direction cosines / pixel spacing agreement


class AssemblyError(ValueError):
    """The files do not form one consistent volume; the message says why."""


def _frame_item(ds: Dataset, index: int, seq: str) -> Dataset | None:
    """The functional group ``seq`` of frame ``index`` (per-frame first, then shared)."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[index] if len(groups) > 1 or index == 0 else groups[0]
        if seq in item and item.get(seq):
            return item.get(seq)[0]
    return None


def _slices_of(ds: Dataset, path: str) -> list[dict[str, Any]]:
    """Per-slice geometry and rescale of one dataset (one entry per frame)."""
    frames = int(ds.get("NumberOfFrames") or 1)
    multi = "PerFrameFunctionalGroupsSequence" in ds
    out = []
    for f in range(frames):
        if multi:
            pos = _frame_item(ds, f, "PlanePositionSequence")
            ori = _frame_item(ds, f, "PlaneOrientationSequence")
            meas = _frame_item(ds, f, "PixelMeasuresSequence")
            pvt = _frame_item(ds, f, "PixelValueTransformationSequence")
            ipp = pos.get("ImagePositionPatient") if pos else None
            iop = (ori.get("ImageOrientationPatient") if ori else None) or ds.get("ImageOrientationPatient")
            spacing = meas.get("PixelSpacing") if meas else None
            thickness = meas.get("SliceThickness") if meas else None
            slope = pvt.get("RescaleSlope", 1) if pvt else 1
            intercept = pvt.get("RescaleIntercept", 0) if pvt else 0
        else:
            ipp = ds.get("ImagePositionPatient")
            iop = ds.get("ImageOrientationPatient")
            spacing = ds.get("PixelSpacing")
            thickness = ds.get("SliceThickness")
            slope = ds.get("RescaleSlope", 1)
            intercept = ds.get("RescaleIntercept", 0)
        if ipp is None or iop is None or spacing is None:
            raise AssemblyError(f"{os.path.basename(path)} frame {f + 1}: ImagePositionPatient, "
                                "ImageOrientationPatient or PixelSpacing missing")
        out.append({
            "frame": f,
            "ipp": np.asarray([float(v) for v in ipp]),
            "iop": np.asarray([float(v) for v in iop]),
            "spacing": (float(spacing[0]), float(spacing[1])),
            "thickness": float(thickness) if thickness not in (None, "") else None,
            "slope": float(slope if slope not in (None, "") else 1),
            "intercept": float(intercept if intercept not in (None, "") else 0),
        })
    return out


def load_volume(paths: Sequence[str | os.PathLike[str]]) -> tuple[Volume, list[Dataset]]:
    """Decode a series into a HU volume sorted along the slice normal.

    Returns the volume and the source headers (pixel data removed) in slice order; a
    multi-frame instance appears once per frame. Raises :class:`AssemblyError` on unreadable
    files, missing pixel data, or inconsistent geometry (orientation, matrix, pixel spacing,
    duplicate positions). Uneven spacing and suspected missing slices are kept and recorded
    in ``Volume.meta``.
    """
    if not paths:
        raise AssemblyError("no files to assemble")
    slices: list[dict[str, Any]] = []
    for p in paths:
        name = os.path.basename(str(p))
        try:
            ds = dcmread(p)
        except Exception as exc:
            raise AssemblyError(f"{name}: not readable as DICOM ({exc})") from exc
        if "PixelData" not in ds:
            raise AssemblyError(f"{name}: no pixel data")
        try:
            pixels = ds.pixel_array
        except Exception as exc:
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
            raise AssemblyError(f"{name}: pixel data cannot be decoded (transfer syntax {ts}): {exc}") from exc
        frames = _slices_of(ds, str(p))
        if pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.ndim != 3 or pixels.shape[0] != len(frames):
            raise AssemblyError(f"{name}: unexpected pixel array shape {pixels.shape} (colour images?)")
        del ds.PixelData
        for fr, arr in zip(frames, pixels, strict=True):
            fr.update(pixels=arr, header=ds, path=str(p), sop=str(ds.SOPInstanceUID))
            slices.append(fr)

    ref = slices[0]
    shape = ref["pixels"].shape
    for sl in slices[1:]:
        name = os.path.basename(sl["path"])
        if not np.allclose(sl["iop"], ref["iop"], atol=GEOMETRY_TOLERANCE):
            raise AssemblyError(f"{name}: ImageOrientationPatient differs from the first slice")
        if sl["pixels"].shape != shape:
            raise AssemblyError(f"{name}: matrix {sl['pixels'].shape} differs from {shape}")
        if not np.allclose(sl["spacing"], ref["spacing"], atol=GEOMETRY_TOLERANCE):
            raise AssemblyError(f"{name}: PixelSpacing {sl['spacing']} differs from {ref['spacing']}")
    try:
        normal = normal_of(list(ref["iop"]))
    except ValueError as exc:
        raise AssemblyError(str(exc)) from exc
    for sl in slices:
        sl["z"] = float(np.dot(normal, sl["ipp"]))
    slices.sort(key=lambda s: s["z"])
    z = np.array([s["z"] for s in slices])
    gaps = np.diff(z)
    if gaps.size and float(gaps.min()) < 0.01:
        i = int(np.argmin(gaps))
        raise AssemblyError(f"two slices at the same position ({slices[i]['sop']} and {slices[i + 1]['sop']}): "
                            "several volumes in one series?")
    thickness = [s["thickness"] for s in slices if s["thickness"]]
    stats = spacing_stats(list(z), thickness)
    hu = np.empty((len(slices), *shape), dtype=np.float32)
    for i, sl in enumerate(slices):
        hu[i] = sl["pixels"].astype(np.float32) * sl["slope"] + sl["intercept"]
    tilt = tilt_from_normal(normal)
    gantry = ref["header"].get("GantryDetectorTilt")
    median = float(np.median(gaps)) if gaps.size else float(thickness[0] if thickness else 1.0)
    deviation = float(np.max(np.abs(gaps - median)) / median) if gaps.size and median else 0.0
    meta: dict[str, Any] = {
        "tilt_deg": round(tilt, 3),
        "gantry_tilt_deg": float(gantry) if gantry not in (None, "") else None,
        "spacing_mm": {"median": stats["median"], "min": stats["min"], "max": stats["max"]},
        "spacing_deviation": round(deviation, 4),
        "uneven_spacing": deviation > 0.25,
        "missing_slices": stats["missing"],
        "slices": len(slices),
        "normal": [round(float(v), 6) for v in normal],
    }
    volume = Volume(
        hu=hu,
        pixel_spacing=ref["spacing"],
        slice_spacing=median,
        positions=np.stack([s["ipp"] for s in slices]),
        orientation=tuple(float(v) for v in ref["iop"]),  # type: ignore[arg-type]
        sop_instance_uids=[s["sop"] for s in slices],
        slice_thickness=float(np.median(thickness)) if thickness else None,
        tilt_deg=tilt,
        spacings=[float(g) for g in gaps],
        meta=meta,
    )
    return volume, [s["header"] for s in slices]


def load_series_dir(directory: str | os.PathLike[str]) -> tuple[Volume, list[Dataset]]:
    """Convenience: :func:`load_volume` on every ``*.dcm`` file (or every file) in a folder."""
    d = Path(directory)
    files = sorted(d.glob("*.dcm")) or sorted(p for p in d.iterdir() if p.is_file())
    return load_volume(files)
