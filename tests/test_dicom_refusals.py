"""What the node refuses at receive, at selection and at association (issue 24).

Instances that cannot be stored alike on SQLite and PostgreSQL, or cannot be a CT slice, are refused
with a 0xC2xx status (a permanent refusal, never 0x0110, which invites a retry), audited as
``rejected`` with the reason and SOP Instance UID, and neither stored nor recorded. They are sent as
the bytes on disk by a pynetdicom SCU (chunked mode: no re-encoding) to the real node over a socket,
once with SQLite and once with PostgreSQL.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import struct
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import func, select, update

from storage import audit
from storage.models import AuditEvent, Instance, Series
from tests.conftest import REPO, make_settings
from tests.peers import (
    SeriesSpec,
    dcmtk,
    make_ct_dataset,
    make_ct_series,
    node_context,
    running_node,
    storescu,
    wait_for,
)
from triage.dicom import header as hdr
from triage.dicom.completion import SeriesMonitor
from triage.dicom.header import HeaderError, header_from_dataset, parse_encoded
from triage.dicom.selection import MIN_MATRIX, select_series

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"
PHI = ("Refused^Patient", "PID-REFUSED-77", "ACC-REFUSED-5")


# --------------------------------------------------------------------------- building bad instances
def _raw(ds: Dataset, keyword: str, value: bytes) -> None:
    """Set an element to exact bytes (pydicom writes a raw element as it is, without validation)."""
    tag = Tag(tag_for_keyword(keyword))
    if len(value) % 2:
        value += b" "
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


def _encode(ds: Dataset) -> bytes:
    """The dataset (no file meta) in explicit VR little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    body = Dataset({k: v for k, v in ds.items()})
    write_dataset(fp, body)
    return fp.getvalue()


def _file_bytes(ds: Dataset, body: bytes, syntax: str = EXPLICIT) -> bytes:
    """Preamble, file meta (naming ``syntax``) and the dataset bytes ``body`` as they are."""
    meta = Dataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue() + body


def _pixel_offset(body: bytes) -> int:
    pos = body.rfind(b"\xe0\x7f\x10\x00")
    assert pos > 0
    return pos


