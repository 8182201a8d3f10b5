"""Build a :class:`~triage.imaging.volume.Volume` (HU) from the files of one series.

Slices are sorted by their position along the slice normal (row × column direction cosines,
dotted with ImagePositionPatient), never by instance number or file name. Pixel data in any
transfer syntax the node accepts is decoded by pydicom with the pylibjpeg / pyjpegls plugins.
Enhanced CT (multi-frame) instances contribute one slice per frame.
"""

from __future__ import annotations

import math
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
DEFER_BYTES = 64 * 1024  # elements larger than this (pixel data) stay on disk until decoded


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


def _instance_number(sl: dict[str, Any]) -> str | None:
    """``InstanceNumber`` of a slice's source instance (``5 fr 3`` for frame 3 of a multi-frame
    one), None when it has none."""
    value = sl["header"].get("InstanceNumber")
    if value in (None, ""):
        return None
    try:
        text = str(int(value))
    except (TypeError, ValueError):
        return None
    return f"{text} fr {sl['frame'] + 1}" if sl.get("frames", 1) > 1 else text


def _read_header(p: str | os.PathLike[str]) -> Dataset:
    """The dataset with its pixel data left on disk (read on demand by ``pixel_array``)."""
    name = os.path.basename(str(p))
    try:
        ds = dcmread(p, defer_size=DEFER_BYTES)
    except Exception as exc:
        raise AssemblyError(f"{name}: not readable as DICOM ({exc})") from exc
    if "PixelData" not in ds:
        raise AssemblyError(f"{name}: no pixel data")
    return ds


def _drop_pixels(ds: Dataset) -> None:
    """Forget the pixel data and pydicom's decoded copy of it."""
    if "PixelData" in ds:
        del ds.PixelData


def _decode(ds: Dataset, path: str, frames: int, shape: tuple[int, int]) -> np.ndarray:
    """All frames of one dataset as an array (frames, rows, columns)."""
    name = os.path.basename(path)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise AssemblyError(f"{name}: pixel data cannot be decoded (transfer syntax {ts}): {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] != frames or pixels.shape[1:] != shape:
        raise AssemblyError(f"{name}: unexpected pixel array shape {pixels.shape} (colour images?)")
    return pixels


def load_volume(paths: Sequence[str | os.PathLike[str]],
                max_slices: int | None = None) -> tuple[Volume, list[Dataset]]:
    """Decode a series into a HU volume sorted along the slice normal.

    Returns the volume and the source headers (pixel data removed) in slice order; a
    multi-frame instance appears once per frame. Raises :class:`AssemblyError` on unreadable
    files, missing pixel data, or inconsistent geometry (orientation, matrix, pixel spacing,
    duplicate positions). Uneven spacing and suspected missing slices are kept and recorded
    in ``Volume.meta``.

    Memory is bounded: the headers are read first (pixel data stays on disk), then slices are
    decoded one at a time into the output. With ``max_slices``, a series of more slices is read as
    ``ceil(n / max_slices)``-slice slabs (consecutive slices averaged, like a thicker
    reconstruction); each slab stands at its middle slice, whose header and SOP Instance UID the
    results reference. ``Volume.meta["slab"]`` then records the slab size and the source count.
    """
    if not paths:
        raise AssemblyError("no files to assemble")
    slices: list[dict[str, Any]] = []
    for p in paths:
        ds = _read_header(p)
        for fr in _slices_of(ds, str(p)):
            fr.update(header=ds, path=str(p), sop=str(ds.SOPInstanceUID),
                      shape=(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)),
                      frames=int(ds.get("NumberOfFrames") or 1))
            slices.append(fr)

    ref = slices[0]
    shape = ref["shape"]
    for sl in slices[1:]:
        name = os.path.basename(sl["path"])
        if not np.allclose(sl["iop"], ref["iop"], atol=GEOMETRY_TOLERANCE):
            raise AssemblyError(f"{name}: ImageOrientationPatient differs from the first slice")
        if sl["shape"] != shape:
            raise AssemblyError(f"{name}: matrix {sl['shape']} differs from {shape}")
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
    n_source = len(slices)
    slab = max(1, math.ceil(n_source / max_slices)) if max_slices else 1
    groups = [slices[i:i + slab] for i in range(0, n_source, slab)]
    hu = np.empty((len(groups), *shape), dtype=np.float32)
    cache: tuple[int, np.ndarray] | None = None  # the decoded frames of the last multi-frame dataset
    for gi, group in enumerate(groups):
        acc = hu[gi]
        acc.fill(0.0)
        for sl in group:
            ds = sl["header"]
            if cache is not None and cache[0] == id(ds):
                frames = cache[1]
            else:
                frames = _decode(ds, sl["path"], sl["frames"], shape)
                cache = (id(ds), frames) if sl["frames"] > 1 else None
            acc += frames[sl["frame"]].astype(np.float32) * sl["slope"] + sl["intercept"]
            if sl["frames"] == 1:
                _drop_pixels(ds)  # headers only from here on (multi-frame: at the end)
        if len(group) > 1:
            acc /= len(group)
    cache = None
    for sl in slices:
        _drop_pixels(sl["header"])
    kept = [g[len(g) // 2] for g in groups]  # each slab stands at its middle slice
    kz = np.array([s["z"] for s in kept])
    kgaps = np.diff(kz)
    tilt = tilt_from_normal(normal)
    gantry = ref["header"].get("GantryDetectorTilt")
    median = float(np.median(kgaps)) if kgaps.size else float(thickness[0] if thickness else 1.0)
    src_median = float(np.median(gaps)) if gaps.size else median
    deviation = float(np.max(np.abs(gaps - src_median)) / src_median) if gaps.size and src_median else 0.0
    meta: dict[str, Any] = {
        "tilt_deg": round(tilt, 3),
        "gantry_tilt_deg": float(gantry) if gantry not in (None, "") else None,
        "spacing_mm": {"median": stats["median"], "min": stats["min"], "max": stats["max"]},
        "spacing_deviation": round(deviation, 4),
        "uneven_spacing": deviation > 0.25,
        "missing_slices": stats["missing"],
        "slices": len(kept),
        "normal": [round(float(v), 6) for v in normal],
        # the source's numbering of each kept slice, for captions a reader can find in the PACS
        "instance_numbers": [_instance_number(s) for s in kept],
    }
    if slab > 1:
        meta["slab"] = {"slices_per_slab": slab, "source_slices": n_source, "max_slices": max_slices}
    volume = Volume(
        hu=hu,
        pixel_spacing=ref["spacing"],
        slice_spacing=median,
        positions=np.stack([s["ipp"] for s in kept]),
        orientation=tuple(float(v) for v in ref["iop"]),  # type: ignore[arg-type]
        sop_instance_uids=[s["sop"] for s in kept],
        slice_thickness=(float(np.median(thickness)) * slab if slab > 1 else float(np.median(thickness)))
        if thickness else None,
        tilt_deg=tilt,
        spacings=[float(g) for g in kgaps],
        meta=meta,
    )
    return volume, [s["header"] for s in kept]


def load_series_dir(directory: str | os.PathLike[str]) -> tuple[Volume, list[Dataset]]:
    """Convenience: :func:`load_volume` on every ``*.dcm`` file (or every file) in a folder."""
    d = Path(directory)
    files = sorted(d.glob("*.dcm")) or sorted(p for p in d.iterdir() if p.is_file())
    return load_volume(files)
