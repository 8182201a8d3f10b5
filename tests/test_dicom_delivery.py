"""Sending: the C-STORE SCU against DCMTK storescp, and the ``deliver`` job with retries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from storage import audit
from storage.models import AuditEvent, Delivery, ResultObject
from tests.peers import (
    SeriesSpec,
    StoreSCP,
    free_port,
    make_ct_series,
    make_result_object,
    node_context,
    running_node,
    wait_for,
)
from triage.config import Destination
from triage.dicom.delivery import DeliveryError, handle_deliver
from triage.dicom.scu import SendError, send_files

pytestmark = pytest.mark.network

J2K = "1.2.840.10008.1.2.4.90"


def test_scu_sends_as_stored_or_decompresses_for_the_peer(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=3, size=32), transfer_syntax=J2K)
    with StoreSCP(tmp_path / "all") as scp:  # accepts JPEG 2000: sent as is
        results = send_files(Destination("STORESCP", "127.0.0.1", scp.port), paths, "ICHTRIAGE")
        assert [s for _, s in results] == [0, 0, 0]
        assert {str(dcmread(f).file_meta.TransferSyntaxUID) for f in scp.files()} == {J2K}
    with StoreSCP(tmp_path / "plain", accept_all=False) as scp:  # uncompressed only: decompressed
        results = send_files(Destination("STORESCP", "127.0.0.1", scp.port), paths, "ICHTRIAGE")
        assert [s for _, s in results] == [0, 0, 0]
        received = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in scp.files()}
        for p in paths:
            src = dcmread(p)
            got = received[str(src.SOPInstanceUID)]
            assert not got.file_meta.TransferSyntaxUID.is_compressed
            np.testing.assert_array_equal(got.pixel_array, src.pixel_array)


def test_scu_can_be_told_to_send_uncompressed(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=2, size=32), transfer_syntax=J2K)
    with StoreSCP(tmp_path / "all") as scp:  # would accept JPEG 2000
        results = send_files(Destination("STORESCP", "127.0.0.1", scp.port), paths, "ICHTRIAGE",
                             allow_compressed=False)
        assert [s for _, s in results] == [0, 0]
        assert {dcmread(f).file_meta.TransferSyntaxUID.is_compressed for f in scp.files()} == {False}


def test_scu_sends_explicit_as_read_to_an_implicit_preferring_peer_or_re_encodes(tmp_path: Path) -> None:
    """pynetdicom SCPs pick Implicit VR for a context that offers both: the file's own context
    still carries it unchanged; a peer that accepts Implicit VR only gets it re-encoded."""
    import threading

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=2, size=32))  # Explicit VR Little Endian
    got: list[str] = []
    lock = threading.Lock()

    def on_store(event) -> int:  # noqa: ANN001
        with lock:
            got.append(str(event.context.transfer_syntax))
        return 0x0000

    ae = AE(ae_title="PYSCP")
    ae.supported_contexts = AllStoragePresentationContexts  # Implicit VR Little Endian first
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        results = send_files(Destination("PYSCP", "127.0.0.1", port), paths, "ICHTRIAGE")
    finally:
        server.shutdown()
    assert [s for _, s in results] == [0, 0]
    assert got == ["1.2.840.10008.1.2.1"] * 2, "sent in its own syntax, without re-encoding"
    with StoreSCP(tmp_path / "implicit", "STORESCP", "+xi", accept_all=False) as scp:
        results = send_files(Destination("STORESCP", "127.0.0.1", scp.port), paths, "ICHTRIAGE")
        assert [s for _, s in results] == [0, 0]
        received = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in scp.files()}
    for p in paths:
        src = dcmread(p)
        out = received[str(src.SOPInstanceUID)]
        assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        np.testing.assert_array_equal(out.pixel_array, src.pixel_array)
        assert out.PatientName == src.PatientName and out.ImagePositionPatient == src.ImagePositionPatient


def test_scu_raises_when_no_association(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=1, size=16))
    with pytest.raises(SendError, match="could not connect"):
        send_files(Destination("NOBODY", "127.0.0.1", free_port()), paths, "ICHTRIAGE")
    # storescp --refuse closes right after its A-ASSOCIATE-RJ: pynetdicom may see either
    with StoreSCP(tmp_path / "r", "STORESCP", "--refuse") as scp, pytest.raises(SendError, match="rejected|aborted"):
        send_files(Destination("STORESCP", "127.0.0.1", scp.port), paths, "ICHTRIAGE")


def run_deliver_jobs(ctx, until) -> None:  # noqa: ANN001
    """A minimal worker loop over ``deliver`` jobs (the real one is triage/pipeline/worker.py)."""
    import time

    deadline = time.monotonic() + 120
    while not until():
        assert time.monotonic() < deadline, "deliveries did not settle"
        job = ctx.queue.claim("test-worker", kinds=["deliver"])
        if job is None:
            time.sleep(0.05)
            continue
        try:
            handle_deliver(ctx, job)
        except DeliveryError as exc:
            ctx.queue.fail(job.id, "test-worker", str(exc))
        else:
            ctx.queue.complete(job.id, "test-worker")


def test_deliver_job_retries_a_down_destination_without_blocking_others(tmp_path: Path) -> None:
    ctx = node_context(tmp_path, max_attempts=3, retry_base_seconds=0.1, retry_max_seconds=0.3)
    obj_id = make_result_object(ctx, tmp_path)
    down = Destination("DOWN", "127.0.0.1", free_port())
    with StoreSCP(tmp_path / "pacs") as scp:
        up = Destination("STORESCP", "127.0.0.1", scp.port)
        # The down destination is enqueued first and with higher priority: it must not hold up the other.
        dead_id = ctx.queue.enqueue("deliver", {"result_object_id": obj_id, "destination": str(down)}, priority=20)
        ok_id = ctx.queue.enqueue("deliver", {"result_object_id": obj_id, "destination": str(up)})

        def settled() -> bool:
            a, b = ctx.queue.get(dead_id), ctx.queue.get(ok_id)
            return a.state == "dead" and b.state == "done"

        run_deliver_jobs(ctx, settled)
        assert [str(dcmread(f).SOPInstanceUID) for f in scp.files()] == [_sop(ctx, obj_id)]
    with ctx.sessions() as s:
        rows = list(s.scalars(select(Delivery).order_by(Delivery.id)))
        ev = {k: list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == k)))
              for k in (audit.DELIVERED, audit.DELIVERY_FAILED, audit.DELIVERY_DEAD)}
    to_down = [r for r in rows if r.destination == str(down)]
    to_up = [r for r in rows if r.destination == str(up)]
    assert [(r.attempt, r.ok) for r in to_down] == [(1, False), (2, False), (3, False)]
    assert all(r.status == "no-association" and "could not connect" in r.error for r in to_down)
    assert [(r.attempt, r.ok, r.status) for r in to_up] == [(1, True, "0x0000")]
    assert len(ev[audit.DELIVERED]) == 1 and ev[audit.DELIVERED][0].accession == "ACC-D1"
    assert len(ev[audit.DELIVERY_FAILED]) == 3
    assert len(ev[audit.DELIVERY_DEAD]) == 1 and ev[audit.DELIVERY_DEAD][0].details["attempt"] == 3


@pytest.mark.parametrize("wait_hours", [72.0, 0.0])
def test_an_unreachable_pacs_spends_no_attempt_until_the_wait_is_over(tmp_path: Path, wait_hours: float) -> None:
    """The real worker, one attempt per job, a PACS port nothing listens on: within
    ``unreachable_wait_hours`` the failed try spends nothing (no ``delivery_dead``, the job waits for
    its lane); past it the same failure is the job's last (``delivery_dead`` audited with it)."""
    from storage.queue import delivery_lane
    from triage.pipeline.worker import Worker

    ctx = node_context(tmp_path, max_attempts=1, unreachable_wait_hours=wait_hours)
    obj_id = make_result_object(ctx, tmp_path)
    down = Destination("DOWN", "127.0.0.1", free_port())
    job_id = ctx.queue.enqueue("deliver", {"result_object_id": obj_id, "destination": str(down)},
                               lane=delivery_lane(down))
    Worker(ctx, ("deliver",), name="w").run(once=True)
    row = ctx.queue.get(job_id)
    with ctx.sessions() as s:
        dead = s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.DELIVERY_DEAD)).all()
        failed = s.scalars(select(Delivery)).all()
    assert [(d.ok, d.status) for d in failed] == [(False, "no-association")]
    if wait_hours:
        assert (row.state, row.attempts, dead) == ("failed", 0, [])
    else:
        assert row.state == "dead" and len(dead) == 1 and dead[0].details["status"] == "no-association"