def _native_undefined_length(body: bytes) -> bytes:
    """Native pixels wrapped as items with an undefined length, under an uncompressed syntax."""
    pos = _pixel_offset(body)
    (length,) = struct.unpack("<I", body[pos + 8:pos + 12])
    pixels = body[pos + 12:pos + 12 + length]
    item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(pixels)) + pixels
    return (body[:pos] + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
            + item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")


def _double_pixels(body: bytes) -> bytes:
    pos = _pixel_offset(body)
    (length,) = struct.unpack("<I", body[pos + 8:pos + 12])
    pixels = body[pos + 12:pos + 12 + length]
    return body[:pos + 8] + struct.pack("<I", 2 * length) + pixels + pixels


def _spec() -> SeriesSpec:
    return SeriesSpec(slices=1, patient_name=PHI[0], patient_id=PHI[1], accession=PHI[2])


# name -> (how to spoil the dataset, how to spoil the encoded bytes, transfer syntax, expected status)
Spoiler = Callable[[Dataset], None]
CASES: dict[str, tuple[Spoiler | None, Callable[[bytes], bytes] | None, str, int]] = {
    "nan_position": (lambda ds: _raw(ds, "ImagePositionPatient", b"NaN\\0\\0"), None, EXPLICIT, 0xC214),
    "inf_slope": (lambda ds: _raw(ds, "RescaleSlope", b"inf"), None, EXPLICIT, 0xC214),
    "nan_thickness": (lambda ds: _raw(ds, "SliceThickness", b"nan"), None, EXPLICIT, 0xC214),
    "instance_number_20_digits": (lambda ds: _raw(ds, "InstanceNumber", b"12345678901234567890"), None,
                                  EXPLICIT, 0xC215),
    "series_number_-99999999999": (lambda ds: _raw(ds, "SeriesNumber", b"-99999999999"), None, EXPLICIT, 0xC215),
    "nul_in_modality": (lambda ds: _raw(ds, "Modality", b"C\x00T"), None, EXPLICIT, 0xC216),
    "nul_in_patient_name": (lambda ds: _raw(ds, "PatientName", b"Refused\x00^Patient"), None, EXPLICIT, 0xC216),
    "rows_0": (lambda ds: setattr(ds, "Rows", 0), None, EXPLICIT, 0xC217),
    "bits_allocated_17": (lambda ds: setattr(ds, "BitsAllocated", 17), None, EXPLICIT, 0xC217),
    "bits_allocated_1": (lambda ds: setattr(ds, "BitsAllocated", 1), None, EXPLICIT, 0xC217),
    "samples_per_pixel_0": (lambda ds: setattr(ds, "SamplesPerPixel", 0), None, EXPLICIT, 0xC217),
    "pixel_representation_7": (lambda ds: setattr(ds, "PixelRepresentation", 7), None, EXPLICIT, 0xC217),
    "pixel_spacing_0": (lambda ds: _raw(ds, "PixelSpacing", b"0\\0"), None, EXPLICIT, 0xC217),
    "pixel_spacing_negative": (lambda ds: _raw(ds, "PixelSpacing", b"-0.5\\0.5"), None, EXPLICIT, 0xC217),
    "pixel_data_twice_the_size": (None, _double_pixels, EXPLICIT, 0xC218),
    "native_undefined_length": (None, _native_undefined_length, EXPLICIT, 0xC219),
    "native_labelled_jpeg_ls": (None, None, JPEG_LS, 0xC219),
    "uid_leading_zero": (lambda ds: setattr(ds, "SeriesInstanceUID", "1.02.3"), None, EXPLICIT, 0xC213),
    "uid_65_chars": (lambda ds: setattr(ds, "StudyInstanceUID", "1." + "2" * 63), None, EXPLICIT, 0xC213),
}


def build_case(directory: Path, name: str) -> tuple[Path, str, str, int]:
    """Write case ``name``; return (path, SOP Instance UID, transfer syntax, expected status)."""
    spoil, spoil_bytes, syntax, status = CASES[name]
    ds = make_ct_dataset(_spec(), 0, 0.0)
    if spoil is not None:
        spoil(ds)
    body = _encode(ds)
    if spoil_bytes is not None:
        body = spoil_bytes(body)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.dcm"
    path.write_bytes(_file_bytes(ds, body, syntax))
    return path, str(ds.SOPInstanceUID), syntax, status


def dataset_part(path: Path) -> tuple[bytes, str]:
    raw = path.read_bytes()
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length:], str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


# --------------------------------------------------------------------------- header checks (no network)
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_unusable_header_is_refused_with_its_status(tmp_path: Path, name: str) -> None:
    path, _, _, status = build_case(tmp_path, name)
    with pytest.raises(HeaderError) as err:
        parse_encoded(*dataset_part(path))
    assert err.value.status == status, str(err.value)
    assert 0xC200 <= status <= 0xC2FF
    for phi in PHI:  # the reason names the attribute, never a patient's value
        assert phi not in str(err.value) and "Refused" not in str(err.value)


def test_a_good_slice_passes_every_check(tmp_path: Path) -> None:
    (path,) = make_ct_series(tmp_path, _spec())
    h = parse_encoded(*dataset_part(path))
    assert h.has_pixels and h.instance_number == 1 and h.meta["rows"] == 64
    # one pad byte after an odd pixel length is allowed: 63 x 63 x 8 bits = 3969 bytes + 1
    ds = make_ct_dataset(SeriesSpec(slices=1, size=63), 0, 0.0)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(63 * 63) + b"\x00"
    assert parse_encoded(_encode(ds), EXPLICIT).has_pixels


def test_compressed_fragments_must_be_what_the_syntax_says(tmp_path: Path) -> None:
    (jls,) = make_ct_series(tmp_path / "jls", SeriesSpec(slices=1, size=32), transfer_syntax=JPEG_LS)
    data, ts = dataset_part(jls)
    assert parse_encoded(data, ts).has_pixels  # a real JPEG-LS stream
    # raw pixels inside the fragments of a "JPEG-LS" instance
    native = _encode(make_ct_dataset(SeriesSpec(slices=1, size=32), 0, 0.0))
    with pytest.raises(HeaderError) as err:
        parse_encoded(_native_undefined_length(native), JPEG_LS)
    assert err.value.status == hdr.STATUS_PIXEL_ENCODING and "not a JPEG-LS" in str(err.value)


