"""DICOMweb read endpoints (``/dicomweb``): QIDO-RS search and WADO-RS retrieve.

What is served: the instances the node stores (rows in ``instances``, files in the file store)
and the result objects it made (``result_objects`` of current, i.e. not superseded, results:
SEG, SR, SC), under the study they belong to, so a DICOMweb viewer (OHIF) or any client such as
``dicomweb-client`` can open a study with its segmentation.

* QIDO-RS: ``GET /dicomweb/studies``, ``/studies/{study}/series``, ``/studies/{study}/instances``,
  ``/studies/{study}/series/{series}/instances`` (``application/dicom+json``). Study matching on
  ``StudyInstanceUID``, ``AccessionNumber`` (``*`` wildcards), ``StudyDate`` (a date or a
  ``from-to`` range), ``PatientID`` / ``PatientName`` (admins only), ``limit``, ``offset``.
* WADO-RS: ``.../metadata`` (study, series, instance), the instances themselves (study, series,
  instance; ``multipart/related; type="application/dicom"``), ``.../frames/{list}`` and the pixel
  data's ``.../bulkdata/7fe00010`` (``multipart/related; type="application/octet-stream"``,
  uncompressed little endian; stored compressed frames are decoded first).

Authentication and roles are those of the REST API (bearer token or session; any role). As on
the pages, patient name and ID reach only roles that may see them (admins, ``auth.PHI_ROLES``):
other users get them masked in search results, metadata and retrieved instances (which are then
re-encoded; an admin receives the stored bytes unchanged). Every answer carrying identifiers
(search, metadata, instances) is audited as an event ``viewed`` with ``details.dicomweb`` (the
path) and ``details.phi``; frames and bulk data carry no identifiers and are not.
"""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Select, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from reports.web import queries as q
from reports.web.auth import CurrentUser, audit_reads, requires
from storage.db import session_scope
from storage.models import Instance, Result, ResultObject, Series, Study
from triage.context import AppContext

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
MAX_LIMIT = 1000
KIND_MODALITY = {"seg": "SEG", "sr": "SR", "sc": "OT"}
MAX_FRAMES_PER_REQUEST = 1000
#: Patient attributes other than name and ID removed for roles that do not see PHI.
PHI_EXTRA = ("OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress",
             "PatientTelephoneNumbers", "PatientMotherBirthName", "PatientBirthName", "MilitaryRank",
             "MedicalRecordLocator", "OriginalAttributesSequence")
_UID = re.compile(r"^[0-9.]{1,64}$")
_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")


class DicomwebError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Item:
    """One instance the node can serve: a received instance or a result object."""

    study_id: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    path: str
    instance_number: int | None
    kind: str  # "image" (received) or the result object's kind


# --------------------------------------------------------------------------- look-ups
def _uid(value: str) -> str:
    if not _UID.match(value):
        raise DicomwebError(404, "no such object")
    return value


def _study(s: Session, study_uid: str) -> Study:
    st = s.scalars(select(Study).where(Study.study_uid == _uid(study_uid), Study.purged_at.is_(None))).first()
    if st is None:
        raise DicomwebError(404, "no such study")
    return st


def items_of(s: Session, study: Study, series_uid: str | None = None, sop_uid: str | None = None) -> list[Item]:
    """The study's servable instances (received ones, then result objects), optionally of one series
    or one SOP instance, in series then instance-number order."""
    stmt = (select(Instance, Series.series_uid).join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study.id))
    if series_uid:
        stmt = stmt.where(Series.series_uid == series_uid)
    if sop_uid:
        stmt = stmt.where(Instance.sop_instance_uid == sop_uid)
    out = [Item(study.id, study.study_uid, se_uid, i.sop_instance_uid, i.sop_class_uid, i.path, i.instance_number,
                "image")
           for i, se_uid in s.execute(stmt.order_by(Series.series_number, Series.id, Instance.instance_number,
                                                    Instance.sop_instance_uid))]
    ostmt = (select(ResultObject).join(Result, Result.id == ResultObject.result_id)
             .where(Result.study_id == study.id, Result.superseded.is_(False)))
    if series_uid:
        ostmt = ostmt.where(ResultObject.series_uid == series_uid)
    if sop_uid:
        ostmt = ostmt.where(ResultObject.sop_instance_uid == sop_uid)
    out += [Item(study.id, study.study_uid, o.series_uid, o.sop_instance_uid, o.sop_class_uid, o.path, None, o.kind)
            for o in s.scalars(ostmt.order_by(ResultObject.series_uid, ResultObject.id))]
    return out