def test_deliver_records_a_peer_failure_status_and_a_missing_file(tmp_path: Path) -> None:
    ctx = node_context(tmp_path / "node", max_attempts=5)
    obj_id = make_result_object(ctx, tmp_path)
    # The peer is another node whose disk is below its floor: it answers 0xA700.
    peer_ctx = node_context(tmp_path / "peer", disk_floor_mb=10)
    peer_ctx.store.free_bytes_override = 0
    with running_node(peer_ctx) as peer:
        ctx.queue.enqueue("deliver", {"result_object_id": obj_id, "destination": f"ICHTRIAGE@127.0.0.1:{peer.port}"})
        job = ctx.queue.claim("w", kinds=["deliver"])
        assert job is not None
        with pytest.raises(DeliveryError, match="peer answered 0xA700"):
            handle_deliver(ctx, job)
        ctx.queue.fail(job.id, "w", "peer full")
    with ctx.sessions() as s:
        ctx.store.path(s.get(ResultObject, obj_id).path).unlink()
    job = wait_for(lambda: ctx.queue.claim("w", kinds=["deliver"]), timeout=60, interval=0.05,
                   message="the retry to become claimable")
    with pytest.raises(DeliveryError, match="missing from the file store"):
        handle_deliver(ctx, job)
    with ctx.sessions() as s:
        rows = list(s.scalars(select(Delivery).order_by(Delivery.id)))
    assert [(r.attempt, r.ok, r.status) for r in rows] == [(1, False, "0xA700"), (2, False, "missing-file")]
    assert "missing" in rows[1].error


