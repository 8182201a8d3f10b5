"""The receiver over real sockets: DCMTK echoscu/storescu and pynetdicom peers against the node."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import func, select

from storage.models import AuditEvent, Instance, Job, Series, Study
from tests.conftest import REAL_CT
from tests.peers import (
    STORESCU_PROPOSE,
    SeriesSpec,
    compress_with_dcmtk,
    dcmtk,
    make_ct_series,
    node_context,
    running_node,
    storescu,
    wait_for,
)
from triage.config import Destination
from triage.dicom.assembly import load_volume
from triage.dicom.completion import SeriesMonitor
from triage.dicom.scu import SendError, send_files

pytestmark = pytest.mark.network

CT = "1.2.840.10008.5.1.4.1.1.2"


def count(ctx, model) -> int:  # noqa: ANN001
    with ctx.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def audit_events(ctx, event_type: str) -> list[AuditEvent]:  # noqa: ANN001
    with ctx.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type)
                              .order_by(AuditEvent.id)))


def raw_send(port: int, path: Path, sop_class: str = CT, syntax: str = "1.2.840.10008.1.2.1") -> int:
    """C-STORE a file's bytes exactly as they are on disk (pynetdicom chunked mode: no re-encoding)."""
    ae = AE("RAWSCU")
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHTRIAGE")
    assert assoc.is_established
    old = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(rsp.Status)


def echo(port: int) -> int:
    return dcmtk("echoscu", "-aec", "ICHTRIAGE", "127.0.0.1", str(port), check=False).returncode


def test_echo_store_and_record_without_phi_in_logs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ctx = node_context(tmp_path)
    paths = make_ct_series(tmp_path / "src", SeriesSpec(patient_name="Doe^Jane", patient_id="PID-77",
                                                        accession="ACC-991"))
    with running_node(ctx) as node:
        assert echo(node.port) == 0
        r = storescu(node.port, paths)
        assert r.returncode == 0, r.stderr
    with ctx.sessions() as s:
        study = s.scalars(select(Study)).one()
        series = s.scalars(select(Series)).one()
        inst = list(s.scalars(select(Instance).order_by(Instance.instance_number)))
    assert (study.patient_name, study.patient_id, study.accession) == ("Doe^Jane", "PID-77", "ACC-991")
    assert series.state == "receiving" and series.instance_count == 20 and series.modality == "CT"
    assert len(inst) == 20
    first = inst[0]
    assert first.meta["ipp"] == pytest.approx([-16.0, -16.0, 0.0])
    assert first.meta["iop"] == pytest.approx([1, 0, 0, 0, 1, 0])
    assert first.meta["thickness"] == 5.0 and first.meta["rows"] == 64 and first.meta["kernel"] == "STANDARD"
    assert first.calling_aet == "STORESCU" and first.transfer_syntax == "1.2.840.10008.1.2.1"
    # The stored file is the received bytes: same dataset as the source, sha256 recorded.
    stored = ctx.store.path(first.path)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == first.sha256
    src = {str(dcmread(p).SOPInstanceUID): p for p in paths}[first.sop_instance_uid]
    assert dcmread(stored).PixelData == dcmread(src).PixelData
    received = audit_events(ctx, "received")  # one event per committed group, listing its instances
    assert sorted(u for e in received for u in e.details["sop_instance_uids"]) == sorted(i.sop_instance_uid
                                                                                        for i in inst)
    assert sum(e.details["count"] for e in received) == 20
    assert received[0].accession == "ACC-991" and received[0].actor == "STORESCU"  # identifiers: audit only
    out = capfd.readouterr()
    for phi in ("Doe^Jane", "PID-77", "ACC-991"):
        assert phi not in out.out + out.err


