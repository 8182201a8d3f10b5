"""Which series the model may see: non-contrast axial head CT of usable geometry.

The rules read the headers the receiver recorded (``Instance.meta``, see
:mod:`triage.dicom.header`); nothing is decoded. Each rejection names its reason in plain words
for the administrator (it is shown on the study page and in the audit trail).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from triage.config import Settings
from triage.dicom.header import CT_CLASSES, normal_of, tilt_from_normal

_NO_CONTRAST = {"", "NONE", "NO", "N/A", "NA", "-", "0", "NON", "WITHOUT"}
# The smallest matrix analysed: a head CT slice is 512 x 512 (sometimes 256 or 768); below 64 x 64
# there is no head to see (8 x 8 or 1 x 4096 series are malformed, not small heads).
MIN_MATRIX = 64


@dataclass
class SelectionResult:
    """``ok``: process the series; ``reason``: why not (or notes); ``meta``: geometry found."""

    ok: bool
    reason: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _has_keyword(text: str, keywords: Iterable[str]) -> str | None:
    """The first keyword found in ``text`` as a word prefix (``BONE`` matches ``BONEPLUS``,
    ``CTA`` does not match ``ACUTA``)."""
    upper = text.upper()
    for kw in keywords:
        if kw and re.search(r"(?<![A-Z0-9])" + re.escape(kw), upper):
            return kw
    return None


_GEOMETRY_FIELDS = {
    "ipp": "ImagePositionPatient", "frame_ipps": "ImagePositionPatient", "iop": "ImageOrientationPatient",
    "pixel_spacing": "PixelSpacing", "thickness": "SliceThickness", "slope": "RescaleSlope",
    "intercept": "RescaleIntercept",
}


def _non_finite(metas: Sequence[dict[str, Any]]) -> str | None:
    """The attribute holding a NaN/infinity in any instance, if one does. The receiver refuses
    these (0xC214); rows recorded before it did are skipped here rather than computed with."""
    def numbers(value: Any) -> Iterable[Any]:
        if isinstance(value, list | tuple):
            for v in value:
                yield from numbers(v)
        elif value is not None:
            yield value

    for m in metas:
        for key, name in _GEOMETRY_FIELDS.items():
            for v in numbers(m.get(key)):
                if isinstance(v, float) and not math.isfinite(v):
                    return name
    return None


def slice_positions(metas: Sequence[dict[str, Any]], normal: np.ndarray) -> list[float]:
    """Positions of every slice (frame) along ``normal``."""
    out: list[float] = []
    for m in metas:
        ipps = m.get("frame_ipps") or ([m["ipp"]] if m.get("ipp") else [])
        out.extend(float(np.dot(normal, np.asarray(p, dtype=float))) for p in ipps if p)
    return out


def spacing_stats(positions: Sequence[float], thickness: Sequence[float] = ()) -> dict[str, Any]:
    """Gaps between neighbouring slices: min/max/median, duplicates and suspected missing slices.

    A gap is a missing slice when it exceeds 1.5 × the larger of the median gap and the
    nominal thickness (so a scan that changes from 4 mm to 7 mm slices is not flagged).
    """
    pos = sorted(positions)
    gaps = np.diff(pos) if len(pos) > 1 else np.array([])
    if gaps.size == 0:
        return {"count": len(pos), "median": None, "min": None, "max": None, "duplicates": 0, "missing": []}
    median = float(np.median(gaps))
    ref = max(median, max(thickness) if thickness else 0.0)
    missing = [{"after_index": int(i), "gap_mm": round(float(g), 3)} for i, g in enumerate(gaps) if g > 1.5 * ref]
    return {
        "count": len(pos),
        "median": round(median, 4),
        "min": round(float(gaps.min()), 4),
        "max": round(float(gaps.max()), 4),
        "duplicates": int(np.sum(gaps < 0.01)),
        "missing": missing,
    }


def select_series(
    settings: Settings, metas: Sequence[dict[str, Any]], sop_classes: Sequence[str] = ()
) -> SelectionResult:
    """Apply the ``selection_*`` rules to the recorded instance metadata of one series.

    ``sop_classes`` (same order as ``metas``) lets non-image instances in the series be
    ignored; when omitted every instance is taken as a CT image.
    """
    s = settings
    if not metas:
        return SelectionResult(False, "series has no instances")
    if sop_classes:
        images = [m for m, c in zip(metas, sop_classes, strict=True) if c in CT_CLASSES]
        if not images:
            classes = sorted(set(sop_classes))
            return SelectionResult(False, f"no CT image instances (SOP classes: {', '.join(classes)})")
    else:
        images = list(metas)
    first = images[0]
    meta: dict[str, Any] = {}

    modality = (first.get("modality") or "").upper()
    if modality not in s.selection_modalities:
        return SelectionResult(False, f"modality {modality or '(none)'} is not one of "
                                      f"{', '.join(s.selection_modalities)}")

    image_types = {t for m in images for t in (m.get("image_type") or [])}
    if "LOCALIZER" in image_types:
        return SelectionResult(False, "localizer (scout) images: ImageType contains LOCALIZER")

    series_desc = first.get("series_description") or ""
    texts = [series_desc, first.get("study_description") or "", first.get("protocol") or "",
             first.get("requested_procedure") or ""]
    excluded = _has_keyword(series_desc, s.selection_exclude_keywords) or _has_keyword(
        first.get("protocol") or "", s.selection_exclude_keywords)
    if excluded:
        return SelectionResult(False, f"series description/protocol {series_desc!r} matches excluded keyword "
                                      f"{excluded!r}")

    # The series' own BodyPartExamined wins: a chest series in a study described "CT HEAD" is
    # not a head. Only a series without one falls back to the descriptions.
    body_part = (first.get("body_part") or "").upper()
    if body_part:
        if body_part not in s.selection_body_parts and not _has_keyword(body_part, s.selection_head_keywords):
            return SelectionResult(False, f"body part {body_part} is not a head (the series' BodyPartExamined "
                                          "decides, whatever the descriptions say)")
    elif not _has_keyword(" | ".join(texts), s.selection_head_keywords):
        return SelectionResult(False, "not a head study: no head body part and no head keyword in the series, "
                                      "study or protocol description")
    meta["body_part"] = body_part

    matrices = {(m.get("rows"), m.get("cols")) for m in images}
    if len(matrices) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(matrices, key=str))
        return SelectionResult(False, f"mixed matrix sizes in one series ({shown})", meta)
    ((rows, cols),) = matrices
    if not isinstance(rows, int) or not isinstance(cols, int):
        return SelectionResult(False, "Rows/Columns not recorded for the images", meta)
    if rows < MIN_MATRIX or cols < MIN_MATRIX:
        return SelectionResult(False, f"matrix {rows}x{cols} is smaller than the {MIN_MATRIX}x{MIN_MATRIX} "
                                      "minimum of a head CT slice", meta)
    meta["matrix"] = [rows, cols]

    contrasts = {(m.get("contrast") or "").strip().upper() for m in images} - _NO_CONTRAST
    if contrasts:
        return SelectionResult(False, f"contrast agent given ({', '.join(sorted(contrasts))}): "
                                      "only non-contrast CT is analysed")

    kernels = {(m.get("kernel") or "").upper() for m in images}
    meta["kernels"] = sorted(kernels)
    if kernels and all(k and _has_keyword(k, s.selection_bone_kernels) for k in kernels):
        return SelectionResult(False, f"bone/sharp reconstruction kernel only ({', '.join(sorted(kernels))})",
                               meta)

    bad = _non_finite(images)
    if bad:
        return SelectionResult(False, f"non-finite {bad} (NaN or infinity) on some images", meta)
    iops = [tuple(round(v, 3) for v in m["iop"]) for m in images if m.get("iop")]
    if len(iops) != len(images):
        return SelectionResult(False, "ImageOrientationPatient missing on some images", meta)
    if len(set(iops)) > 1:
        return SelectionResult(False, f"mixed orientations in one series ({len(set(iops))} different)", meta)
    try:
        normal = normal_of(list(images[0]["iop"]))
    except ValueError as exc:
        return SelectionResult(False, str(exc), meta)
    tilt = tilt_from_normal(normal)
    gantry = [m.get("gantry_tilt") for m in images if m.get("gantry_tilt") is not None]
    meta["tilt_deg"] = round(tilt, 3)
    meta["gantry_tilt_deg"] = gantry[0] if gantry else None
    if tilt > s.selection_max_tilt_deg:
        return SelectionResult(False, f"not axial: slice normal is {tilt:.1f}° from the patient axis "
                                      f"(limit {s.selection_max_tilt_deg:g}°)", meta)

    thick = [float(m["thickness"]) for m in images if m.get("thickness")]
    if thick:
        med_t = statistics.median(thick)
        meta["thickness_mm"] = {"median": med_t, "min": min(thick), "max": max(thick)}
        if not s.selection_min_thickness_mm <= med_t <= s.selection_max_thickness_mm:
            return SelectionResult(False, f"slice thickness {med_t:g} mm outside "
                                          f"{s.selection_min_thickness_mm:g}–{s.selection_max_thickness_mm:g} mm",
                                   meta)
    else:
        meta["thickness_mm"] = None

    positions = slice_positions(images, normal)
    if len(positions) != sum(int(m.get("frames") or 1) for m in images):
        return SelectionResult(False, "ImagePositionPatient missing on some images", meta)
    stats = spacing_stats(positions, thick)
    meta["slices"] = stats["count"]
    meta["spacing_mm"] = {k: stats[k] for k in ("median", "min", "max")}
    meta["missing_slices"] = stats["missing"]
    if stats["count"] < s.selection_min_slices:
        return SelectionResult(False, f"{stats['count']} slices, fewer than the minimum {s.selection_min_slices}",
                               meta)
    if stats["duplicates"]:
        return SelectionResult(False, f"{stats['duplicates']} duplicate slice positions (several volumes in one "
                                      "series?)", meta)
    median = stats["median"] or 0.0
    deviation = max(abs(stats["max"] - median), abs(median - stats["min"])) / median if median else 0.0
    uneven = deviation > s.selection_spacing_tolerance
    meta["uneven_spacing"] = uneven
    meta["spacing_deviation"] = round(deviation, 4)
    notes = []
    if uneven:
        if not s.selection_allow_uneven_spacing:
            return SelectionResult(False, f"uneven slice spacing {stats['min']:g}–{stats['max']:g} mm "
                                          f"(median {median:g} mm)", meta)
        notes.append(f"uneven slice spacing {stats['min']:g}–{stats['max']:g} mm")
    if stats["missing"]:
        notes.append(f"{len(stats['missing'])} gap(s) suggesting missing slices")
    if tilt > 0.5:
        notes.append(f"tilted {tilt:.1f}°")
    return SelectionResult(True, "; ".join(notes), meta)


def is_stat(settings: Settings, metas: Sequence[dict[str, Any]]) -> str | None:
    """The STAT keyword found in descriptions, requested procedure or priority tags, if any."""
    if not metas:
        return None
    m = metas[0]
    text = " | ".join(str(m.get(k) or "") for k in ("study_description", "series_description",
                                                    "requested_procedure", "priority", "protocol"))
    return _has_keyword(text, settings.stat_keywords)