def test_non_finite_per_frame_positions_are_refused() -> None:
    ds = make_ct_dataset(SeriesSpec(slices=1), 0, 0.0)
    h = header_from_dataset(ds, True)
    h.meta["frame_ipps"] = [[0.0, 0.0, 0.0], [0.0, 0.0, math.inf]]
    with pytest.raises(HeaderError, match="per frame") as err:
        hdr.check_values(h)
    assert err.value.status == hdr.STATUS_NON_FINITE


# --------------------------------------------------------------------------- over the network, both databases
def _send_all(port: int, cases: list[tuple[Path, str, str, int]]) -> dict[str, int]:
    ae = AE("REFUSALSCU")
    for syntax in sorted({c[2] for c in cases}):
        ae.add_requested_context(CT, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHTRIAGE")
    assert assoc.is_established
    old = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # the bytes as they are on disk
    try:
        statuses = {}
        for path, _, _, _ in cases:
            rsp = assoc.send_c_store(path)
            statuses[path.stem] = int(rsp.Status) if "Status" in rsp else -1
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return statuses


@pytest.mark.network
def test_unusable_instances_are_refused_alike_on_sqlite_and_postgres(
    db_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    ctx = node_context(tmp_path, database_url=db_url)
    cases = [build_case(tmp_path / "bad", name) for name in sorted(CASES)]
    good = make_ct_series(tmp_path / "good", SeriesSpec(slices=3))
    with running_node(ctx) as node:
        statuses = _send_all(node.port, cases)
        r = storescu(node.port, good)  # the node stays up and takes good data
        assert r.returncode == 0, r.stderr
    assert statuses == {path.stem: status for path, _, _, status in cases}
    with ctx.sessions() as s:
        uids = set(s.scalars(select(Instance.sop_instance_uid)))
        rejected = list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.REJECTED)))
        assert audit.verify(s).ok
    assert uids == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in good}
    stored = {p.name for p in (ctx.store.root / "instances").rglob("*") if p.is_file()}
    assert not any(sop in n for _, sop, _, _ in cases for n in stored)  # nothing of theirs was written
    by_uid = {e.details["sop_instance_uid"]: e for e in rejected}
    for path, sop, _, status in cases:
        event = by_uid[sop]
        assert event.outcome == "failure" and event.details["status"] == f"0x{status:04X}", path.stem
        assert event.details["reason"]
    text = json.dumps([e.details for e in rejected]) + "".join(capfd.readouterr())
    for phi in PHI:
        assert phi not in text


# --------------------------------------------------------------------------- selection
@pytest.fixture
def settings(tmp_path: Path):  # noqa: ANN201
    return make_settings(tmp_path)


def metas_for(spec: SeriesSpec) -> list[dict]:
    return [header_from_dataset(make_ct_dataset(spec, i, i * spec.spacing), True).meta for i in range(spec.slices)]


def test_a_chest_series_in_a_head_study_is_skipped(settings) -> None:  # noqa: ANN001
    chest = SeriesSpec(body_part="CHEST", series_description="AXIAL 5MM", study_description="CT HEAD")
    r = select_series(settings, metas_for(chest))
    assert not r.ok and "body part CHEST is not a head" in r.reason
    described_head = SeriesSpec(body_part="CHEST", series_description="CT HEAD W/O", study_description="CT HEAD")
    assert not select_series(settings, metas_for(described_head)).ok  # its own tag wins over any text
    # without BodyPartExamined the descriptions still decide
    assert select_series(settings, metas_for(SeriesSpec(body_part="", series_description="AXIAL 5MM",
                                                         study_description="CT HEAD"))).ok
    assert select_series(settings, metas_for(SeriesSpec(body_part="BRAIN", study_description="CT CHEST"))).ok


@pytest.mark.parametrize(("rows", "cols"), [(8, 8), (1, 4096), (MIN_MATRIX - 1, 512)])
def test_a_matrix_smaller_than_a_head_slice_is_skipped(settings, rows: int, cols: int) -> None:  # noqa: ANN001
    metas = metas_for(SeriesSpec())
    for m in metas:
        m["rows"], m["cols"] = rows, cols
    r = select_series(settings, metas)
    assert not r.ok and f"matrix {rows}x{cols} is smaller than the 64x64 minimum" in r.reason


