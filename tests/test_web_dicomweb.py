"""DICOMweb read endpoints, driven by the real ``dicomweb-client`` library over HTTP to uvicorn.

The study's instances go through the receiver's recorder and its result objects through the real
inference job (tests/viewer_support.py), so what is compared is what the node stored.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from storage import audit
from storage.db import session_scope
from storage.models import AuditEvent, ResultObject
from tests.viewer_support import ImagedStudy, seed_imaged_study
from tests.web_support import add_user, live_server
from triage.context import AppContext

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def node(ctx: AppContext) -> Iterator[dict[str, Any]]:
    """Both back-ends (SQLite and PostgreSQL)."""
    admin = add_user(ctx, "alice", "admin", token=True)
    rad = add_user(ctx, "rad", "radiologist", token=True)
    study = seed_imaged_study(ctx, n_slices=12, size=64, accession="CT-DW-1", patient_name="Doe^Jane",
                              patient_id="PID0042")
    other = seed_imaged_study(ctx, seed="other", n_slices=6, size=64, accession="CT-DW-2", positive=False)
    with live_server(ctx) as base:
        yield {"ctx": ctx, "base": base, "admin": admin, "rad": rad, "study": study, "other": other}


def client(node: dict[str, Any], who: str = "admin") -> DICOMwebClient:
    return DICOMwebClient(url=f"{node['base']}/dicomweb", headers={"Authorization": f"Bearer {node[who]}"})


def _value(js: dict[str, Any], tag: str) -> Any:
    v = js.get(tag, {}).get("Value")
    return v[0] if v else None


def viewed_events(ctx: AppContext) -> list[AuditEvent]:
    with session_scope(ctx.sessions) as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.VIEWED)
                              .order_by(AuditEvent.id)))


def test_dicomweb_client_searches_and_retrieves_what_the_node_stored(node: dict[str, Any]) -> None:
    ctx, st = node["ctx"], node["study"]
    assert isinstance(st, ImagedStudy) and st.seg_uid and st.seg_series_uid
    dw = client(node)

    # QIDO-RS: the node's studies; matching by accession and by date.
    studies = dw.search_for_studies()
    assert {_value(s, "0020000D") for s in studies} == {st.study_uid, node["other"].study_uid}
    found = dw.search_for_studies(search_filters={"AccessionNumber": "CT-DW-1"})
    assert [_value(s, "0020000D") for s in found] == [st.study_uid]
    assert _value(found[0], "00100010") == {"Alphabetic": "Doe^Jane"}  # an admin sees the patient
    assert "SEG" in found[0]["00080061"]["Value"] and "CT" in found[0]["00080061"]["Value"]
    assert dw.search_for_studies(search_filters={"AccessionNumber": "CT-DW-*"}, limit=1) != []
    assert dw.search_for_studies(search_filters={"StudyDate": "20250101-20251231"}) == []
    assert len(dw.search_for_studies(search_filters={"StudyDate": "20260101-20260131"})) == 2

    series = dw.search_for_series(study_instance_uid=st.study_uid)
    by_uid = {_value(s, "0020000E"): s for s in series}
    assert by_uid[st.series_uid]["00080060"]["Value"] == ["CT"]
    assert _value(by_uid[st.series_uid], "00201209") == 12
    assert by_uid[st.seg_series_uid]["00080060"]["Value"] == ["SEG"]

    inst = dw.search_for_instances(study_instance_uid=st.study_uid, series_instance_uid=st.series_uid)
    assert sorted(_value(i, "00200013") for i in inst) == sorted(n for _, n, _ in st.slices)

    # WADO-RS metadata: every instance of the series, with its own instance number.
    meta = dw.retrieve_series_metadata(study_instance_uid=st.study_uid, series_instance_uid=st.series_uid)
    assert len(meta) == 12
    numbers = {_value(m, "00080018"): _value(m, "00200013") for m in meta}
    assert numbers == {sop: n for sop, n, _ in st.slices}
    assert all("BulkDataURI" in m["7FE00010"] for m in meta)

    # Frames: byte-equal to the stored pixel data.
    for sop, _n, data in (st.slices[0], st.slices[5], st.slices[-1]):
        frames = dw.retrieve_instance_frames(study_instance_uid=st.study_uid, series_instance_uid=st.series_uid,
                                             sop_instance_uid=sop, frame_numbers=[1])
        assert frames == [pydicom.dcmread(io.BytesIO(data)).PixelData]

    # A whole instance, byte for byte (an admin gets the stored file).
    sop, _n, data = st.slices[3]
    url = f"{node['base']}/dicomweb/studies/{st.study_uid}/series/{st.series_uid}/instances/{sop}"
    assert dw.retrieve_bulkdata(url) == [data]
    ds = dw.retrieve_instance(study_instance_uid=st.study_uid, series_instance_uid=st.series_uid,
                              sop_instance_uid=sop)
    assert ds.SOPInstanceUID == sop and ds.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData

    # A whole study, streamed: the stored instances and the result objects (SEG, SR, SC).
    study_sets = dw.retrieve_study(study_instance_uid=st.study_uid)
    with session_scope(ctx.sessions) as s:
        n_objects = len(s.scalars(select(ResultObject).where(ResultObject.result_id == st.result_id)).all())
    assert len(study_sets) == 12 + n_objects and n_objects >= 3
    assert {d.SOPInstanceUID for d in study_sets} >= {sop for sop, _n, _d in st.slices} | {st.seg_uid}
    r = httpx.get(f"{node['base']}/dicomweb/studies?StudyInstanceUID=1.2.x",
                  headers={"Authorization": f"Bearer {node['admin']}"})
    assert r.status_code == 400

    # The SEG the node made: same bytes as its file, its frames as stored (bit-packed), and a real SEG.
    with session_scope(ctx.sessions) as s:
        seg_row = s.scalars(select(ResultObject).where(ResultObject.sop_instance_uid == st.seg_uid)).one()
        seg_bytes = ctx.store.read_bytes(seg_row.path)
    seg_url = f"{node['base']}/dicomweb/studies/{st.study_uid}/series/{st.seg_series_uid}/instances/{st.seg_uid}"
    assert dw.retrieve_bulkdata(seg_url) == [seg_bytes]
    seg = dw.retrieve_instance(study_instance_uid=st.study_uid, series_instance_uid=st.seg_series_uid,
                               sop_instance_uid=st.seg_uid)
    assert seg.SOPClassUID == SEG_CLASS and len(seg.SegmentSequence) == 2
    stored = pydicom.dcmread(io.BytesIO(seg_bytes))
    n_frames = int(stored.NumberOfFrames)
    got = dw.retrieve_instance_frames(study_instance_uid=st.study_uid, series_instance_uid=st.seg_series_uid,
                                      sop_instance_uid=st.seg_uid, frame_numbers=list(range(1, n_frames + 1)))
    px = int(stored.Rows) * int(stored.Columns)
    bits = np.unpackbits(np.frombuffer(stored.PixelData, np.uint8), bitorder="little")
    assert [np.unpackbits(np.frombuffer(f, np.uint8), bitorder="little")[:px].tolist() for f in got] == [
        bits[i * px:(i + 1) * px].tolist() for i in range(n_frames)]
    assert sum(int(np.unpackbits(np.frombuffer(f, np.uint8)).sum()) for f in got) > 0
    seg_meta = dw.retrieve_instance_metadata(study_instance_uid=st.study_uid,
                                             series_instance_uid=st.seg_series_uid, sop_instance_uid=st.seg_uid)
    bulk = dw.retrieve_bulkdata(seg_meta["7FE00010"]["BulkDataURI"])
    assert bulk == [stored.PixelData]

    # Reads of identifiers are audited (search, metadata, instances); frames carry none.
    events = viewed_events(ctx)
    paths = [e.details.get("dicomweb", "") for e in events]
    assert any(p == "/dicomweb/studies" for p in paths)
    assert any(p.endswith(f"/series/{st.series_uid}/metadata") for p in paths)
    assert any(p.endswith(f"/instances/{st.seg_uid}") for p in paths)
    assert not any("/frames/" in p for p in paths)
    one = [e for e in events if e.details.get("dicomweb", "").endswith("/metadata")][0]
    assert one.actor == "alice" and one.study_uid == st.study_uid and one.accession == "CT-DW-1"
    assert one.details["phi"] is True and one.details["via"] == "token"


def test_unauthenticated_requests_get_401(node: dict[str, Any]) -> None:
    st = node["study"]
    base = node["base"] + "/dicomweb"
    for path in ("/studies", f"/studies/{st.study_uid}/series", f"/studies/{st.study_uid}/metadata",
                 f"/studies/{st.study_uid}/series/{st.series_uid}/instances/{st.slices[0][0]}",
                 f"/studies/{st.study_uid}/series/{st.series_uid}/instances/{st.slices[0][0]}/frames/1"):
        r = httpx.get(base + path, headers={"Accept": "application/dicom+json"})
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = httpx.get(base + path, headers={"Authorization": "Bearer not-a-token"})
        assert r.status_code == 401, path
    with pytest.raises(Exception) as info:
        DICOMwebClient(url=base).search_for_studies()
    assert "401" in str(info.value)


def test_roles_as_on_the_pages_radiologist_gets_masked_identifiers(node: dict[str, Any]) -> None:
    ctx, st = node["ctx"], node["study"]
    dw = client(node, "rad")
    found = dw.search_for_studies(search_filters={"AccessionNumber": "CT-DW-1"})
    assert _value(found[0], "00100010") == {"Alphabetic": "J.D."}
    assert _value(found[0], "00100020") == "...42"
    # Matching on patient identifiers is for roles that see them.
    r = httpx.get(f"{node['base']}/dicomweb/studies?PatientID=PID0042",
                  headers={"Authorization": f"Bearer {node['rad']}"})
    assert r.status_code == 403
    admin = client(node).search_for_studies(search_filters={"PatientID": "PID0042"})
    assert [_value(s, "0020000D") for s in admin] == [st.study_uid]
    # Metadata and instances: masked for the radiologist, pixels unchanged.
    meta = dw.retrieve_series_metadata(study_instance_uid=st.study_uid, series_instance_uid=st.series_uid)
    assert {_value(m, "00100020") for m in meta} == {"...42"}
    sop, _n, data = st.slices[0]
    ds = dw.retrieve_instance(study_instance_uid=st.study_uid, series_instance_uid=st.series_uid,
                              sop_instance_uid=sop)
    assert str(ds.PatientName) == "J.D." and ds.PatientID == "...42"
    assert not ds.get("PatientBirthDate")  # the pages show this role an age, never the date
    assert _value(found[0], "00100030") is None
    assert ds.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData
    assert b"PID0042" not in b"".join(dw.retrieve_bulkdata(
        f"{node['base']}/dicomweb/studies/{st.study_uid}/series/{st.series_uid}/instances/{sop}"))
    events = [e for e in viewed_events(ctx) if e.actor == "rad" and e.details.get("dicomweb")]
    assert events and all(e.details["phi"] is False for e in events)
    # Unknown objects: 404.
    r = httpx.get(f"{node['base']}/dicomweb/studies/1.2.3/metadata", headers={"Authorization": f"Bearer {node['rad']}"})
    assert r.status_code == 404


def test_cors_for_a_viewer_on_another_origin(sqlite_ctx: AppContext) -> None:
    """Only /dicomweb, only the configured origins, never with cookies."""
    from starlette.testclient import TestClient

    from reports.web.app import create_app
    from triage.config import Settings, load_settings

    origins = load_settings(env={"TRIAGE_DICOMWEB_CORS_ORIGINS":
                                 "https://ohif.example.org, https://second.example.org/"}).dicomweb_cors_origins
    assert origins == ["https://ohif.example.org", "https://second.example.org"]
    with pytest.raises(ValueError):
        Settings(dicomweb_cors_origins="*")
    ctx = AppContext(sqlite_ctx.settings.model_copy(update={"dicomweb_cors_origins": origins}), role="test")
    token = add_user(ctx, "rad", "radiologist", token=True)
    with TestClient(create_app(ctx)) as client:
        pre = client.options("/dicomweb/studies", headers={
            "Origin": "https://ohif.example.org", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://ohif.example.org"
        assert "access-control-allow-credentials" not in pre.headers
        got = client.get("/dicomweb/studies", headers={"Origin": "https://ohif.example.org",
                                                        "Authorization": f"Bearer {token}"})
        assert got.status_code == 204 and got.headers["access-control-allow-origin"] == "https://ohif.example.org"
        other = client.get("/dicomweb/studies", headers={"Origin": "https://evil.example.org",
                                                          "Authorization": f"Bearer {token}"})
        assert "access-control-allow-origin" not in other.headers
        api = client.get("/api/v1/studies", headers={"Origin": "https://ohif.example.org",
                                                      "Authorization": f"Bearer {token}"})
        assert api.status_code == 200 and "access-control-allow-origin" not in api.headers
    ctx.close()


def test_masking_reaches_sequences_and_private_elements() -> None:
    """For roles without PHI: identifiers nested in sequences are masked or dropped too, and
    private elements (which may hold anything) are removed."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from reports.web.dicomweb import mask_dataset

    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "MRN0042", "19700101"
    ref = Dataset()
    ref.PatientName, ref.PatientID = "ROE^RICHARD", "MRN7777"
    ds.ReferencedPatientSequence = Sequence([ref])
    original = Dataset()
    original.AttributeModificationDateTime = "20260101"
    ds.OriginalAttributesSequence = Sequence([original])
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.add_new(0x00091010, "LO", "MRN0042 DOE^JANE")  # a vendor's private copy
    mask_dataset(ds)
    text = str(ds)
    assert str(ds.PatientName) == "J.D." and ds.PatientID == "...42" and ds.PatientBirthDate == ""
    nested = ds.ReferencedPatientSequence[0]
    assert str(nested.PatientName) == "R.R." and nested.PatientID == "...77"
    assert "OriginalAttributesSequence" not in ds and "OtherPatientIDsSequence" not in ds
    assert 0x00091010 not in ds
    for secret in ("DOE", "JANE", "ROE", "MRN0042", "MRN7777", "19700101"):
        assert secret not in text, secret


def test_bulk_pixel_data_of_a_compressed_instance_is_uncompressed(sqlite_ctx: AppContext) -> None:
    """application/octet-stream bulk data is the uncompressed pixels, also for an instance stored
    compressed (RLE here), never its encapsulated fragments."""
    from pydicom.uid import RLELossless

    from reports.web.dicomweb import bulk_pixel_data

    st = seed_imaged_study(sqlite_ctx, seed="rle", n_slices=3, size=64, positive=False)
    sop, _n, data = st.slices[1]
    ds = pydicom.dcmread(io.BytesIO(data))
    native = ds.pixel_array.copy()
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    sqlite_ctx.store.write_atomic(sqlite_ctx.store.instance_rel(st.study_uid, st.series_uid, sop), buf.getvalue())
    out = bulk_pixel_data(sqlite_ctx, st.study_uid, st.series_uid, sop)
    assert out == native.astype(native.dtype.newbyteorder("<")).tobytes()