def test_compressed_series_are_stored_as_received_and_decode(tmp_path: Path) -> None:
    ctx = node_context(tmp_path)
    spec = SeriesSpec(slices=4, size=32)
    raw = make_ct_series(tmp_path / "raw", spec)

    def fresh(name: str) -> list[Path]:  # DCMTK keeps SOP Instance UIDs when lossless: one series each
        return make_ct_series(tmp_path / f"raw-{name}", SeriesSpec(slices=4, size=32))

    sets = {
        "1.2.840.10008.1.2.4.70": compress_with_dcmtk(fresh("sv1"), tmp_path / "sv1", "dcmcjpeg"),
        "1.2.840.10008.1.2.4.50": compress_with_dcmtk(fresh("baseline"), tmp_path / "baseline", "dcmcjpeg", "+eb"),
        "1.2.840.10008.1.2.5": compress_with_dcmtk(fresh("rle"), tmp_path / "rle", "dcmcrle"),
    }
    for syntax in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99",
                   "1.2.840.10008.1.2"):
        sets[syntax] = make_ct_series(tmp_path / syntax, SeriesSpec(slices=4, size=32), transfer_syntax=syntax)
    with running_node(ctx) as node:
        for syntax, paths in sets.items():  # storescu proposes one compressed syntax per run
            r = storescu(node.port, paths, extra=[STORESCU_PROPOSE[syntax]])
            assert r.returncode == 0, (syntax, r.stderr)
    reference, _ = load_volume(raw)
    with ctx.sessions() as s:
        for syntax, paths in sets.items():
            uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
            rows = list(s.scalars(select(Instance).where(Instance.sop_instance_uid.in_(uids))))
            assert len(rows) == 4 and {r.transfer_syntax for r in rows} == {syntax}
            vol, _ = load_volume([ctx.store.path(r.path) for r in rows])
            tolerance = 15.0 if syntax == "1.2.840.10008.1.2.4.50" else 0.0
            assert float(np.abs(vol.hu - reference.hu).mean()) <= tolerance, syntax


def test_duplicate_instances_are_idempotent(tmp_path: Path) -> None:
    ctx = node_context(tmp_path)
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=5))
    with running_node(ctx) as node:
        assert storescu(node.port, paths).returncode == 0
        r = storescu(node.port, paths)
        assert r.returncode == 0, r.stderr  # success again, not a failure status
    assert count(ctx, Instance) == 5
    with ctx.sessions() as s:
        assert s.scalars(select(Series)).one().instance_count == 5
    # Later (another receiver process) the PACS sends one again in another transfer syntax: the file
    # holds the new bytes, and the row follows it (DICOMweb serves the file under the row's syntax).
    from pydicom.uid import ImplicitVRLittleEndian

    ds = dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    again = tmp_path / "implicit.dcm"
    ds.save_as(again, implicit_vr=True, little_endian=True)
    with running_node(ctx) as node:
        r = storescu(node.port, [again])
        assert r.returncode == 0, r.stderr
    with ctx.sessions() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))).one()
        stored = ctx.store.path(row.path).read_bytes()
        assert row.transfer_syntax == ImplicitVRLittleEndian and row.size == len(stored)
        assert row.sha256 == hashlib.sha256(stored).hexdigest()
        assert s.scalars(select(Series)).one().instance_count == 5
    replaced = [e for e in audit_events(ctx, "received") if e.details.get("replaced")]
    assert len(replaced) == 1 and replaced[0].details["sop_instance_uids"] == [str(ds.SOPInstanceUID)]


def test_access_control_rejects_unknown_callers_and_wrong_called_aet(tmp_path: Path) -> None:
    ctx = node_context(tmp_path, allowed_aets="PACS1,PACS2@10.0.0.0/8")
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=2))
    with running_node(ctx) as node:
        unknown = storescu(node.port, paths, calling="STRANGER")
        assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stderr
        wrong_host = storescu(node.port, paths, calling="PACS2")  # allowed only from 10/8
        assert wrong_host.returncode != 0 and "Association Rejected" in wrong_host.stderr
        wrong_called = storescu(node.port, paths, calling="PACS1", called="SOMEONE")
        assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
        ok = storescu(node.port, paths, calling="PACS1")
        assert ok.returncode == 0, ok.stderr
    assert count(ctx, Instance) == 2
    events = audit_events(ctx, "association_rejected")
    assert [e.details["calling_aet"] for e in events] == ["STRANGER", "PACS2", "PACS1"]
    assert all(e.outcome == "failure" and e.details["peer"] == "127.0.0.1" for e in events)
    assert "called AE title 'SOMEONE'" in events[2].details["reason"]