# --------------------------------------------------------------------------- PHI
def mask_for_dicom(name: str, patient_id: str) -> tuple[str, str]:
    """ASCII masks for PN/LO: initials and the last two characters of the ID, e.g. ``J.D.``, ``...42``."""
    masked = q.mask_patient(name, patient_id)
    initials, _, tail = masked.partition(" …")
    return initials, f"...{tail}" if tail else ""


def mask_dataset(ds: Dataset) -> None:
    """Replace patient name and ID with their masks and drop other patient identifiers (in place),
    at every level: items of sequences too (a referenced patient, original attributes), and every
    private element (a vendor may put anything there)."""
    name, pid = mask_for_dicom(str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or ""))

    def visit(item: Dataset) -> None:
        item.remove_private_tags()
        if "PatientName" in item:
            item.PatientName = name if item is ds else mask_for_dicom(str(item.PatientName or ""), "")[0]
        if "PatientID" in item:
            item.PatientID = pid if item is ds else mask_for_dicom("", str(item.PatientID or ""))[1]
        if "PatientBirthDate" in item:  # the pages show these roles an age, never the date
            item.PatientBirthDate = ""
        for kw in PHI_EXTRA:
            if kw in item:
                delattr(item, kw)
        for elem in list(item):
            if elem.VR == "SQ":
                for child in elem.value:
                    visit(child)

    visit(ds)


# --------------------------------------------------------------------------- JSON models
def _json(ds: Dataset) -> dict[str, Any]:
    return ds.to_json_dict(bulk_data_threshold=1 << 30, bulk_data_element_handler=lambda _e: "")


def study_json(study: Study, modalities: Sequence[str], n_series: int, n_instances: int, phi: bool,
               base: str) -> dict[str, Any]:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDate = study.study_date or ""
    ds.StudyTime = study.study_time or ""
    ds.AccessionNumber = study.accession or ""
    ds.ModalitiesInStudy = list(modalities)
    ds.ReferringPhysicianName = study.referring_physician or ""
    ds.PatientName = study.patient_name or ""
    ds.PatientID = study.patient_id or ""
    ds.PatientBirthDate = study.patient_birth_date or ""
    ds.PatientSex = study.patient_sex or ""
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDescription = study.study_description or ""
    ds.NumberOfStudyRelatedSeries = n_series
    ds.NumberOfStudyRelatedInstances = n_instances
    ds.RetrieveURL = f"{base}/studies/{study.study_uid}"
    if not phi:
        mask_dataset(ds)
    return _json(ds)


def series_json(study_uid: str, series_uid: str, modality: str, number: int | None, description: str, n: int,
                base: str) -> dict[str, Any]:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number if number is not None else ""
    ds.SeriesDescription = description
    ds.NumberOfSeriesRelatedInstances = n
    ds.RetrieveURL = f"{base}/studies/{study_uid}/series/{series_uid}"
    return _json(ds)


def instance_json(item: Item, base: str, rows: int | None = None, cols: int | None = None,
                  frames: int | None = None) -> dict[str, Any]:
    ds = Dataset()
    ds.SOPClassUID = item.sop_class
    ds.SOPInstanceUID = item.sop_uid
    ds.StudyInstanceUID = item.study_uid
    ds.SeriesInstanceUID = item.series_uid
    ds.InstanceNumber = item.instance_number if item.instance_number is not None else ""
    if rows:
        ds.Rows = rows
    if cols:
        ds.Columns = cols
    if frames:
        ds.NumberOfFrames = frames
    ds.RetrieveURL = f"{base}/studies/{item.study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"
    return _json(ds)


