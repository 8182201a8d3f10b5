"""The study lifecycle (storage/lifecycle.py) and who may change a state.

* A study with two series is ``processing`` while either is, and ``done`` only when neither is
  waiting (the inference job used to set ``done`` unconditionally).
* A series reopened by a late instance gets new result instance UIDs, and Orthanc (default settings:
  it keeps the first copy of a UID) ends with the new finding.
* An inference job that dies is audited (``inference_failed``) and the study shows ``failed``.
* A full file store during inference postpones the job (no attempt used); it finishes by itself
  when space returns.
* Reads on SQLite do not wait for a writer.
* Layering and vocabulary: ``storage/`` imports nothing from ``triage/``; no state literal outside
  the lifecycle module and the migrations.
"""

from __future__ import annotations

import ast
import io
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from storage import audit, lifecycle
from storage.lifecycle import SeriesState, StudyStatus
from storage.models import AuditEvent, Series, Study, utcnow
from tests.node_process import NodeProcess
from tests.peers import SeriesSpec, make_ct_series, orthanc, storescu, wait_for
from tests.resilience_support import build_tiny_bundle, scalar, slow_hook_dir
from tests.test_resilience_receiver import tmpfs
from triage.context import AppContext
from triage.pipeline.worker import Worker

ROOT = Path(__file__).resolve().parents[1]


def _study_with_series(ctx: AppContext, n: int) -> tuple[int, list[int]]:
    with ctx.sessions.begin() as s:
        study = Study(study_uid="1.2.3.4", accession="A1")
        s.add(study)
        s.flush()
        ids = []
        for i in range(n):
            series = Series(study_id=study.id, series_uid=f"1.2.3.4.{i + 1}", state=SeriesState.SELECTED)
            s.add(series)
            s.flush()
            ids.append(series.id)
        lifecycle.refresh_study(s, study.id)
        return study.id, ids


def _status(ctx: AppContext, study_id: int) -> str:
    with ctx.reads() as s:
        return s.scalar(select(Study.status).where(Study.id == study_id)) or ""


def test_study_with_two_series_is_done_only_when_both_are(ctx: AppContext) -> None:
    study_id, (a, b) = _study_with_series(ctx, 2)
    assert _status(ctx, study_id) == StudyStatus.QUEUED
    with ctx.sessions.begin() as s:
        lifecycle.start_inference(s, a, 0, actor="w", job_id=1)
        lifecycle.start_inference(s, b, 0, actor="w", job_id=2)
    assert _status(ctx, study_id) == StudyStatus.PROCESSING
    with ctx.sessions.begin() as s:
        lifecycle.record_result(s, lifecycle.current_series(s, a, 0), positive=True)
    assert _status(ctx, study_id) == StudyStatus.PROCESSING, "series b is still processing"
    with ctx.sessions.begin() as s:
        study = s.get(Study, study_id)
        assert study is not None and study.flagged and study.priority == lifecycle.Priority.POSITIVE
        lifecycle.record_result(s, lifecycle.current_series(s, b, 0), positive=False)
    assert _status(ctx, study_id) == StudyStatus.DONE
    with ctx.reads() as s:  # a negative second series never lowers the flag or the priority
        study = s.get(Study, study_id)
        assert study is not None and study.flagged and study.priority == lifecycle.Priority.POSITIVE


def test_study_status_rules() -> None:
    S = SeriesState
    assert lifecycle.study_status([S.DONE, S.RECEIVING]) == StudyStatus.RECEIVING
    assert lifecycle.study_status([S.DONE, S.COMPLETE]) == StudyStatus.RECEIVING
    assert lifecycle.study_status([S.DONE, S.SKIPPED]) == StudyStatus.DONE
    assert lifecycle.study_status([S.FAILED, S.DONE]) == StudyStatus.FAILED
    assert lifecycle.study_status([S.FAILED, S.SELECTED]) == StudyStatus.QUEUED
    assert lifecycle.study_status([S.SKIPPED, S.SKIPPED]) == StudyStatus.SKIPPED


class FailingWorker(Worker):
    """The real worker loop and queue; the infer handler raises (a broken series or model)."""

    def _handler(self, kind: str) -> Any:
        def fail(job: Any) -> None:
            raise ValueError("volume cannot be assembled: mixed matrix sizes")

        return fail


