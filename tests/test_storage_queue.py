"""Job queue semantics on SQLite and PostgreSQL, with real worker processes."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from storage import audit
from storage.db import make_engine, make_sessionmaker
from storage.models import AuditEvent, Job, JobLane, Study, Worker, utcnow
from storage.queue import DEAD, DONE, FAILED, QUEUED, RUNNING, JobQueue, LaneDown
from storage.workers import WorkerRegistry, stale_after
from triage.context import AppContext

REPO = Path(__file__).resolve().parent.parent


def make_queue(ctx: AppContext, **kw: float) -> JobQueue:
    params = {"lease_seconds": 30.0, "max_attempts": 3, "retry_base_seconds": 0.0, "retry_max_seconds": 60.0}
    params.update(kw)
    return JobQueue(ctx.sessions, **params)  # type: ignore[arg-type]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def job_row(ctx: AppContext, job_id: int) -> Job:
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


# ------------------------------------------------------------------------------ ordering
def test_priority_then_oldest_order_and_kind_filter(ctx: AppContext) -> None:
    q = make_queue(ctx)
    now = utcnow()
    old = now - dt.timedelta(minutes=5)
    a = q.enqueue("infer", {"n": "a"}, priority=0, run_after=old)
    b = q.enqueue("infer", {"n": "b"}, priority=10)
    c = q.enqueue("deliver", {"n": "c"}, priority=20)
    d = q.enqueue("infer", {"n": "d"}, priority=0, run_after=old - dt.timedelta(minutes=1))
    later = q.enqueue("infer", {"n": "later"}, priority=99, run_after=now + dt.timedelta(hours=1))

    assert q.claim("w", kinds=["infer"]).id == b  # deliver (20) filtered out; 10 beats 0
    assert q.claim("w").id == c
    assert q.claim("w").id == d  # same priority: oldest run_after first
    first = q.claim("w")
    assert first.id == a and first.payload == {"n": "a"} and first.attempts == 1
    assert q.claim("w") is None  # the priority-99 job is not due yet
    assert job_row(ctx, later).state == QUEUED


def test_claimed_job_fields_and_complete(ctx: AppContext) -> None:
    q = make_queue(ctx, lease_seconds=45)
    with ctx.sessions.begin() as s:
        study = Study(study_uid="1.2.3.4")
        s.add(study)
        s.flush()
        study_id = study.id
    job_id = q.enqueue("infer", {"series_id": 7, "generation": 1}, study_id=study_id, priority=10)
    before = utcnow()
    job = q.claim("w1")
    assert job is not None
    assert (job.id, job.kind, job.study_id, job.priority, job.attempts) == (job_id, "infer", study_id, 10, 1)
    row = job_row(ctx, job_id)
    assert row.state == RUNNING and row.lease_owner == "w1"
    assert before + dt.timedelta(seconds=44) <= row.lease_expires_at <= utcnow() + dt.timedelta(seconds=46)
    assert q.complete(job_id, "w1") is True
    row = job_row(ctx, job_id)
    assert row.state == DONE and row.finished_at is not None
    assert q.complete(job_id, "w1") is False  # already done: a second completion changes nothing
    assert q.counts() == {("infer", DONE): 1}


# ------------------------------------------------------------------------------ retries
def test_backoff_is_exponential_capped_and_dead_after_max_attempts(ctx: AppContext) -> None:
    q = make_queue(ctx, max_attempts=4, retry_base_seconds=10, retry_max_seconds=30)
    job_id = q.enqueue("deliver", {"destination": "PACS"})
    expected = [10.0, 20.0, 30.0]  # 10 * 2**(n-1), capped at 30
    for attempt, delay in enumerate(expected, start=1):
        job = q.claim("w")
        assert job is not None and job.id == job_id and job.attempts == attempt
        t0 = utcnow()
        assert q.fail(job_id, "w", f"refused {attempt}") is True
        t1 = utcnow()
        row = job_row(ctx, job_id)
        assert row.state == FAILED and row.last_error == f"refused {attempt}"
        low = t0 + dt.timedelta(seconds=delay)
        high = t1 + dt.timedelta(seconds=min(30.0, delay * (1 + q.jitter)))
        assert low <= row.run_after <= high, (attempt, row.run_after - t0)
        assert q.claim("w") is None  # waiting for the back-off
        with ctx.sessions.begin() as s:  # time travel: make the retry due now
            s.execute(text("UPDATE jobs SET run_after = :t WHERE id = :i"), {"t": utcnow(), "i": job_id})
    job = q.claim("w")
    assert job is not None and job.attempts == 4
    assert q.fail(job_id, "w", "refused 4") is True
    row = job_row(ctx, job_id)
    assert row.state == DEAD and row.finished_at is not None
    assert q.counts() == {("deliver", DEAD): 1}
    assert q.claim("w") is None
    with ctx.sessions() as s:
        kinds = [e.event_type for e in audit.events(s, newest_first=False)]
        assert kinds == [audit.JOB_FAILED] * 3 + [audit.JOB_DEAD]
        assert audit.verify(s).ok

    assert q.retry_dead(job_id, actor="admin") is True
    row = job_row(ctx, job_id)
    assert (row.state, row.attempts) == (QUEUED, 0)
    assert q.retry_dead(job_id) is False  # not dead any more
    assert q.claim("w").id == job_id
    with ctx.sessions() as s:
        assert audit.events(s, limit=1)[0].event_type == audit.JOB_RETRIED


def test_permanent_failure_goes_dead_at_once(ctx: AppContext) -> None:
    q = make_queue(ctx, max_attempts=5)
    job_id = q.enqueue("notify", {"channel": "hl7"})
    q.claim("w")
    assert q.fail(job_id, "w", "bad configuration", retry=False) is True
    assert job_row(ctx, job_id).state == DEAD


# ------------------------------------------------------------------------------ leases
def test_lease_expiry_hands_job_to_another_worker(ctx: AppContext) -> None:
    q = make_queue(ctx, lease_seconds=0.5)
    job_id = q.enqueue("infer", {})
    assert q.claim("w1").id == job_id
    assert q.claim("w2") is None  # leased
    assert q.heartbeat(job_id, "w1") is True
    taken = wait_for(lambda: q.claim("w2"), timeout=20)
    assert taken.id == job_id and taken.attempts == 2
    # The old holder lost the lease: it must not touch the job any more.
    assert q.heartbeat(job_id, "w1") is False
    assert q.complete(job_id, "w1") is False
    assert q.fail(job_id, "w1", "late error") is False
    row = job_row(ctx, job_id)
    assert (row.state, row.lease_owner) == (RUNNING, "w2")
    assert q.complete(job_id, "w2") is True
    assert job_row(ctx, job_id).state == DONE


def test_expired_lease_on_last_attempt_goes_dead(ctx: AppContext) -> None:
    q = make_queue(ctx, lease_seconds=0.3, max_attempts=1)
    job_id = q.enqueue("infer", {})
    other = q.enqueue("infer", {}, run_after=utcnow() + dt.timedelta(seconds=0.5))
    assert q.claim("w1").id == job_id
    # The worker "dies"; the next claim buries the job (no attempts left) and takes the next one.
    nxt = wait_for(lambda: q.claim("w2"), timeout=20)
    assert nxt.id == other
    row = job_row(ctx, job_id)
    assert row.state == DEAD and "expired" in row.last_error


# ------------------------------------------------------------------------------ dedupe and priority
def test_dedupe_key_returns_live_job_and_renames_finished_one(ctx: AppContext) -> None:
    q = make_queue(ctx)
    a = q.enqueue("infer", {"generation": 0}, dedupe_key="infer:1.2.3:0", priority=0)
    assert q.enqueue("infer", {"generation": 0}, dedupe_key="infer:1.2.3:0", priority=20) == a
    assert job_row(ctx, a).priority == 20  # raised by the duplicate
    assert q.enqueue("infer", {}, dedupe_key="infer:1.2.3:0", priority=0) == a
    assert job_row(ctx, a).priority == 20  # never lowered
    job = q.claim("w")
    assert q.enqueue("infer", {}, dedupe_key="infer:1.2.3:0") == a  # running is still live
    q.complete(job.id, "w")
    b = q.enqueue("infer", {"generation": 0}, dedupe_key="infer:1.2.3:0")
    assert b != a
    assert job_row(ctx, a).dedupe_key == f"infer:1.2.3:0#{a}"
    assert job_row(ctx, b).dedupe_key == "infer:1.2.3:0"
    assert q.counts() == {("infer", DONE): 1, ("infer", QUEUED): 1}


def test_concurrent_enqueue_with_same_key_makes_one_job(ctx: AppContext) -> None:
    q = make_queue(ctx)
    ids: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def go() -> None:
        try:
            barrier.wait()
            ids.append(q.enqueue("deliver", {}, dedupe_key="deliver:9:PACS"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(ids) == 6 and len(set(ids)) == 1
    assert q.counts() == {("deliver", QUEUED): 1}


def test_enqueue_joins_caller_transaction(ctx: AppContext) -> None:
    q = make_queue(ctx)
    with pytest.raises(RuntimeError), ctx.sessions.begin() as s:
        q.enqueue("infer", {}, session=s)
        raise RuntimeError("selection failed after enqueue")
    assert q.counts() == {}
    with ctx.sessions.begin() as s:
        job_id = q.enqueue("infer", {}, session=s)
    assert job_row(ctx, job_id).state == QUEUED


def test_worker_registry_prunes_processes_without_heartbeat(ctx: AppContext) -> None:
    reg = WorkerRegistry(ctx.sessions)
    reg.register("host:1:worker", role="worker", meta={"device": "cpu"})
    reg.register("host:2:receiver", role="receiver")
    assert reg.heartbeat("host:1:worker", current_job_id=5) is True
    assert reg.heartbeat("nobody") is False
    with ctx.sessions() as s:
        workers = {w.id: w for w in s.scalars(select(Worker))}
    assert set(workers) == {"host:1:worker", "host:2:receiver"}
    assert workers["host:1:worker"].current_job_id == 5 and workers["host:1:worker"].meta == {"device": "cpu"}
    with ctx.sessions.begin() as s:  # the receiver was killed (SIGKILL): its heartbeat stopped 10 min ago
        s.execute(
            text("UPDATE workers SET heartbeat_at = :t WHERE id = 'host:2:receiver'"),
            {"t": utcnow() - dt.timedelta(minutes=10)},
        )
    assert reg.prune(stale_after(10.0)) == 1
    assert reg.prune(stale_after(10.0)) == 0
    reg.unregister("host:1:worker")
    with ctx.sessions() as s:
        assert s.scalars(select(Worker)).all() == []


def test_postponed_job_keeps_its_attempts_and_backs_off(ctx: AppContext) -> None:
    q = make_queue(ctx, max_attempts=2, retry_base_seconds=0.01)
    jid = q.enqueue("infer", {"series_id": 1})
    for times in range(1, 6):  # more postponements than attempts: never dead
        job = q.claim("w")
        assert job is not None and job.id == jid and job.attempts == 1
        assert q.postpone(jid, "w", "OSError: [Errno 28] No space left on device", cap_seconds=0.02)
        row = job_row(ctx, jid)
        assert (row.state, row.attempts, row.payload["postponed"]) == (FAILED, 0, times)
        time.sleep(0.05)
    assert q.postpone(jid, "someone-else", "x") is False
    job = q.claim("w")
    assert job is not None and q.complete(jid, "w")
    assert job_row(ctx, jid).state == DONE
    with ctx.sessions() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "job_failed")).all()
    assert len(events) == 5 and all(e.details["postponed"] for e in events)


def test_cli_status_and_retry(ctx: AppContext, tmp_path: Path) -> None:
    q = make_queue(ctx, max_attempts=1)
    job_id = q.enqueue("deliver", {})
    q.claim("w")
    q.fail(job_id, "w", "association rejected")
    url = ctx.engine.url.render_as_string(hide_password=False)
    env = {**os.environ, "TRIAGE_DATA_DIR": str(tmp_path / "data"), "TRIAGE_DATABASE_URL": url}
    run = [str(REPO / ".venv" / "bin" / "triage")]
    out = subprocess.run([*run, "queue", "status"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "deliver" in out.stdout and str(job_id) in out.stdout and "association rejected" in out.stdout
    out = subprocess.run([*run, "queue", "retry", str(job_id)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "re-queued" in out.stdout, out.stdout + out.stderr
    assert job_row(ctx, job_id).state == QUEUED


# ------------------------------------------------------------------------------ lanes (per-destination FIFO)
def lane_row(ctx: AppContext, key: str) -> JobLane | None:
    with ctx.sessions() as s:
        return s.get(JobLane, key)


def test_lane_runs_one_at_a_time_in_order_and_backs_off_as_a_whole(ctx: AppContext) -> None:
    q = make_queue(ctx, max_attempts=5, retry_base_seconds=0.4, retry_max_seconds=0.8)
    a1, a2, a3 = (q.enqueue("deliver", {"n": n}, lane="dicom:A") for n in ("a1", "a2", "a3"))
    b1 = q.enqueue("deliver", {"n": "b1"}, lane="dicom:B")
    i1 = q.enqueue("infer", {"n": "i1"})

    head = q.claim("w1")
    assert head.id == a1 and head.lane == "dicom:A"
    # a1 is in flight: the rest of lane A waits; lane B and inference do not.
    assert [q.claim("w2").id, q.claim("w3").id] == [b1, i1]
    assert q.claim("w4") is None
    assert q.complete(b1, "w2", lane="dicom:B") and q.complete(i1, "w3")

    # The destination is down: the whole lane backs off, a1 stays at the head.
    assert q.fail(a1, "w1", "no association", lane_down=True) is True
    lane = lane_row(ctx, "dicom:A")
    assert lane is not None and lane.failures == 1 and lane.blocked_until is not None
    row = job_row(ctx, a1)
    assert row.state == FAILED and row.run_after == lane.blocked_until
    assert q.claim("w2") is None  # a2 and a3 are not attempted while a1 waits for its retry
    assert (job_row(ctx, a2).attempts, job_row(ctx, a3).attempts) == (0, 0)
    with ctx.sessions() as s:
        ev = audit.events(s, limit=1)[0]
        assert ev.event_type == audit.JOB_FAILED and ev.details["lane_down"] is True

    # Down again on the retry: the lane's own back-off doubles (0.4 s, then 0.8 s).
    again = wait_for(lambda: q.claim("w2"), timeout=10)
    assert again.id == a1 and again.attempts == 2
    t0 = utcnow()
    q.fail(a1, "w2", "no association", lane_down=True)
    lane = lane_row(ctx, "dicom:A")
    assert lane.failures == 2 and lane.blocked_until >= t0 + dt.timedelta(seconds=0.8)

    # The destination is back: a1, a2, a3 in order, and the lane's back-off is cleared.
    order = []
    for _ in range(3):
        job = wait_for(lambda: q.claim("w3"), timeout=10)
        assert q.claim("w4") is None  # never two of one lane in flight
        order.append(job.id)
        assert q.complete(job.id, "w3", lane=job.lane)
        lane = lane_row(ctx, "dicom:A")
        assert (lane.failures, lane.blocked_until) == (0, None)
    assert order == [a1, a2, a3]


def test_lane_priority_goes_first_and_object_failure_does_not_block(ctx: AppContext) -> None:
    q = make_queue(ctx, max_attempts=3, retry_base_seconds=60)
    r1 = q.enqueue("deliver", {"n": "r1"}, lane="dicom:A")
    r2 = q.enqueue("deliver", {"n": "r2"}, lane="dicom:A")
    p1 = q.enqueue("deliver", {"n": "p1"}, lane="dicom:A", priority=20)
    assert q.claim("w").id == p1  # a positive result goes ahead of routine ones waiting
    q.complete(p1, "w", lane="dicom:A")
    assert q.claim("w").id == r1
    # The peer refused this one object (not the destination): only r1 backs off, r2 goes on.
    assert q.fail(r1, "w", "peer answered 0xA700", lane_down=False) is True
    assert lane_row(ctx, "dicom:A") is None
    assert job_row(ctx, r1).run_after > utcnow() + dt.timedelta(seconds=50)
    assert q.claim("w").id == r2


def test_lane_head_dead_after_max_attempts_lets_the_next_go_after_the_lane_back_off(ctx: AppContext) -> None:
    q = make_queue(ctx, max_attempts=1, retry_base_seconds=0.3, retry_max_seconds=5)
    a1 = q.enqueue("deliver", {}, lane="dicom:A")
    a2 = q.enqueue("deliver", {}, lane="dicom:A")
    q.claim("w")
    q.fail(a1, "w", "no association", lane_down=True)
    assert job_row(ctx, a1).state == DEAD
    assert q.claim("w") is None  # the destination is still backing off
    nxt = wait_for(lambda: q.claim("w"), timeout=10)
    assert nxt.id == a2
    q.fail(a2, "w", "no association", lane_down=True)
    assert lane_row(ctx, "dicom:A").failures == 2  # destination-level count, across jobs


def test_an_unreachable_lane_spends_no_attempt_and_its_head_never_dies(ctx: AppContext) -> None:
    """Nothing could connect (``spend_attempt=False``): a PACS away longer than the head's attempts
    last does not kill it; the lane's back-off still grows, and a failure of the object itself still
    counts."""
    q = make_queue(ctx, max_attempts=2, retry_base_seconds=0.05, retry_max_seconds=0.1)
    a1 = q.enqueue("deliver", {}, lane="dicom:A")
    a2 = q.enqueue("deliver", {}, lane="dicom:A")
    for n in range(1, 6):
        job = wait_for(lambda: q.claim("w"), timeout=10)
        assert job.id == a1
        assert q.fail(a1, "w", "could not connect", lane_down=True, spend_attempt=False)
        row = job_row(ctx, a1)
        assert (row.state, row.attempts) == (FAILED, 0) and lane_row(ctx, "dicom:A").failures == n
    with ctx.sessions() as s:
        assert not s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.JOB_DEAD)).all()
    # the destination answers, but breaks on this object each time: those attempts count
    for _ in range(2):
        job = wait_for(lambda: q.claim("w"), timeout=10)
        q.fail(job.id, "w", "association lost", lane_down=True)
    assert job_row(ctx, a1).state == DEAD
    assert wait_for(lambda: q.claim("w"), timeout=10).id == a2
    # a job that has waited longer than unreachable_wait_seconds spends its attempts again (dead letter)
    q0 = make_queue(ctx, unreachable_wait_seconds=0)
    q0.fail(a2, "w", "could not connect", lane_down=True, spend_attempt=False)
    assert (job_row(ctx, a2).state, job_row(ctx, a2).attempts) == (FAILED, 1)


def test_drain_maps_lane_down_exception(ctx: AppContext) -> None:
    q = make_queue(ctx, retry_base_seconds=30)
    a1 = q.enqueue("deliver", {}, lane="dicom:A")
    q.enqueue("deliver", {}, lane="dicom:A")

    def handler(job) -> None:  # noqa: ANN001
        raise LaneDown("destination unreachable")

    assert q.drain("w", handler) == 1  # the second is held behind the first
    assert job_row(ctx, a1).state == FAILED and lane_row(ctx, "dicom:A").failures == 1


def _claim_worker(url: str, worker_id: str, ready: mp.Queue, go: mp.Event, log: str) -> None:  # type: ignore[type-arg]
    """Worker process: claim until empty; record each job in the table ``log`` in the transaction that
    completes it (``lane_log``: start and end of a short 'send'; ``completions``: who did it)."""
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    q = JobQueue(sessions, lease_seconds=120)
    ready.put(worker_id)
    go.wait(60)
    while True:
        job = q.claim(worker_id)
        if job is None:
            break
        started = time.time()
        # the job's work, outside any transaction: without it one SQLite process can re-take the write
        # lock back to back and drain the queue while the others sleep in their busy handlers
        time.sleep(0.005 if log == "lane_log" else 0.002)
        with sessions.begin() as s:
            if log == "lane_log":
                s.execute(text("INSERT INTO lane_log (job_id, lane, t0, t1) VALUES (:j, :l, :a, :b)"),
                          {"j": job.id, "l": job.lane or "", "a": started, "b": time.time()})
            else:
                s.execute(text("INSERT INTO completions (job_id, worker) VALUES (:j, :w)"),
                          {"j": job.id, "w": worker_id})
            if not q.complete(job.id, worker_id, session=s, lane=job.lane):
                raise RuntimeError(f"lost lease on {job.id}")
    engine.dispose()


def _run_claim_workers(ctx: AppContext, log: str, n: int = 4) -> float:
    """Start ``n`` worker processes together, wait for all to drain the queue; seconds taken."""
    url = ctx.engine.url.render_as_string(hide_password=False)
    spawn = mp.get_context("spawn")
    ready, go = spawn.Queue(), spawn.Event()
    procs = [spawn.Process(target=_claim_worker, args=(url, f"w{i}", ready, go, log)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        t0 = time.monotonic()
        go.set()
        for p in procs:
            p.join(timeout=240)
        assert [p.exitcode for p in procs] == [0] * n
        return time.monotonic() - t0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


@pytest.mark.slow
def test_four_processes_keep_each_lane_serial_and_in_order(ctx: AppContext) -> None:
    lanes = ("dicom:A", "dicom:B", "dicom:C")
    with ctx.sessions.begin() as s:
        s.execute(text("CREATE TABLE lane_log (job_id INTEGER NOT NULL, lane VARCHAR(64) NOT NULL, "
                       "t0 FLOAT NOT NULL, t1 FLOAT NOT NULL)"))
    for i in range(40):
        q = make_queue(ctx)
        q.enqueue("deliver", {"i": i}, lane=lanes[i % 3])
        if i % 4 == 0:
            q.enqueue("infer", {"i": i})
    _run_claim_workers(ctx, "lane_log")
    with ctx.sessions() as s:
        rows = s.execute(text("SELECT job_id, lane, t0, t1 FROM lane_log ORDER BY t0")).all()
        states = dict(s.execute(text("SELECT state, COUNT(*) FROM jobs GROUP BY state")).all())
    assert states == {DONE: 50} and len(rows) == 50
    for lane in lanes:
        mine = [r for r in rows if r.lane == lane]
        assert [r.job_id for r in mine] == sorted(r.job_id for r in mine), lane  # FIFO
        assert all(a.t1 <= b.t0 for a, b in zip(mine, mine[1:], strict=False)), lane  # one at a time
    # Different lanes did overlap in time: a lane never serializes the others.
    spans = {lane: (min(r.t0 for r in rows if r.lane == lane), max(r.t1 for r in rows if r.lane == lane))
             for lane in lanes}
    assert spans["dicom:A"][0] < spans["dicom:B"][1] and spans["dicom:B"][0] < spans["dicom:A"][1]


# ------------------------------------------------------------------------------ real processes
@pytest.mark.slow
def test_four_worker_processes_drain_each_job_exactly_once(ctx: AppContext) -> None:
    n_jobs = 2000 if ctx.engine.dialect.name == "postgresql" else 200
    with ctx.sessions.begin() as s:
        s.execute(text("CREATE TABLE completions (job_id INTEGER NOT NULL, worker VARCHAR(64) NOT NULL)"))
        s.execute(
            Job.__table__.insert(),
            [{"kind": "infer", "state": QUEUED, "priority": i % 3, "payload": {"i": i}, "attempts": 0,
              "max_attempts": 3, "run_after": utcnow(), "created_at": utcnow(), "last_error": ""}
             for i in range(n_jobs)],
        )
    elapsed = _run_claim_workers(ctx, "completions")
    with ctx.sessions() as s:
        total, distinct = s.execute(text("SELECT COUNT(*), COUNT(DISTINCT job_id) FROM completions")).one()
        per_worker = dict(s.execute(text("SELECT worker, COUNT(*) FROM completions GROUP BY worker")).all())
        states = dict(s.execute(text("SELECT state, COUNT(*) FROM jobs GROUP BY state")).all())
        attempts = s.scalar(text("SELECT MAX(attempts) FROM jobs"))
    assert (total, distinct) == (n_jobs, n_jobs)
    assert states == {DONE: n_jobs}
    assert attempts == 1
    assert len(per_worker) >= 2, per_worker  # the work was actually shared
    print(f"{ctx.engine.dialect.name}: {n_jobs} jobs by 4 processes in {elapsed:.1f} s; per worker {per_worker}")


CLAIM_AND_HANG = """
import sys, time
from storage.db import make_engine, make_sessionmaker
from storage.queue import JobQueue
q = JobQueue(make_sessionmaker(make_engine(sys.argv[1])), lease_seconds=2)
job = q.claim("doomed")
print(job.id if job else "none", flush=True)
time.sleep(600)
"""


def test_sigkilled_worker_job_is_finished_by_another_after_lease_expiry(ctx: AppContext) -> None:
    q = make_queue(ctx, lease_seconds=2)
    job_id = q.enqueue("infer", {"series_id": 1, "generation": 0})
    url = ctx.engine.url.render_as_string(hide_password=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_HANG, url], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line == str(job_id)
        assert job_row(ctx, job_id).lease_owner == "doomed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    lease_end = job_row(ctx, job_id).lease_expires_at
    job = wait_for(lambda: q.claim("survivor"), timeout=60, interval=0.2)
    assert utcnow() >= lease_end  # taken over only once the dead worker's lease had run out
    assert job.id == job_id and job.attempts == 2
    assert q.complete(job_id, "survivor") is True
    row = job_row(ctx, job_id)
    assert (row.state, row.attempts, row.lease_owner) == (DONE, 2, "survivor")
    assert "doomed" in row.last_error
    with ctx.sessions() as s:
        assert s.scalar(select(AuditEvent.id).limit(1)) is None  # a take-over is not a failure


def test_sqlite_commits_are_durable(tmp_path: Path) -> None:
    """Every SQLite connection runs WAL with synchronous=FULL: a commit (and so an acknowledged
    C-STORE's row) survives a power cut, not only a process crash."""
    engine = make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()