def _sop(ctx, obj_id: int) -> str:  # noqa: ANN001
    with ctx.sessions() as s:
        return s.get(ResultObject, obj_id).sop_instance_uid


def test_a_negative_result_is_withheld_at_send_time_once_its_study_is_positive(tmp_path: Path) -> None:
    """A held negative whose job escaped the withdrawal (lane down, backlog, a retry after the hold)
    must still never reach the PACS once another series flagged the study: checked when it sends."""
    from storage.models import Result, Study

    ctx = node_context(tmp_path / "node")
    obj_id = make_result_object(ctx, tmp_path)  # a negative result (Result.positive defaults to False)
    with ctx.sessions.begin() as s:
        result = s.get(ResultObject, obj_id).result
        assert result.positive is False
        s.get(Study, result.study_id).flagged = True  # another series of the study was positive
    with StoreSCP(tmp_path / "pacs") as pacs:
        ctx.queue.enqueue("deliver", {"result_object_id": obj_id, "destination": f"PACS@127.0.0.1:{pacs.port}"})
        job = ctx.queue.claim("w", kinds=["deliver"])
        assert job is not None
        handle_deliver(ctx, job)  # returns: nothing to send, nothing to retry
        assert pacs.files() == []
    with ctx.sessions() as s:
        assert s.scalars(select(Delivery)).all() == []
        withheld = [e for e in s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.QUEUED))
                    if e.details.get("withheld")]
        positive = s.get(Result, result.id)
    assert len(withheld) == 1 and withheld[0].details["result_object_id"] == obj_id
    assert positive is not None and positive.positive is False