def test_mixed_matrix_sizes_and_non_finite_legacy_rows_are_skipped(settings) -> None:  # noqa: ANN001
    metas = metas_for(SeriesSpec())
    assert select_series(settings, metas).ok and MIN_MATRIX == 64
    metas[3]["rows"] = metas[3]["cols"] = 512
    r = select_series(settings, metas)
    assert not r.ok and "mixed matrix sizes" in r.reason
    metas = metas_for(SeriesSpec())
    metas[5]["ipp"] = [0.0, 0.0, math.nan]
    r = select_series(settings, metas)
    assert not r.ok and "non-finite ImagePositionPatient" in r.reason


@pytest.mark.network
def test_chest_series_sent_in_a_head_study_is_skipped_by_the_monitor(tmp_path: Path) -> None:
    ctx = node_context(tmp_path, stable_seconds=0.5)
    study = SeriesSpec().study_uid
    head = make_ct_series(tmp_path / "head", SeriesSpec(study_uid=study, study_description="CT HEAD"))
    chest = make_ct_series(tmp_path / "chest", SeriesSpec(study_uid=study, study_description="CT HEAD",
                                                          body_part="CHEST", series_description="AXIAL 5MM"))
    with running_node(ctx) as node:
        r = storescu(node.port, head + chest)
        assert r.returncode == 0, r.stderr
    states = _complete_all(ctx)
    assert sorted(states.values()) == ["selected", "skipped"]
    with ctx.sessions() as s:
        chest_row = s.scalars(select(Series).where(Series.body_part == "CHEST")).one()
    assert chest_row.state == "skipped" and "body part CHEST is not a head" in (chest_row.skip_reason or "")


def _states(ctx) -> dict[str, str]:  # noqa: ANN001
    with ctx.sessions() as s:
        return {row.series_uid: row.state for row in s.scalars(select(Series))}


def _complete_all(ctx) -> dict[str, str]:  # noqa: ANN001
    """Tick the series monitor until no series is still receiving; return the states."""
    monitor = SeriesMonitor(ctx)

    def done() -> bool:
        monitor.tick()
        states = _states(ctx)
        return bool(states) and "receiving" not in states.values()

    wait_for(done, timeout=60, message="every series complete")
    return _states(ctx)


# --------------------------------------------------------------------------- NaN recorded before
def test_audit_hash_accepts_non_finite_numbers_and_keeps_finite_hashes(sqlite_ctx) -> None:  # noqa: ANN001
    fields = {"id": 1, "ts": audit.utcnow(), "event_type": "queued", "actor": "system", "study_uid": "",
              "series_uid": "", "accession": "", "outcome": "success", "details": {"spacing_mm": [5.0, 2.5]}}
    doc = {**fields, "ts": audit._ts_text(fields["ts"]), "prev_hash": "x"}
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert audit.compute_hash(fields, "x") == hashlib.sha256(canon.encode()).hexdigest()  # unchanged for finite
    nan_fields = {**fields, "details": {"spacing_mm": {"median": math.nan, "max": math.inf, "min": -math.inf}}}
    assert len(audit.compute_hash(nan_fields, "x")) == 64
    with sqlite_ctx.sessions.begin() as s:
        audit.record(s, audit.QUEUED, details={"spacing_mm": {"median": math.nan}, "tilt": [math.inf]})
    with sqlite_ctx.sessions() as s:
        ev = s.scalars(select(AuditEvent)).one()
        assert ev.details == {"spacing_mm": {"median": "NaN"}, "tilt": ["Infinity"]}
        assert audit.verify(s).ok