def test_bad_input_is_refused_audited_and_the_node_stays_up(tmp_path: Path) -> None:
    ctx = node_context(tmp_path)
    good = make_ct_series(tmp_path / "good", SeriesSpec(slices=3))
    bad = tmp_path / "bad"
    bad.mkdir()
    blob = good[0].read_bytes()
    (bad / "truncated.dcm").write_bytes(blob[:-1000])
    ds = dcmread(good[1])
    del ds.PixelData
    ds.save_as(bad / "nopixels.dcm")
    # Valid file meta, then bytes that are no dataset at all.
    meta_end = blob.index(b"\x08\x00\x05\x00")  # first dataset element (0008,0005)
    (bad / "garbage.dcm").write_bytes(blob[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00" * 64)
    with running_node(ctx) as node:
        # Garbage on the port: not even an A-ASSOCIATE-RQ.
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(b"\x17\x03\x01 hello, this is not DICOM" * 50)
            sock.settimeout(10)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                sock.recv(1024)
        assert echo(node.port) == 0
        assert raw_send(node.port, bad / "truncated.dcm") == 0xC211
        assert raw_send(node.port, bad / "nopixels.dcm") == 0xC212
        status = raw_send(node.port, bad / "garbage.dcm")
        assert 0xC000 <= status <= 0xCFFF
        assert echo(node.port) == 0
        r = storescu(node.port, good)
        assert r.returncode == 0, r.stderr
    assert count(ctx, Instance) == 3  # only the good ones
    rejected = audit_events(ctx, "rejected")
    assert [e.details["status"] for e in rejected][:2] == ["0xC211", "0xC212"]
    assert all(e.outcome == "failure" and e.details["reason"] for e in rejected)
    assert len(rejected) == 3
    assert not list((ctx.store.root / "instances").rglob(".tmp-*"))


def test_disk_floor_refuses_with_a700_then_recovers(tmp_path: Path) -> None:
    ctx = node_context(tmp_path, disk_floor_mb=100)
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=3))
    with running_node(ctx) as node:
        ctx.store.free_bytes_override = 50 * 1024 * 1024  # below the 100 MB floor
        assert storescu(node.port, paths[:1]).returncode != 0
        dest = Destination("ICHTRIAGE", "127.0.0.1", node.port)
        assert [status for _, status in send_files(dest, paths[1:2], "MODALITY")] == [0xA700]
        assert count(ctx, Instance) == 0
        ctx.store.free_bytes_override = None  # space came back
        r = storescu(node.port, paths)
        assert r.returncode == 0, r.stderr
    assert count(ctx, Instance) == 3
    full = audit_events(ctx, "disk_full")
    assert len(full) == 2 and {e.details["status"] for e in full} == {"0xA700"}
    assert all(e.outcome == "failure" for e in full)


