"""Group commit of instance rows: nothing committed before its file is written, failures isolated."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage.models import AuditEvent, Instance
from tests.peers import SeriesSpec, make_ct_dataset, node_context
from triage.dicom.header import header_from_dataset
from triage.dicom.recorder import InstanceRecord, Recorder


def records(n: int, spec: SeriesSpec | None = None) -> list[InstanceRecord]:
    spec = spec or SeriesSpec(slices=n, size=16)
    out = []
    for i in range(n):
        h = header_from_dataset(make_ct_dataset(spec, i, 5.0 * i), True)
        out.append(InstanceRecord(h, f"instances/x/{h.sop_instance_uid}.dcm", 100, "0" * 64,
                                  "1.2.840.10008.1.2.1", "MODALITY", "127.0.0.1", written=Future()))
    return out


def instance_count(ctx) -> int:  # noqa: ANN001
    with ctx.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


@pytest.fixture
def recorder(tmp_path: Path):  # noqa: ANN201
    ctx = node_context(tmp_path)
    rec = Recorder(ctx.sessions)
    rec.start()
    yield ctx, rec
    rec.stop()
    ctx.close()


def test_rows_wait_for_the_file_and_are_committed_in_groups(recorder) -> None:  # noqa: ANN001
    ctx, rec = recorder
    recs = records(10)
    futures = [rec.submit(r) for r in recs]
    time.sleep(0.5)
    assert instance_count(ctx) == 0  # files not written yet: nothing committed, nothing acknowledged
    assert not any(f.done() for f in futures)
    for r in recs:
        r.written.set_result(None)
    assert [f.result(timeout=60) for f in futures] == [False] * 10
    assert instance_count(ctx) == 10
    assert rec.batches < 10 and rec.recorded == 10  # queued records shared transactions
    with ctx.sessions() as s:
        counts = list(s.scalars(select(AuditEvent.details).where(AuditEvent.event_type == "received")))
    assert sum(c["count"] for c in counts) == 10


def test_a_failed_file_write_drops_only_that_record(recorder) -> None:  # noqa: ANN001
    ctx, rec = recorder
    blocker, *recs = records(4)
    first = rec.submit(blocker)  # holds the writer while the next three queue up as one batch
    futures = [rec.submit(r) for r in recs]
    recs[1].written.set_exception(OSError("disk on fire"))
    for r in (blocker, recs[0], recs[2]):
        r.written.set_result(None)
    assert first.result(timeout=60) is False
    assert futures[0].result(timeout=60) is False and futures[2].result(timeout=60) is False
    with pytest.raises(OSError, match="disk on fire"):
        futures[1].result(timeout=60)
    with ctx.sessions() as s:
        uids = set(s.scalars(select(Instance.sop_instance_uid)))
    assert uids == {r.header.sop_instance_uid for r in (blocker, recs[0], recs[2])}


def test_duplicates_in_and_across_batches(recorder) -> None:  # noqa: ANN001
    ctx, rec = recorder
    (one,) = records(1)
    again = InstanceRecord(one.header, one.rel, 100, "0" * 64, one.transfer_syntax, "OTHER", None, written=Future())
    f1, f2 = rec.submit(one), rec.submit(again)
    one.written.set_result(None)
    again.written.set_result(None)
    assert (f1.result(timeout=60), f2.result(timeout=60)) == (False, True)
    assert instance_count(ctx) == 1


def test_directories_are_synced_once_per_batch_before_the_commit(tmp_path: Path) -> None:
    ctx = node_context(tmp_path)
    calls: list[tuple[list[str], int]] = []

    def sync_dirs(rels: list[str]) -> None:
        calls.append((sorted(rels), instance_count(ctx)))  # rows committed at the time of the sync
        ctx.store.sync_dirs(rels)

    rec = Recorder(ctx.sessions, sync_dirs=sync_dirs)
    rec.start()
    try:
        blocker, *recs = records(4)
        first = rec.submit(blocker)
        futures = [rec.submit(r) for r in recs]
        for r in (blocker, *recs):
            ctx.store.path(r.rel).parent.mkdir(parents=True, exist_ok=True)
            r.written.set_result(None)
        assert first.result(timeout=60) is False and [f.result(timeout=60) for f in futures] == [False] * 3
    finally:
        rec.stop()
    assert sorted(rel for rels, _ in calls for rel in rels) == sorted(r.rel for r in (blocker, *recs))
    assert len(calls) == rec.batches  # one call per batch (each directory once: FileStore.sync_dirs)
    done = 0
    for rels, committed in calls:
        assert committed == done  # synced before the batch's rows were committed
        done += len(rels)
    assert instance_count(ctx) == 4
    ctx.close()


def test_a_failed_directory_sync_refuses_the_batch(tmp_path: Path) -> None:
    ctx = node_context(tmp_path)

    def sync_dirs(rels: list[str]) -> None:
        raise OSError(5, "Input/output error")

    rec = Recorder(ctx.sessions, sync_dirs=sync_dirs)
    rec.start()
    try:
        recs = records(3)
        futures = [rec.submit(r) for r in recs]
        for r in recs:
            r.written.set_result(None)
        for f in futures:
            with pytest.raises(OSError, match="Input/output error"):
                f.result(timeout=60)
    finally:
        rec.stop()
    assert instance_count(ctx) == 0  # names not durable: no rows, so no instance is acknowledged
    ctx.close()


def test_statements_run_while_files_flush_and_the_commit_waits_for_them(tmp_path: Path) -> None:
    """The overlapped path: the batch's transaction is open while its files are still being
    written (a reader sees nothing), it commits right after the last file is durable, not after
    the fallback's OVERLAP_WAIT."""
    from storage.db import make_read_sessionmaker

    ctx = node_context(tmp_path)
    reads = make_read_sessionmaker(ctx.engine)
    rec = Recorder(ctx.sessions)
    rec.start()
    try:
        recs = records(3)
        futures = [rec.submit(r) for r in recs]
        time.sleep(0.3)  # the writer has run the statements and waits for the files
        with reads() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 0
        assert not any(f.done() for f in futures)
        t0 = time.monotonic()
        for r in recs:
            r.written.set_result(None)
        assert [f.result(timeout=60) for f in futures] == [False] * 3
        assert time.monotonic() - t0 < 1.5  # committed on the overlapped path, not after falling back
        assert rec.overlapped >= 1 and rec.recorded == 3
    finally:
        rec.stop()
    assert instance_count(ctx) == 3
    ctx.close()


def test_a_slow_file_falls_back_without_committing_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file not durable within OVERLAP_WAIT: the open transaction rolls back (the lock is let go)
    and the rows are committed only once the file is there."""
    import triage.dicom.recorder as recorder_mod

    monkeypatch.setattr(recorder_mod, "OVERLAP_WAIT", 0.2)
    ctx = node_context(tmp_path)
    rec = Recorder(ctx.sessions)
    rec.start()
    try:
        (slow,) = records(1)
        future = rec.submit(slow)
        time.sleep(0.8)
        assert instance_count(ctx) == 0 and not future.done()  # a writer session gets the lock: rolled back
        slow.written.set_result(None)
        assert future.result(timeout=60) is False
        assert rec.overlapped == 0 and rec.recorded == 1
    finally:
        rec.stop()
    assert instance_count(ctx) == 1
    ctx.close()