@pytest.mark.network
def test_a_nan_position_recorded_before_does_not_block_the_monitor(tmp_path: Path) -> None:
    """A row from before the receiver refused NaN (SQLite stored it): the series completes and is
    skipped with a reason, the monitor does not fail on it in a loop, the audit chain verifies."""
    ctx = node_context(tmp_path, stable_seconds=0.5)
    paths = make_ct_series(tmp_path / "src", SeriesSpec())
    with running_node(ctx) as node:
        assert storescu(node.port, paths).returncode == 0
    with ctx.sessions.begin() as s:
        inst = s.scalars(select(Instance).order_by(Instance.id).limit(1)).one()
        s.execute(update(Instance).where(Instance.id == inst.id)
                  .values(meta={**inst.meta, "ipp": [0.0, 0.0, math.nan]}))
    with ctx.sessions() as s:
        assert math.isnan(s.scalars(select(Instance).where(Instance.id == inst.id)).one().meta["ipp"][2])
    _complete_all(ctx)
    with ctx.sessions() as s:
        series = s.scalars(select(Series)).one()
        assert series.state == "skipped" and "non-finite ImagePositionPatient" in (series.skip_reason or "")
        assert audit.verify(s).ok
        assert s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.event_type == audit.SKIPPED)) == 1


# --------------------------------------------------------------------------- access control
def _pinned_pynetdicom() -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (req,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "pynetdicom"]
    return req


def test_installed_pynetdicom_is_in_the_pinned_range() -> None:
    req = _pinned_pynetdicom()
    assert req.specifier and "<" in str(req.specifier), "pynetdicom needs an upper bound: access control relies on it"
    assert req.specifier.contains(importlib.metadata.version("pynetdicom"))


def _rejected_count(ctx) -> int:  # noqa: ANN001
    with ctx.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(AuditEvent)
                            .where(AuditEvent.event_type == audit.ASSOCIATION_REJECTED)) or 0)


@pytest.mark.network
def test_a_refused_ae_stays_refused(tmp_path: Path) -> None:
    ctx = node_context(tmp_path, allowed_aets="PACS1,PACS2@10.0.0.0/8")
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=2))
    with running_node(ctx) as node:
        for attempt in range(3):  # again and again, before and after an allowed peer's association
            r = storescu(node.port, paths, calling="STRANGER")
            assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr, attempt
            echo = dcmtk("echoscu", "-aet", "PACS2", "-aec", "ICHTRIAGE", "127.0.0.1", str(node.port), check=False)
            assert echo.returncode != 0 and "Association Rejected" in echo.stderr, attempt
            if attempt == 1:
                assert storescu(node.port, paths, calling="PACS1").returncode == 0
        ae = AE("STRANGER")
        ae.add_requested_context(CT, EXPLICIT)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert assoc.is_rejected and not assoc.is_established
        assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.diagnostic) == (0x01, 0x03)
    with ctx.sessions() as s:
        assert set(s.scalars(select(Instance.calling_aet))) == {"PACS1"}
    assert _rejected_count(ctx) == 7


@pytest.mark.network
def test_access_control_stays_closed_without_the_association_request_hook(tmp_path: Path) -> None:
    """Should pynetdicom ever stop calling the EVT_REQUESTED handler, the backstops still refuse:
    its own AE title list for unknown titles, the EVT_ESTABLISHED check for a wrong host."""
    ctx = node_context(tmp_path, allowed_aets="PACS1,PACS2@10.0.0.0/8")
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=2))
    with running_node(ctx) as node:
        node._server.unbind(evt.EVT_REQUESTED, node._on_requested)
        stranger = storescu(node.port, paths, calling="STRANGER")
        assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
        wrong_host = storescu(node.port, paths, calling="PACS2")
        assert wrong_host.returncode != 0
        ok = storescu(node.port, paths, calling="PACS1")
        assert ok.returncode == 0, ok.stderr
    with ctx.sessions() as s:
        assert set(s.scalars(select(Instance.calling_aet))) == {"PACS1"}
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.ASSOCIATION_REJECTED)))
    assert [e.details["calling_aet"] for e in events] == ["PACS2"]  # the backstop audits what it aborts



@pytest.mark.network
def test_an_error_in_the_access_check_rejects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom only logs a notification handler's exception and would then accept: the hook
    must fail closed."""
    ctx = node_context(tmp_path)  # no allow-list: everyone would be accepted

    def broken(*_: object) -> str | None:
        raise RuntimeError("boom")

    with running_node(ctx) as node:
        monkeypatch.setattr(node, "check_peer", broken)
        ae = AE("ANYONE")
        ae.add_requested_context(CT, EXPLICIT)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE")
        assert assoc.is_rejected and not assoc.is_established
    with ctx.sessions() as s:
        (event,) = s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.ASSOCIATION_REJECTED))
    assert event.details["reason"] == "access check failed: RuntimeError"