def test_dead_inference_is_audited_and_fails_the_study(ctx: AppContext) -> None:
    study_id, (a, b) = _study_with_series(ctx, 2)
    ctx.queue.enqueue("infer", {"series_id": a, "generation": 0}, study_id=study_id, series_id=a, max_attempts=2)
    with ctx.sessions.begin() as s:  # the other series finished fine
        lifecycle.start_inference(s, b, 0, actor="w", job_id=0)
        lifecycle.record_result(s, lifecycle.current_series(s, b, 0), positive=False)
    w = FailingWorker(ctx, ("infer",), name="w-test")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ctx.queue.counts().get(("infer", "dead"), 0) == 0:
        w.run(once=True)
        time.sleep(0.25)
    assert ctx.queue.counts() == {("infer", "dead"): 1}
    with ctx.reads() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.INFERENCE_FAILED)).all()
        study = s.get(Study, study_id)
        series = s.get(Series, a)
        assert study is not None and series is not None
        assert (series.state, study.status) == (SeriesState.FAILED, StudyStatus.FAILED)
        assert "mixed matrix sizes" in study.status_reason
    assert len(events) == 1
    ev = events[0]
    assert ev.outcome == audit.FAILURE and ev.series_uid == "1.2.3.4.1" and ev.study_uid == "1.2.3.4"
    assert "mixed matrix sizes" in ev.details["error"]
    with ctx.reads() as s:
        assert audit.verify(s).ok


def test_an_infer_job_whose_worker_died_on_each_attempt_fails_its_series(ctx: AppContext) -> None:
    """A worker killed mid-inference (out of memory, a decoder crash) on the last attempt: the next
    claim buries the job on lease expiry, and the series and study end ``failed`` (audited) instead of
    showing "processing" for ever."""
    from storage.queue import JobQueue

    study_id, (a,) = _study_with_series(ctx, 1)
    q = JobQueue(ctx.sessions, lease_seconds=0.3, max_attempts=1)
    q.enqueue("infer", {"series_id": a, "generation": 0}, study_id=study_id, series_id=a)
    job = q.claim("w-killed")
    with ctx.sessions.begin() as s:
        lifecycle.start_inference(s, a, 0, actor="w-killed", job_id=job.id)
    assert _status(ctx, study_id) == StudyStatus.PROCESSING
    time.sleep(0.5)  # the worker is gone; its lease runs out
    assert q.claim("w-next") is None
    with ctx.reads() as s:
        series = s.get(Series, a)
        assert series is not None and series.state == SeriesState.FAILED
        events = s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.INFERENCE_FAILED)).all()
        assert len(events) == 1 and "expired on the last attempt" in events[0].details["error"]
        assert audit.verify(s).ok
    assert _status(ctx, study_id) == StudyStatus.FAILED


def test_a_database_error_at_completion_does_not_stop_the_worker(ctx: AppContext) -> None:
    """The job ran, then recording its completion failed (the database restarted): the worker thread
    goes on, and the job, whose lease then runs out, is run again and completed."""
    from storage.queue import JobQueue

    q = JobQueue(ctx.sessions, lease_seconds=0.5, max_attempts=3)
    job_id = q.enqueue("notify", {})
    ran: list[int] = []

    class Worker1(Worker):
        def _handler(self, kind: str) -> Any:
            return lambda job: ran.append(job.id)

    real_complete = q.complete
    broken = {"left": 1}

    def complete(*args: Any, **kw: Any) -> bool:
        if broken["left"]:
            broken["left"] -= 1
            raise OSError("server closed the connection unexpectedly")
        return real_complete(*args, **kw)

    q.complete = complete  # type: ignore[method-assign]
    ctx.queue = q
    w = Worker1(ctx, ("notify",), name="w-db")
    w.run(once=True)  # the completion fails: no exception escapes
    assert ran == [job_id] and q.get(job_id).state == "running"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and q.get(job_id).state != "done":
        w.run(once=True)
        time.sleep(0.2)
    assert ran == [job_id, job_id] and q.get(job_id).state == "done"


