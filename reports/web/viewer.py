"""The study page's series viewer: what the browser needs to scroll, window and overlay a series.

The browser (``static/viewer.js``) windows the slices itself: the server sends each stored slice
once as raw Hounsfield units (little-endian int16, ``/studies/{id}/viewer/slice/{instance_id}``),
so a window preset or a drag changes the picture without a round trip. Decoded slices are kept in
a process-wide LRU cache (:data:`CACHE_BYTES`).

* Slice order is the node's own (``triage.dicom.assembly``): by position along the slice normal
  (row × column direction cosines · ImagePositionPatient), so the result's key slices (indices
  into that order) land on the right image. Captions show the source's InstanceNumber and the
  position along the normal in mm, never an array index alone.
* A series read as averaged slabs (more than ``inference_max_slices`` slices) has key slices in
  slab units; each slab stands at its middle source slice, as in the assembly.
* The segmentation overlay comes from the SEG the node made for the current result: its frames
  (BINARY) are decoded once per object into one bitmask per source slice (bit ``n - 1`` for
  segment ``n``), sent per slice as bytes (``/viewer/overlay/{instance_id}``).
* The pipeline keeps the attention heatmap only in its key images (``summary["previews"]``), so the
  heatmap layer exists on those slices: what the overlay preview adds to the plain one, as a
  transparent PNG (``/viewer/heat/{n}``).

File paths come from the database (rows of the study asked for), never from the URL.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from reports.dicom.codes import COLORS
from reports.web import queries as q
from storage.models import Instance, Result, ResultObject, Series
from triage.dicom.header import CT_CLASSES, normal_of
from triage.labels import DISPLAY, LABELS, SHORT

CACHE_BYTES = 256 * 1024 * 1024  # decoded slices, overlays and heat layers kept per web process
_LABEL_BY_NAME = {DISPLAY[lb]: lb for lb in LABELS}
#: Window presets (width, level) in HU, in the order of the viewer's buttons.
PRESETS: tuple[tuple[str, int, int], ...] = (("Brain", 80, 40), ("Subdural", 200, 80), ("Bone", 2800, 600),
                                             ("Stroke", 40, 35))


class ByteLRU:
    """A thread-safe LRU cache bounded by the total size of its values (bytes)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._data: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.used -= len(old)
            self._data[key] = value
            self.used += len(value)
            while self.used > self.budget and len(self._data) > 1:
                _k, v = self._data.popitem(last=False)
                self.used -= len(v)


CACHE = ByteLRU(CACHE_BYTES)
SEG_CACHE_SIZE = 16  # decoded SEG objects kept per web process
_SEG_CACHE: OrderedDict[tuple[Any, ...], tuple[list[dict[str, Any]], dict[str, bytes]]] = OrderedDict()
_SEG_LOCK = threading.Lock()


# --------------------------------------------------------------------------- slice order
def _z(meta: dict[str, Any]) -> float | None:
    ipp, iop = meta.get("ipp"), meta.get("iop")
    if not ipp or not iop or len(ipp) != 3 or len(iop) != 6:
        return None
    try:
        return float(np.dot(normal_of(list(iop)), np.asarray(ipp, dtype=float)))
    except ValueError:
        return None


def _key(sop: str, frame: int | None) -> str:
    """How a slice is named in overlay maps: the SOP Instance UID, plus ``#frame`` for multi-frame."""
    return f"{sop}#{frame}" if frame else sop


def ordered_slices(s: Session, series_id: int) -> list[dict[str, Any]]:
    """The series' image slices in the node's slice order (along the normal; by instance number
    when the geometry is missing). A multi-frame (Enhanced CT) instance gives one slice per frame,
    placed by its per-frame position."""
    out: list[dict[str, Any]] = []
    for i in s.scalars(select(Instance).where(Instance.series_id == series_id)):
        meta = i.meta or {}
        if i.sop_class_uid not in CT_CLASSES and not meta.get("rows"):
            continue
        frames = int(meta.get("frames") or 1)
        base = {"id": i.id, "sop": i.sop_instance_uid, "number": i.instance_number,
                "rows": int(meta.get("rows") or 0), "cols": int(meta.get("cols") or 0),
                "pixel_spacing": meta.get("pixel_spacing")}
        if frames == 1:
            out.append({**base, "frame": None, "z": _z(meta)})
            continue
        ipps = meta.get("frame_ipps") or []
        for f in range(frames):
            ipp = ipps[f] if f < len(ipps) else None
            out.append({**base, "frame": f + 1, "z": _z({"ipp": ipp, "iop": meta.get("iop")})})
    if out and all(sl["z"] is not None for sl in out):
        out.sort(key=lambda sl: (sl["z"], sl["number"] or 0, sl["frame"] or 0))
    else:
        out.sort(key=lambda sl: (sl["number"] is None, sl["number"] or 0, sl["sop"], sl["frame"] or 0))
    return out