def test_two_studies_over_four_associations_each_interleaved(tmp_path: Path) -> None:
    ctx = node_context(tmp_path, stable_seconds=2)
    a = make_ct_series(tmp_path / "a", SeriesSpec(slices=24, images_in_acquisition=False), shuffle=True)
    b = make_ct_series(tmp_path / "b", SeriesSpec(slices=24, images_in_acquisition=False,
                                                  study_description="CT HEAD STAT"), shuffle=True)
    results: list[subprocess.CompletedProcess[str]] = []
    with running_node(ctx) as node:
        def send(part: list[Path]) -> None:
            results.append(storescu(node.port, part))

        threads = [threading.Thread(target=send, args=(files[i::4],)) for i in range(4) for files in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(results) == 8 and all(r.returncode == 0 for r in results), [r.stderr for r in results]
        monitor = SeriesMonitor(ctx)
        wait_for(lambda: (monitor.tick(), count(ctx, Job) == 2)[1], timeout=60, message="two infer jobs")
    with ctx.sessions() as s:
        series = list(s.scalars(select(Series)))
        jobs = list(s.scalars(select(Job).order_by(Job.priority)))
        studies = list(s.scalars(select(Study)))
    assert sorted(x.instance_count for x in series) == [24, 24]
    assert {x.state for x in series} == {"selected"}
    assert [j.priority for j in jobs] == [0, 10]  # the STAT study first
    assert {s.status for s in studies} == {"queued"}
    for x in series:
        files = [ctx.store.path(p) for p in _paths_of(ctx, x.id)]
        vol, _ = load_volume(files)
        assert vol.shape[0] == 24 and np.all(np.diff(vol.positions[:, 2]) > 0)


def _paths_of(ctx, series_id: int) -> list[str]:  # noqa: ANN001
    with ctx.sessions() as s:
        return list(s.scalars(select(Instance.path).where(Instance.series_id == series_id)))


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""
    d.mkdir(parents=True, exist_ok=True)
    p = {k: d / f"{k}.pem" for k in ("ca", "ca_key", "server", "server_key", "client", "client_key")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(p["ca_key"]), "-out", str(p["ca"]))
    for who, cn in (("server", "127.0.0.1"), ("client", "MODALITY")):
        csr = d / f"{who}.csr"
        ext = d / f"{who}.ext"
        usage = "serverAuth" if who == "server" else "clientAuth"
        ext.write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(p[f"{who}_key"]),
                 "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]),
                 "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(p[who]))
    return p


def test_dicom_tls_with_client_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    ctx = node_context(tmp_path, tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]),
                       tls_ca=str(pki["ca"]), tls_verify_client="true")
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=3))

    def client(with_cert: bool) -> ssl.SSLContext:
        c = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        if with_cert:
            c.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
        return c

    with running_node(ctx) as node:
        dest = Destination("ICHTRIAGE", "127.0.0.1", node.port)
        results = send_files(dest, paths, "TLSSCU", ssl_context=client(True))
        assert [status for _, status in results] == [0, 0, 0]
        with pytest.raises(SendError):
            send_files(dest, paths, "TLSSCU", ssl_context=client(False), acse_timeout=10, network_timeout=10)
        with pytest.raises(SendError):  # plain TCP to a TLS port
            send_files(dest, paths, "PLAIN", acse_timeout=10, network_timeout=10)
        assert echo(node.port) != 0
    assert count(ctx, Instance) == 3


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="real CT sample not present")
def test_real_tilted_ge_head_is_received_selected_and_assembled(tmp_path: Path) -> None:
    ctx = node_context(tmp_path, stable_seconds=1)
    files = sorted(REAL_CT.glob("*.dcm"))
    with running_node(ctx) as node:
        r = storescu(node.port, files[::-1])  # sent in reverse order
        assert r.returncode == 0, r.stderr
    monitor = SeriesMonitor(ctx)
    done = wait_for(lambda: monitor.tick(), timeout=60, message="series completion")
    assert len(done) == 1 and done[0].selected, done
    with ctx.sessions() as s:
        series = s.scalars(select(Series)).one()
        rels = list(s.scalars(select(Instance.path).where(Instance.series_id == series.id)))
    sel = series.meta["selection"]
    assert series.state == "selected" and series.meta["completed_early"] is False  # uneven: waits for quiet
    assert sel["tilt_deg"] == pytest.approx(18.5, abs=0.01) and sel["gantry_tilt_deg"] == pytest.approx(18.5)
    assert sel["spacing_mm"]["min"] == pytest.approx(1.08, abs=0.01)
    assert sel["spacing_mm"]["max"] == pytest.approx(6.99, abs=0.01)
    assert sel["uneven_spacing"] is True
    vol, headers = load_volume([ctx.store.path(p) for p in rels])
    assert vol.shape == (len(files), 512, 512)
    normal = np.cross(np.array(vol.orientation[:3]), np.array(vol.orientation[3:]))
    assert np.all(np.diff(vol.positions @ normal) > 0)
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, len(files) + 1))  # this scan: z follows number
    assert vol.tilt_deg == pytest.approx(18.5, abs=0.01)


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.826.0.1.3680043.8.498.12345678901234567890123", "1.2.33"])
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"])
def test_file_meta_bytes_match_pynetdicoms(sop_uid: str, syntax: str) -> None:
    """The receiver's own File Meta encoder writes what Event.encoded_dataset(include_meta=True) did."""
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from triage.dicom.scp import file_meta_bytes

    expected = b"\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"), sop_instance_uid=UID(sop_uid), transfer_syntax=UID(syntax)))
    assert file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", sop_uid, syntax) == expected