@pytest.mark.postgres
def test_series_writers_lock_the_study_first_as_the_receiver_does(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL (SQLite writers hold the whole database: no row locks to order). The completion
    monitor and the workers start from a series and update its study last; the receiver locks the
    study first. Each now locks the study row before the series, so the two orders cannot deadlock
    (a receiver recording one series of a study while another completes)."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from storage.migrate import upgrade
    from tests.conftest import make_settings

    upgrade(pg_url)
    ctx = AppContext(make_settings(tmp_path, database_url=pg_url), role="test")
    study_id, (a,) = _study_with_series(ctx, 1)
    with ctx.sessions.begin() as s:
        s.get(Series, a).state = SeriesState.RECEIVING  # type: ignore[union-attr]
    probe = "SELECT id FROM studies WHERE id = :i FOR UPDATE NOWAIT"
    for step in ("complete", "start"):
        with ctx.sessions.begin() as s:
            if step == "complete":
                assert lifecycle.complete_series(s, a, 0, 0)
            else:
                lifecycle.start_inference(s, a, 0, actor="w", job_id=1)
            with ctx.sessions() as other, pytest.raises(OperationalError, match="lock"):
                other.execute(text(probe), {"i": study_id})  # the study row is held already
            if step == "complete":
                lifecycle.select_for_inference(s, s.get(Series, a), s.get(Study, study_id), stat=False)
    ctx.close()


def test_sqlite_reads_do_not_wait_for_a_writer(sqlite_ctx: AppContext) -> None:
    ctx = sqlite_ctx
    study_id, _ = _study_with_series(ctx, 1)
    path = str(ctx.engine.url.database)
    writer = sqlite3.connect(path, isolation_level=None, timeout=60)
    writer.execute("BEGIN IMMEDIATE")  # e.g. the receiver committing a batch
    try:
        t0 = time.monotonic()
        assert _status(ctx, study_id) == StudyStatus.QUEUED
        assert ctx.queue.counts() == {}
        from triage.dicom.completion import SeriesMonitor

        assert SeriesMonitor(ctx).tick() == []  # its scan reads; nothing is receiving
        assert time.monotonic() - t0 < 5, "a read waited for the write lock"

        result: list[float] = []

        def write() -> None:  # a writer still waits for the lock (and gets it when it is free)
            t = time.monotonic()
            with ctx.sessions.begin() as s:
                s.execute(select(Study.id))
            result.append(time.monotonic() - t)

        th = threading.Thread(target=write)
        th.start()
        time.sleep(1.0)
        assert not result, "a writer must wait for the lock"
    finally:
        writer.execute("COMMIT")
        writer.close()
    th.join(30)
    assert result and result[0] >= 0.9


# ---------------------------------------------------------------------------------- static rules
def _py_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in (ROOT / d).rglob("*.py")]


def test_storage_imports_nothing_from_triage() -> None:
    offenders = []
    for path in _py_files("storage"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("triage", "reports")]
    assert offenders == []


STATE_WORDS = {str(v) for enum in (SeriesState, StudyStatus, lifecycle.JobState) for v in enum}


def test_no_state_literals_outside_the_lifecycle() -> None:
    """Assignments and comparisons of ``state``/``status`` fields use the lifecycle's enums."""
    words = "|".join(sorted(STATE_WORDS))
    pattern = re.compile(r"""\b(state|status)\s*(==|!=|=)\s*["'](""" + words + r""")["']""")
    call = re.compile(r"""\b(state|status)\.in_\(\(?["'](""" + words + r""")["']""")
    offenders = []
    for path in _py_files("triage", "storage", "reports"):
        if path.name == "lifecycle.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) or call.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


# ---------------------------------------------------------------------------------- real node
@pytest.mark.network
@pytest.mark.slow
def test_reopened_series_gets_new_result_uids_and_the_pacs_ends_with_the_new_finding(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle", threshold=1.0)  # every study negative: an SR only
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=20, size=64, accession="ACC-R"))
    with orthanc(tmp_path / "orthanc") as pacs:
        env = {"TRIAGE_BUNDLE_PATH": str(bundle), "TRIAGE_STABLE_SECONDS": "2", "TRIAGE_EARLY_COMPLETE": "false",
               "TRIAGE_DESTINATIONS": f"ORTHANC@127.0.0.1:{pacs.dicom_port}"}
        with NodeProcess(tmp_path / "node", "serve", env=env) as node:
            url = f"sqlite:///{tmp_path / 'node' / 'data' / 'triage.sqlite3'}"
            assert storescu(node.dicom_port, paths[:-1]).returncode == 0
            delivered = ("select count(*) from result_objects o join results r on r.id = o.result_id "
                         "where r.generation = {g} and o.kind = 'sr' and exists (select 1 from deliveries d "
                         "where d.result_object_id = o.id and d.ok)")
            try:
                wait_for(lambda: scalar(url, delivered.format(g=0)) == 1, timeout=120,
                         message="first report delivered")
            except TimeoutError:
                raise AssertionError(node.tail(80)) from None
            first = scalar(url, "select sop_instance_uid from result_objects where kind = 'sr'")
            # A late instance reopens the series: generation 1, a new result for 20 slices.
            assert storescu(node.dicom_port, paths[-1:]).returncode == 0
            wait_for(lambda: scalar(url, delivered.format(g=1)) == 1, timeout=120,
                     message="second report delivered")
            second = scalar(url, "select o.sop_instance_uid from result_objects o join results r "
                                 "on r.id = o.result_id where o.kind = 'sr' and r.generation = 1")
            assert scalar(url, "select count(*) from results where generation = 1 and not superseded") == 1
            assert first and second and first != second
            in_pacs = pacs.instance_uids()
            assert {first, second} <= in_pacs
            # The PACS holds the new report, and its evidence is the 20-slice series.
            sr_id = next(i for i in pacs.get("/instances") if pacs.get(f"/instances/{i}/simplified-tags")
                         .get("SOPInstanceUID") == second)
            raw = pacs.request("GET", f"/instances/{sr_id}/file")
            sr = dcmread(io.BytesIO(raw))
            evidence = {str(ref.ReferencedSOPInstanceUID)
                        for st in sr.CurrentRequestedProcedureEvidenceSequence
                        for se in st.ReferencedSeriesSequence for ref in se.ReferencedSOPSequence}
            assert len(evidence) == 20
            assert str(dcmread(paths[-1], stop_before_pixels=True).SOPInstanceUID) in evidence


