"""Retention: expired studies are purged (files, instance rows, audit); queued work never is."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select

from storage import audit
from storage.models import Instance, Series, Study, utcnow
from storage.queue import JobQueue
from storage.retention import JOB_ID, purge_expired
from triage.admin import schedule_retention
from triage.context import AppContext

REPO = Path(__file__).resolve().parent.parent


def add_study(ctx: AppContext, uid: str, age_days: float, n: int = 3) -> tuple[int, int]:
    """A study with one series of ``n`` instances on disk, last received ``age_days`` ago."""
    when = utcnow() - dt.timedelta(days=age_days)
    with ctx.sessions.begin() as s:
        study = Study(study_uid=uid, accession=f"A{uid[-3:]}", last_received_at=when, first_received_at=when)
        series = Series(series_uid=f"{uid}.1", study=study, instance_count=n, last_received_at=when)
        s.add_all([study, series])
        s.flush()
        for i in range(n):
            rel = ctx.store.instance_rel(uid, series.series_uid, f"{uid}.1.{i}")
            size = ctx.store.write_atomic(rel, b"D" * 100)
            s.add(Instance(series_id=series.id, sop_instance_uid=f"{uid}.1.{i}", path=rel, size=size))
        ctx.store.write_atomic(ctx.store.result_rel(uid, series.series_uid, "sr.dcm"), b"S" * 10)
        return study.id, series.id


def instance_count(ctx: AppContext, study_id: int) -> int:
    with ctx.sessions() as s:
        return int(
            s.scalar(select(func.count()).select_from(Instance).join(Series).where(Series.study_id == study_id)) or 0
        )


def purged(ctx: AppContext, study_id: int) -> bool:
    with ctx.sessions() as s:
        return s.get(Study, study_id).purged_at is not None  # type: ignore[union-attr]


def test_purges_expired_studies_but_never_unfinished_work(ctx: AppContext) -> None:
    q = JobQueue(ctx.sessions)
    old_idle, _ = add_study(ctx, "1.1.101", 40)
    old_done, _ = add_study(ctx, "1.1.102", 40)
    old_queued, _ = add_study(ctx, "1.1.103", 40)
    old_retry, _ = add_study(ctx, "1.1.104", 40)
    old_running_series, running_series = add_study(ctx, "1.1.105", 40)
    recent, _ = add_study(ctx, "1.1.106", 5)

    done = q.enqueue("infer", {}, study_id=old_done)
    q.claim("w")
    q.complete(done, "w")
    q.enqueue("deliver", {}, study_id=old_queued)
    retry = q.enqueue("notify", {}, study_id=old_retry, priority=50)
    assert q.claim("w").id == retry
    q.fail(retry, "w", "webhook down")  # failed = waiting for a retry: still live work
    q.enqueue("infer", {}, series_id=running_series, priority=40)  # only the series links it
    assert q.claim("w").kind == "infer"

    report = purge_expired(ctx.sessions, ctx.store, retention_days=30)

    assert sorted(report.study_uids) == ["1.1.101", "1.1.102"]
    assert (report.studies, report.instances, report.files, report.bytes) == (2, 6, 8, 620)
    assert report.kept_busy == 3
    for sid, uid in ((old_idle, "1.1.101"), (old_done, "1.1.102")):
        assert purged(ctx, sid) and instance_count(ctx, sid) == 0
        assert ctx.store.study_dirs(uid) == []
    for sid, uid in ((old_queued, "1.1.103"), (old_retry, "1.1.104"), (old_running_series, "1.1.105"),
                     (recent, "1.1.106")):
        assert not purged(ctx, sid) and instance_count(ctx, sid) == 3
        assert len(ctx.store.study_dirs(uid)) == 2
    with ctx.sessions() as s:
        events = audit.events(s, event_type=audit.PURGE, newest_first=False)
        assert [(e.study_uid, e.details["instances"], e.details["files"]) for e in events] == [
            ("1.1.101", 3, 4), ("1.1.102", 3, 4)
        ]
        assert audit.verify(s).ok
    again = purge_expired(ctx.sessions, ctx.store, retention_days=30)
    assert again.studies == 0


def test_zero_retention_keeps_everything(ctx: AppContext) -> None:
    sid, _ = add_study(ctx, "1.1.201", 4000)
    assert purge_expired(ctx.sessions, ctx.store, retention_days=0).studies == 0
    assert not purged(ctx, sid) and instance_count(ctx, sid) == 3


def test_files_left_by_an_interrupted_purge_are_swept(ctx: AppContext) -> None:
    sid, _ = add_study(ctx, "1.1.301", 1)
    with ctx.sessions.begin() as s:
        s.get(Study, sid).purged_at = utcnow()  # type: ignore[union-attr]
    report = purge_expired(ctx.sessions, ctx.store, retention_days=30)
    assert report.studies == 0 and report.files == 4
    assert ctx.store.study_dirs("1.1.301") == []


def test_a_study_sent_again_after_its_purge_is_live_again(ctx: AppContext, tmp_path: Path) -> None:
    """A PACS sends a purged study again (a prior fetched for comparison, a re-send): over a real
    C-STORE the node stores it, the study is no longer marked purged (the worklist shows it), and a
    later retention pass keeps the new files instead of sweeping them as a purge's leftovers."""
    from tests.peers import SeriesSpec, make_ct_series, running_node, storescu

    spec = SeriesSpec(slices=3, size=32, accession="ARESEND")
    files = make_ct_series(tmp_path / "series", spec)
    with running_node(ctx) as node:
        assert storescu(node.port, files).returncode == 0
        with ctx.sessions.begin() as s:  # received 40 days ago
            study = s.scalars(select(Study).where(Study.study_uid == spec.study_uid)).one()
            study.last_received_at = utcnow() - dt.timedelta(days=40)
            sid = study.id
        assert purge_expired(ctx.sessions, ctx.store, retention_days=30).studies == 1
        assert purged(ctx, sid) and ctx.store.study_dirs(spec.study_uid) == []
        r = storescu(node.port, files)
        assert r.returncode == 0, r.stderr
    assert not purged(ctx, sid) and instance_count(ctx, sid) == 3
    report = purge_expired(ctx.sessions, ctx.store, retention_days=30)
    assert report.studies == 0 and report.files == 0
    assert len(ctx.store.study_dirs(spec.study_uid)) == 1 and instance_count(ctx, sid) == 3


def test_scheduled_retention_runs_in_apscheduler(sqlite_ctx: AppContext) -> None:
    ctx = sqlite_ctx
    sid, _ = add_study(ctx, "1.1.401", 100)
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.start()
    try:
        job = schedule_retention(scheduler, ctx)
        assert job is not None and scheduler.get_job(JOB_ID) is not None
        assert job.trigger.interval == dt.timedelta(minutes=ctx.settings.purge_interval_minutes)
        job.modify(next_run_time=utcnow())
        deadline = time.monotonic() + 60
        while not purged(ctx, sid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert purged(ctx, sid)
    finally:
        scheduler.shutdown(wait=True)


def test_cli_purge(ctx: AppContext, tmp_path: Path) -> None:
    add_study(ctx, "1.1.501", 90)
    env = {
        **os.environ,
        "TRIAGE_DATA_DIR": str(ctx.settings.data_dir),
        "TRIAGE_DATABASE_URL": ctx.engine.url.render_as_string(hide_password=False),
        "TRIAGE_RETENTION_DAYS": "30",
        "TRIAGE_DISK_FLOOR_MB": "0",
    }
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "triage"), "purge"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "purged 1 studies (3 instances, 4 files" in out.stdout
    assert ctx.store.study_dirs("1.1.501") == []