# --------------------------------------------------------------------------- files
def read_header(ctx: AppContext, item: Item) -> Dataset:
    return pydicom.dcmread(str(ctx.store.path(item.path)), stop_before_pixels=True)


def read_full(ctx: AppContext, item: Item) -> Dataset:
    return pydicom.dcmread(str(ctx.store.path(item.path)))


def instance_bytes(ctx: AppContext, item: Item, phi: bool) -> bytes:
    """The stored file (PHI roles), or the file with patient identifiers masked (re-encoded)."""
    data = ctx.store.read_bytes(item.path)
    if phi:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    mask_dataset(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def frames_of(ds: Dataset, numbers: Sequence[int]) -> list[bytes]:
    """Frames (1-based) as uncompressed little-endian bytes: slices of the stored pixel data when it
    is native (bit-packed 1-bit frames re-packed from their bit offset), else decoded first."""
    n_frames = int(ds.get("NumberOfFrames") or 1)
    for n in numbers:
        if not 1 <= n <= n_frames:
            raise DicomwebError(404, f"frame {n} does not exist (the instance has {n_frames})")
    if "PixelData" not in ds:
        raise DicomwebError(404, "the instance has no pixel data")
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.BitsAllocated)
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        data = bytes(ds.PixelData)
        pixels = rows * cols * samples
        if bits == 1:
            bitsarr = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
            return [np.packbits(bitsarr[(n - 1) * pixels:n * pixels], bitorder="little").tobytes() for n in numbers]
        size = pixels * bits // 8
        return [data[(n - 1) * size:n * size] for n in numbers]
    arr = ds.pixel_array
    if n_frames == 1:
        arr = arr[None]
    return [np.ascontiguousarray(arr[n - 1]).astype(arr.dtype.newbyteorder("<")).tobytes() for n in numbers]