@pytest.mark.slow
def test_inference_on_a_full_disk_resumes_by_itself(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle", threshold=0.0)  # positive: SEG, SR and SC to write
    hook = slow_hook_dir(tmp_path / "hook")
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=20, size=64, accession="ACC-D"))
    store = tmp_path / "node" / "data" / "store"
    with tmpfs(store, 8):
        env = {"TRIAGE_BUNDLE_PATH": str(bundle), "TRIAGE_STABLE_SECONDS": "1", "TRIAGE_MAX_ATTEMPTS": "2",
               "TRIAGE_RETRY_BASE_SECONDS": "0.5", "TRIAGE_TEST_SLOW_PREDICT": "3", "PYTHONPATH": str(hook)}
        with NodeProcess(tmp_path / "node", "serve", env=env) as node:
            url = f"sqlite:///{tmp_path / 'node' / 'data' / 'triage.sqlite3'}"
            assert storescu(node.dicom_port, paths).returncode == 0
            wait_for(lambda: scalar(url, "select count(*) from audit_events where event_type = 'processing'") >= 1,
                     timeout=60, message="inference started")
            # Fill the file system to the last block while the model runs.
            ballast = store / "ballast.bin"
            with open(ballast, "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
            wait_for(lambda: scalar(url, "select count(*) from audit_events where event_type = 'job_failed'") >= 3,
                     timeout=120, message="three postponed tries (more than max_attempts)")
            assert scalar(url, "select state from jobs where kind = 'infer'") in ("failed", "running")
            assert scalar(url, "select count(*) from audit_events where event_type = 'job_dead'") == 0
            assert scalar(url, "select state from series") != "failed"
            os.remove(ballast)  # space comes back; nobody retries by hand
            wait_for(lambda: scalar(url, "select state from series") == "done", timeout=120,
                     message="inference finished once space returned")
            # the job is completed in the worker's next transaction, just after the series' result
            wait_for(lambda: scalar(url, "select state from jobs where kind = 'infer'") == "done", timeout=30,
                     message="infer job completed")
            assert scalar(url, "select count(*) from result_objects") >= 2
            assert node.alive(), node.tail(60)


def test_fail_inference_ignores_an_older_generation(ctx: AppContext) -> None:
    _study_id, (a,) = _study_with_series(ctx, 1)
    with ctx.sessions.begin() as s:
        series = s.get(Series, a)
        assert series is not None
        series.generation = 1  # reopened meanwhile
        series.state = SeriesState.RECEIVING
        series.last_received_at = utcnow()
    with ctx.sessions.begin() as s:
        assert lifecycle.fail_inference(s, a, job_id=1, error="x", actor="w", generation=0) is False
    with ctx.reads() as s:
        assert s.scalar(select(Series.state).where(Series.id == a)) == SeriesState.RECEIVING


def test_fail_inference_leaves_a_series_whose_result_is_recorded(ctx: AppContext) -> None:
    """The result was recorded, then the job could not be marked done and died on lease expiry: the
    series stays ``done`` (its result went out), not ``failed``."""
    study_id, (a,) = _study_with_series(ctx, 1)
    with ctx.sessions.begin() as s:
        lifecycle.start_inference(s, a, 0, actor="w", job_id=1)
        lifecycle.record_result(s, lifecycle.current_series(s, a, 0), positive=False)
    with ctx.sessions.begin() as s:
        assert lifecycle.fail_inference(s, a, job_id=1, error="x", actor="queue", generation=0) is False
    assert _status(ctx, study_id) == StudyStatus.DONE