def slab_size(n_source: int, volume_depth: int | None) -> int:
    """Source slices per volume slice (1 unless the series was read as averaged slabs)."""
    if not volume_depth or volume_depth >= n_source:
        return 1
    return max(1, math.ceil(n_source / volume_depth))


def source_index(k: int, n_source: int, slab: int) -> int:
    """The source slice a volume index stands at: the middle of its slab (triage.dicom.assembly)."""
    start = k * slab
    size = max(1, min(slab, n_source - start))
    return max(0, min(n_source - 1, start + size // 2))


def _volume_depth(result: Result | None) -> int | None:
    shape = ((result.summary or {}).get("volume") or {}).get("shape") if result is not None else None
    return int(shape[0]) if isinstance(shape, list) and shape else None


def slice_label(sl: dict[str, Any], index: int, n: int) -> str:
    """A caption in the source's numbering: ``Im 124 (17/40) · z 85.0 mm`` (``Im 5 fr 3 ...`` for
    frame 3 of a multi-frame instance)."""
    text = f"Im {sl['number']}" if sl.get("number") is not None else "Im ?"
    if sl.get("frame"):
        text += f" fr {sl['frame']}"
    text += f" ({index + 1}/{n})"
    if sl.get("z") is not None:
        text += f" · z {sl['z']:.1f} mm"
    return text


def key_slice_captions(s: Session, result: Result | None) -> dict[int, str]:
    """Volume index -> caption in the source numbering, for the result's series (study page)."""
    if result is None:
        return {}
    slices = ordered_slices(s, result.series_id)
    if not slices:
        return {}
    slab = slab_size(len(slices), _volume_depth(result))
    wanted: set[int] = set()
    for ks in (result.key_slices or {}).values():
        wanted |= {int(k) for k in ks or [] if isinstance(k, int | float)}
    for p in (result.summary or {}).get("previews") or []:
        if isinstance(p, dict) and isinstance(p.get("slice"), int):
            wanted.add(int(p["slice"]))
    out = {}
    for k in wanted:
        i = source_index(k, len(slices), slab)
        out[k] = slice_label(slices[i], i, len(slices))
    return out


# --------------------------------------------------------------------------- manifest
def _series_of(s: Session, study_id: int, series_id: int | None, result: Result | None) -> Series | None:
    if series_id is not None:
        se = s.get(Series, series_id)
        return se if se is not None and se.study_id == study_id else None
    if result is not None:
        return s.get(Series, result.series_id)
    return s.scalars(select(Series).where(Series.study_id == study_id, Series.instance_count > 0)
                     .order_by(Series.series_number, Series.id)).first()


def _seg_object(s: Session, result: Result | None, series: Series) -> ResultObject | None:
    if result is None or result.series_id != series.id:
        return None
    return s.scalars(select(ResultObject).where(ResultObject.result_id == result.id, ResultObject.kind == "seg")
                     .order_by(ResultObject.id.desc())).first()


def manifest(s: Session, store: Any, study_id: int, series_id: int | None = None) -> dict[str, Any] | None:
    """What the viewer needs for one series of a study (the current result's series by default)."""
    result = q.latest_results(s, [study_id]).get(study_id)
    series = _series_of(s, study_id, series_id, result)
    if series is None:
        return None
    slices = ordered_slices(s, series.id)
    n = len(slices)
    own = result is not None and result.series_id == series.id
    out: dict[str, Any] = {
        "study_id": study_id, "series_id": series.id, "series_number": series.series_number,
        "description": series.description,
        "series": [{"id": se.id, "number": se.series_number, "description": se.description,
                    "instances": se.instance_count}
                   for se in s.scalars(select(Series).where(Series.study_id == study_id, Series.instance_count > 0)
                                       .order_by(Series.series_number, Series.id))],
        "rows": slices[0]["rows"] if slices else 0, "cols": slices[0]["cols"] if slices else 0,
        "pixel_spacing": slices[0]["pixel_spacing"] if slices else None,
        "presets": [{"name": name, "ww": ww, "wl": wl} for name, ww, wl in PRESETS],
        "slices": [{"id": sl["id"], "frame": sl["frame"], "number": sl["number"],
                    "z": round(sl["z"], 2) if sl["z"] is not None else None,
                    "caption": slice_label(sl, i, n), "overlay": False, "heat": None}
                   for i, sl in enumerate(slices)],
        "keys": [], "segments": [], "heat_available": False,
    }
    if not own or not slices or result is None:
        return out
    slab = slab_size(n, _volume_depth(result))
    fnd = q.findings_of(s, [result.id]).get(result.id, {})
    for label in LABELS:
        f = fnd.get(label)
        ks = (result.key_slices or {}).get(label) or []
        if f is None or not f.present or not ks:
            continue
        i = source_index(int(ks[0]), n, slab)
        out["keys"].append({"label": label, "short": SHORT[label], "name": DISPLAY[label], "index": i,
                            "caption": out["slices"][i]["caption"]})
    seg = _seg_object(s, result, series)
    try:
        segments, masks = seg_masks(store, seg) if seg is not None else ([], {})
    except OSError:  # the SEG file is gone (purged): the images without the overlay
        segments, masks = [], {}
    if segments:
        by_sop = {_key(sl["sop"], sl["frame"]): i for i, sl in enumerate(slices)}
        for sop in masks:
            if sop in by_sop:
                out["slices"][by_sop[sop]]["overlay"] = True
        out["segments"] = [{**sg, "volume_ml": round(float(fnd[sg["label"]].volume_ml), 2)
                            if sg["label"] in fnd else None} for sg in segments]
    for idx, p in enumerate((result.summary or {}).get("previews") or []):
        if isinstance(p, dict) and isinstance(p.get("slice"), int) and p.get("plain") and p.get("overlay"):
            i = source_index(int(p["slice"]), n, slab)
            if out["slices"][i]["heat"] is None:
                out["slices"][i]["heat"] = idx
                out["heat_available"] = True
    return out


# --------------------------------------------------------------------------- pixels
def slice_path(s: Session, study_id: int, instance_id: int) -> tuple[str, dict[str, Any]] | None:
    """The stored file of one of the study's instances, with its recorded header values."""
    row = s.execute(select(Instance.path, Instance.meta).join(Series, Series.id == Instance.series_id)
                    .where(Instance.id == instance_id, Series.study_id == study_id)).first()
    return (str(row.path), dict(row.meta or {})) if row else None


def _stamp(store: Any, rel: str) -> tuple[int, int]:
    """(mtime in ns, size) of a stored file; raises OSError when it is gone."""
    st = store.path(rel).stat()
    return st.st_mtime_ns, st.st_size


def slice_hu(store: Any, instance_id: int, rel: str, frame: int | None = None,
             meta: dict[str, Any] | None = None) -> bytes | None:
    """One stored slice (a frame of a multi-frame instance) as little-endian int16 Hounsfield
    units (cached). Rescale from the dataset, else from the recorded header values (Enhanced CT
    keeps it in its functional groups). None when the frame does not exist."""
    stamp = _stamp(store, rel)  # the file as it is now: a replaced or removed file is not served from the cache
    key = ("hu", instance_id, rel, stamp, frame or 0)
    hit = CACHE.get(key)
    if hit is not None:
        return hit
    ds = pydicom.dcmread(str(store.path(rel)))
    meta = meta or {}
    slope = ds.get("RescaleSlope", meta.get("slope"))
    intercept = ds.get("RescaleIntercept", meta.get("intercept"))
    slope, intercept = float(slope if slope is not None else 1), float(intercept if intercept is not None else 0)
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    stack = arr[None] if frames == 1 else arr
    out = None
    for f in range(stack.shape[0]):  # a multi-frame instance is decoded once: keep all its frames
        hu = np.clip(np.rint(stack[f].astype(np.float32) * slope + intercept), -32768, 32767).astype("<i2")
        data = hu.tobytes()
        number = (f + 1) if frames > 1 else 0
        CACHE.put(("hu", instance_id, rel, stamp, number), data)
        if number == (frame or 0) or (frames == 1 and not frame):
            out = data
    return out


def seg_masks(store: Any, seg: ResultObject) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """Segments (number, label, name, colour) and one bitmask per referenced source slice
    (bit ``n - 1`` set where segment ``n`` is); decoded once per SEG object (:data:`SEG_CACHE_SIZE`)."""
    key = (seg.id, seg.path, _stamp(store, seg.path))
    with _SEG_LOCK:
        hit = _SEG_CACHE.get(key)
        if hit is not None:
            _SEG_CACHE.move_to_end(key)
            return hit
        ds = pydicom.dcmread(str(store.path(seg.path)))
        px = int(ds.Rows) * int(ds.Columns)
        segments = []
        for item in ds.SegmentSequence:
            label = _LABEL_BY_NAME.get(str(item.SegmentLabel), "any")
            segments.append({"number": int(item.SegmentNumber), "label": label, "name": str(item.SegmentLabel),
                             "short": SHORT.get(label, label), "color": "#{:02x}{:02x}{:02x}".format(*COLORS[label])})
        bits = np.unpackbits(np.frombuffer(ds.PixelData, dtype=np.uint8), bitorder="little")
        masks: dict[str, np.ndarray] = {}
        for f, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            src = fg.DerivationImageSequence[0].SourceImageSequence[0]
            ref_frame = src.get("ReferencedFrameNumber")
            sop = _key(str(src.ReferencedSOPInstanceUID), int(ref_frame) if ref_frame else None)
            frame = bits[f * px:(f + 1) * px].astype(bool)
            m = masks.setdefault(sop, np.zeros(px, dtype=np.uint8))
            m[frame] |= np.uint8(1 << ((number - 1) % 8))
        value = (segments, {k: v.tobytes() for k, v in masks.items()})
        _SEG_CACHE[key] = value
        while len(_SEG_CACHE) > SEG_CACHE_SIZE:
            _SEG_CACHE.popitem(last=False)
        return value


def overlay_bytes(s: Session, store: Any, study_id: int, instance_id: int, frame: int | None = None) -> bytes | None:
    """The segment bitmask of one slice (rows × cols bytes), or None when it has none."""
    row = s.execute(select(Instance.sop_instance_uid, Instance.series_id).join(Series, Series.id == Instance.series_id)
                    .where(Instance.id == instance_id, Series.study_id == study_id)).first()
    if row is None:
        return None
    result = q.latest_results(s, [study_id]).get(study_id)
    series = s.get(Series, row.series_id)
    seg = _seg_object(s, result, series) if series is not None else None
    if seg is None:
        return None
    try:
        _segments, masks = seg_masks(store, seg)
    except OSError:
        return None
    return masks.get(_key(row.sop_instance_uid, frame))


def heat_png(s: Session, store: Any, study_id: int, index: int) -> bytes | None:
    """The heatmap layer of key image ``index``: the pixels the overlay preview changes, over a
    transparent background (an RGBA PNG the size of the preview)."""
    plain_rel = q.preview_path(s, study_id, index, "plain")
    overlay_rel = q.preview_path(s, study_id, index, "overlay")
    if not plain_rel or not overlay_rel:
        return None
    try:
        key = ("heat", study_id, index, plain_rel, overlay_rel, _stamp(store, plain_rel), _stamp(store, overlay_rel))
    except OSError:
        return None
    hit = CACHE.get(key)
    if hit is not None:
        return hit
    plain = np.asarray(Image.open(store.path(plain_rel)).convert("RGB")).astype(np.int16)
    over = np.asarray(Image.open(store.path(overlay_rel)).convert("RGB")).astype(np.int16)[: plain.shape[0]]
    if over.shape != plain.shape:
        return None
    changed = np.abs(over - plain).max(axis=2) > 3
    rgba = np.zeros((*plain.shape[:2], 4), dtype=np.uint8)
    rgba[..., :3] = over.astype(np.uint8)
    rgba[..., 3] = np.where(changed, 255, 0)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    CACHE.put(key, data)
    return data