def multipart(parts: Iterable[bytes], part_type: str, transfer_syntax: str | None = None) -> Response:
    boundary = secrets.token_hex(16)
    head = f"Content-Type: {part_type}" + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")
    chunks: list[bytes] = []
    for p in parts:
        chunks += [f"--{boundary}\r\n{head}\r\n\r\n".encode(), p, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return Response(b"".join(chunks),
                    media_type=f'multipart/related; type="{part_type}"; boundary={boundary}')


def multipart_stream(parts: Iterator[bytes], part_type: str) -> StreamingResponse:
    """A multipart answer produced part by part (a whole study is not held in memory)."""
    boundary = secrets.token_hex(16)
    head = f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()

    def body() -> Iterator[bytes]:
        for p in parts:
            yield head + p + b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(body(), media_type=f'multipart/related; type="{part_type}"; boundary={boundary}')


# --------------------------------------------------------------------------- audit
# --------------------------------------------------------------------------- QIDO-RS
_QIDO_KEYS = {"00100020": "PatientID", "00100010": "PatientName", "00080050": "AccessionNumber",
              "0020000D": "StudyInstanceUID", "00080020": "StudyDate"}


def _qido_params(params: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        out[_QIDO_KEYS.get(key.upper(), key)] = value
    return out


def _like(value: str) -> str:
    esc = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return esc.replace("*", "%").replace("?", "_")


def _text_match(stmt: Select[Any], column: Any, value: str) -> Select[Any]:
    if len(value) > 64 or any(ord(c) < 32 for c in value):
        raise DicomwebError(400, "matching values are at most 64 printable characters")
    if "*" in value or "?" in value:
        return stmt.where(column.like(_like(value), escape="\\"))
    return stmt.where(column == value)


def _int_param(params: dict[str, str], name: str, default: int, hi: int) -> int:
    raw = params.get(name, "")
    if raw == "":
        return default
    if not raw.isdigit() or int(raw) > hi:
        raise DicomwebError(400, f"{name} must be an integer between 0 and {hi}")
    return int(raw)


def search_studies(ctx: AppContext, params: dict[str, str], user: CurrentUser, base: str) -> list[dict[str, Any]]:
    p = _qido_params(params)
    if (p.get("PatientID") or p.get("PatientName")) and not user.sees_phi:
        raise DicomwebError(403, "matching on patient name or ID needs a role that sees patient identifiers")
    limit = _int_param(p, "limit", 100, MAX_LIMIT) or 100
    offset = _int_param(p, "offset", 0, 10_000_000)
    stmt: Select[Any] = select(Study).where(Study.purged_at.is_(None))
    if p.get("StudyInstanceUID"):
        uids = [u for u in p["StudyInstanceUID"].replace("\\", ",").split(",") if u]
        if not uids or len(uids) > 1000 or not all(_UID.match(u) for u in uids):
            raise DicomwebError(400, "StudyInstanceUID must be UIDs (comma-separated)")
        stmt = stmt.where(Study.study_uid.in_(uids))
    if p.get("AccessionNumber"):
        stmt = _text_match(stmt, Study.accession, p["AccessionNumber"])
    if p.get("PatientID"):
        stmt = _text_match(stmt, Study.patient_id, p["PatientID"])
    if p.get("PatientName"):
        stmt = _text_match(stmt, Study.patient_name, p["PatientName"])
    if p.get("StudyDate"):
        m = _DATE.match(p["StudyDate"])
        if not m or not (m.group(1) or m.group(3)):
            raise DicomwebError(400, "StudyDate is YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
        lo, dash, hi = m.group(1), m.group(2), m.group(3)
        if not dash:
            stmt = stmt.where(Study.study_date == lo)
        else:
            if lo:
                stmt = stmt.where(Study.study_date >= lo)
            if hi:
                stmt = stmt.where(Study.study_date <= hi)
    with session_scope(ctx.reads) as s:
        studies = list(s.scalars(stmt.order_by(Study.first_received_at.desc(), Study.id.desc())
                                 .limit(limit).offset(offset)))
        out = []
        for st in studies:
            items = items_of(s, st)
            series_uids = {i.series_uid for i in items}
            mods = sorted({se.modality for se in s.scalars(select(Series).where(Series.study_id == st.id))
                           if se.modality} | {KIND_MODALITY.get(i.kind, "OT") for i in items if i.kind != "image"})
            out.append(study_json(st, mods, len(series_uids), len(items), user.sees_phi, base))
    with session_scope(ctx.sessions) as s:
        audit_reads(s, user, f"{PREFIX}/studies", studies, user.sees_phi, channel="dicomweb")
    return out


def search_series(ctx: AppContext, study_uid: str, user: CurrentUser, base: str) -> list[dict[str, Any]]:
    with session_scope(ctx.reads) as s:
        st = _study(s, study_uid)
        items = items_of(s, st)
        counts: dict[str, int] = {}
        for i in items:
            counts[i.series_uid] = counts.get(i.series_uid, 0) + 1
        out = []
        for se in s.scalars(select(Series).where(Series.study_id == st.id).order_by(Series.series_number, Series.id)):
            if se.series_uid in counts:
                out.append(series_json(st.study_uid, se.series_uid, se.modality, se.series_number, se.description,
                                       counts.pop(se.series_uid), base))
        result_series = {i.series_uid: i for i in items if i.kind != "image" and i.series_uid in counts}
        for series_uid, first in result_series.items():
            hdr = read_header(ctx, first)
            out.append(series_json(st.study_uid, series_uid, str(hdr.get("Modality", KIND_MODALITY[first.kind])),
                                   int(hdr.SeriesNumber) if hdr.get("SeriesNumber") is not None else None,
                                   str(hdr.get("SeriesDescription", "")), counts[series_uid], base))
    with session_scope(ctx.sessions) as s:
        audit_reads(s, user, f"{PREFIX}/studies/{study_uid}/series", [st], user.sees_phi, channel="dicomweb")
    return out


def search_instances(ctx: AppContext, study_uid: str, series_uid: str | None, user: CurrentUser,
                     base: str) -> list[dict[str, Any]]:
    with session_scope(ctx.reads) as s:
        st = _study(s, study_uid)
        items = items_of(s, st, series_uid=_uid(series_uid) if series_uid else None)
        meta = {}
        if items:
            meta = {i.sop_instance_uid: i.meta or {} for i in s.scalars(
                select(Instance).join(Series, Series.id == Instance.series_id).where(Series.study_id == st.id))}
        out = []
        for it in items:
            m = meta.get(it.sop_uid, {})
            out.append(instance_json(it, base, m.get("rows"), m.get("cols"), m.get("frames")))
    if series_uid and not items:
        raise DicomwebError(404, "no such series")
    with session_scope(ctx.sessions) as s:
        audit_reads(s, user, f"{PREFIX}/studies/{study_uid}/instances", [st], user.sees_phi, channel="dicomweb")
    return out


# --------------------------------------------------------------------------- WADO-RS
def _select_items(ctx: AppContext, study_uid: str, series_uid: str | None, sop_uid: str | None
                  ) -> tuple[Study, list[Item]]:
    with session_scope(ctx.reads) as s:
        st = _study(s, study_uid)
        items = items_of(s, st, _uid(series_uid) if series_uid else None, _uid(sop_uid) if sop_uid else None)
        s.expunge(st)
    if not items:
        raise DicomwebError(404, "no such series or instance")
    return st, items


def metadata(ctx: AppContext, study_uid: str, series_uid: str | None, sop_uid: str | None, user: CurrentUser,
             base: str, path: str) -> list[dict[str, Any]]:
    st, items = _select_items(ctx, study_uid, series_uid, sop_uid)
    out = []
    for it in items:
        ds = read_header(ctx, it)
        if not user.sees_phi:
            mask_dataset(ds)
        js = _json(ds)
        if it.kind != "sr":  # images, SEG and SC carry pixel data; it is retrieved as bulk data
            js["7FE00010"] = {"vr": "OB" if int(ds.get("BitsAllocated") or 8) <= 8 else "OW",
                              "BulkDataURI": f"{base}/studies/{it.study_uid}/series/{it.series_uid}/instances/"
                                             f"{it.sop_uid}/bulkdata/7fe00010"}
        out.append(js)
    with session_scope(ctx.sessions) as s:
        audit_reads(s, user, path, [st], user.sees_phi, channel="dicomweb")
    return out


def instances(ctx: AppContext, study_uid: str, series_uid: str | None, sop_uid: str | None, user: CurrentUser,
              path: str) -> list[Item]:
    """The instances a retrieve answers with (audited now; their bytes are streamed one by one)."""
    st, items = _select_items(ctx, study_uid, series_uid, sop_uid)
    with session_scope(ctx.sessions) as s:
        audit_reads(s, user, path, [st], user.sees_phi, channel="dicomweb")
    return items


def frames(ctx: AppContext, study_uid: str, series_uid: str, sop_uid: str, numbers: Sequence[int]) -> list[bytes]:
    _st, items = _select_items(ctx, study_uid, series_uid, sop_uid)
    return frames_of(read_full(ctx, items[0]), numbers)


def bulk_pixel_data(ctx: AppContext, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
    _st, items = _select_items(ctx, study_uid, series_uid, sop_uid)
    ds = read_full(ctx, items[0])
    if "PixelData" not in ds:
        raise DicomwebError(404, "the instance has no pixel data")
    if ds.file_meta.TransferSyntaxUID.is_compressed:  # application/octet-stream is uncompressed
        return b"".join(frames_of(ds, range(1, int(ds.get("NumberOfFrames") or 1) + 1)))
    return bytes(ds.PixelData)


# --------------------------------------------------------------------------- endpoints
def _base(request: Request) -> str:
    """Absolute URL prefix for RetrieveURL / BulkDataURI, from the request's Host header. A Host
    without a port that names the server's own address (some clients drop the port) gets the
    port the request actually came in on; a proxy's Host name is kept as it is."""
    base = request.base_url
    server = request.scope.get("server")
    if base.port is None and server and base.hostname == server[0] and server[1] not in (80, 443):
        base = base.replace(port=int(server[1]))
    return str(base).rstrip("/") + PREFIX


def _error(exc: DicomwebError) -> Response:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


def _dicom_json(body: list[dict[str, Any]]) -> Response:
    return JSONResponse(body, media_type=DICOM_JSON) if body else Response(status_code=204)


def _frame_numbers(raw: str) -> list[int]:
    try:
        numbers = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError as exc:
        raise DicomwebError(400, "frames are a comma-separated list of numbers") from exc
    numbers = list(dict.fromkeys(numbers))  # each frame once: a repeated number must not multiply the answer
    if not numbers or len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise DicomwebError(400, f"frames are a comma-separated list of at most {MAX_FRAMES_PER_REQUEST} numbers")
    return numbers


@requires()
async def qido_studies(request: Request) -> Response:
    try:
        body = await run_in_threadpool(search_studies, request.app.state.ctx, dict(request.query_params),
                                       request.state.user, _base(request))
    except DicomwebError as exc:
        return _error(exc)
    return _dicom_json(body)


@requires()
async def qido_series(request: Request) -> Response:
    try:
        body = await run_in_threadpool(search_series, request.app.state.ctx, request.path_params["study"],
                                       request.state.user, _base(request))
    except DicomwebError as exc:
        return _error(exc)
    return _dicom_json(body)


@requires()
async def qido_instances(request: Request) -> Response:
    try:
        body = await run_in_threadpool(search_instances, request.app.state.ctx, request.path_params["study"],
                                       request.path_params.get("series"), request.state.user, _base(request))
    except DicomwebError as exc:
        return _error(exc)
    return _dicom_json(body)


@requires()
async def wado_metadata(request: Request) -> Response:
    pp = request.path_params
    try:
        body = await run_in_threadpool(metadata, request.app.state.ctx, pp["study"], pp.get("series"),
                                       pp.get("instance"), request.state.user, _base(request), request.url.path)
    except DicomwebError as exc:
        return _error(exc)
    return JSONResponse(body, media_type=DICOM_JSON)


@requires()
async def wado_instances(request: Request) -> Response:
    pp = request.path_params
    ctx, user = request.app.state.ctx, request.state.user
    try:
        items = await run_in_threadpool(instances, ctx, pp["study"], pp.get("series"), pp.get("instance"), user,
                                        request.url.path)
    except DicomwebError as exc:
        return _error(exc)
    return multipart_stream((instance_bytes(ctx, it, user.sees_phi) for it in items), "application/dicom")


@requires()
async def wado_frames(request: Request) -> Response:
    pp = request.path_params
    try:
        numbers = _frame_numbers(pp["frames"])
        parts = await run_in_threadpool(frames, request.app.state.ctx, pp["study"], pp["series"], pp["instance"],
                                        numbers)
    except DicomwebError as exc:
        return _error(exc)
    return multipart(parts, "application/octet-stream", "1.2.840.10008.1.2.1")


@requires()
async def wado_bulkdata(request: Request) -> Response:
    pp = request.path_params
    try:
        data = await run_in_threadpool(bulk_pixel_data, request.app.state.ctx, pp["study"], pp["series"],
                                       pp["instance"])
    except DicomwebError as exc:
        return _error(exc)
    return multipart([data], "application/octet-stream")


_S = PREFIX + "/studies/{study}"
_SE = _S + "/series/{series}"
_I = _SE + "/instances/{instance}"
routes = [
    Route(PREFIX + "/studies", qido_studies, methods=["GET"]),
    Route(_S + "/series", qido_series, methods=["GET"]),
    Route(_S + "/instances", qido_instances, methods=["GET"]),
    Route(_SE + "/instances", qido_instances, methods=["GET"]),
    Route(_S + "/metadata", wado_metadata, methods=["GET"]),
    Route(_SE + "/metadata", wado_metadata, methods=["GET"]),
    Route(_I + "/metadata", wado_metadata, methods=["GET"]),
    Route(_I + "/frames/{frames}", wado_frames, methods=["GET"]),
    Route(_I + "/bulkdata/7fe00010", wado_bulkdata, methods=["GET"]),
    Route(_S, wado_instances, methods=["GET"]),
    Route(_SE, wado_instances, methods=["GET"]),
    Route(_I, wado_instances, methods=["GET"]),
]

