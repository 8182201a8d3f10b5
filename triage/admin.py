"""Operator commands and scheduled maintenance on the storage layer (``triage db``, ``triage audit
verify``, ``triage queue``, ``triage purge`` and the retention schedule).

They live here, not in :mod:`storage`, because they read the node's settings and context:
``storage/`` imports nothing from ``triage/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Callable
from typing import Any

from storage import audit
from storage.db import make_engine, make_sessionmaker
from storage.migrate import current_revision, downgrade, upgrade
from storage.models import utcnow
from storage.queue import DEAD, STATES, JobQueue
from storage.retention import JOB_ID, PurgeReport, purge_expired
from triage.config import Settings
from triage.context import AppContext
from triage.logging import get_logger

log = get_logger(__name__)


# ---------------------------------------------------------------------------------- database
def cli_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    upgrade(settings.effective_database_url, args.revision)
    print(f"database at revision {current_revision(settings.effective_database_url)}")
    return 0


def cli_downgrade(args: argparse.Namespace, settings: Settings) -> int:
    downgrade(settings.effective_database_url, args.revision)
    print(f"database at revision {current_revision(settings.effective_database_url)}")
    return 0


def cli_current(args: argparse.Namespace, settings: Settings) -> int:
    print(current_revision(settings.effective_database_url) or "(empty)")
    return 0


# ---------------------------------------------------------------------------------- audit
def cli_verify(args: argparse.Namespace, settings: Settings) -> int:
    """``triage audit verify``: exit 0 and print OK, or exit 1 naming the bad event."""
    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            report = audit.verify(session)
            if report.ok and report.checked:
                audit.mark_verified(session, report.checked)  # the audit page goes on from here
    finally:
        engine.dispose()
    if report.ok:
        print(f"OK: audit chain intact ({report.checked} events)")
        return 0
    where = f"event {report.bad_id}" if report.bad_id is not None else "chain"
    print(f"FAILED: {where}: {report.problem} ({report.checked} events verified before it)")
    return 1


# ---------------------------------------------------------------------------------- retention
def run_retention(ctx: AppContext) -> PurgeReport:
    """One retention pass with the context's settings (the scheduled job)."""
    try:
        return purge_expired(ctx.sessions, ctx.store, ctx.settings.retention_days)
    except Exception:
        log.exception("retention pass failed")
        raise


def schedule_retention(scheduler: Any, ctx: AppContext) -> Any:
    """Add the retention pass to an APScheduler 3.x scheduler, every ``purge_interval_minutes``.

    Returns the APScheduler job, or None when ``retention_days`` is 0 (keep forever).
    """
    if ctx.settings.retention_days <= 0:
        return None
    return scheduler.add_job(
        run_retention,
        "interval",
        args=[ctx],
        minutes=ctx.settings.purge_interval_minutes,
        id=JOB_ID,
        name="retention purge",
        replace_existing=True,
        max_instances=1,
        coalesce=True,
        next_run_time=utcnow() + dt.timedelta(seconds=30),
    )


def cli_purge(args: argparse.Namespace, settings: Settings) -> int:
    """``triage purge``: apply the retention policy now and print what was removed."""
    if settings.retention_days <= 0:
        print("retention_days is 0: nothing is purged")
        return 0
    ctx = AppContext(settings, role="cli")
    try:
        report = purge_expired(ctx.sessions, ctx.store, settings.retention_days, actor="cli")
    finally:
        ctx.close()
    print(
        f"purged {report.studies} studies ({report.instances} instances, {report.files} files, "
        f"{report.bytes} bytes); kept {report.kept_busy} expired studies with unfinished jobs"
    )
    return 0


# ---------------------------------------------------------------------------------- queue
def queue_from_settings(settings: Settings) -> tuple[JobQueue, Callable[[], None]]:
    """A queue on the configured database and a function that closes it."""
    engine = make_engine(settings.effective_database_url)
    q = JobQueue(make_sessionmaker(engine), **settings.queue_params)
    return q, engine.dispose


def cli_queue_status(args: argparse.Namespace, settings: Settings) -> int:
    """``triage queue status``: jobs by kind and state, and the dead jobs."""
    q, close = queue_from_settings(settings)
    try:
        counts = q.counts()
        dead = q.jobs(state=DEAD, limit=20)
    finally:
        close()
    kinds = sorted({k for k, _ in counts})
    print(f"{'kind':<12}" + "".join(f"{st:>9}" for st in STATES))
    for kind in kinds:
        print(f"{kind:<12}" + "".join(f"{counts.get((kind, st), 0):>9}" for st in STATES))
    if not kinds:
        print("(no jobs)")
    if dead:
        print("\ndead jobs (retry with: triage queue retry <id>):")
        for job in dead:
            err = (job.last_error or "").splitlines()[0][:100] if job.last_error else ""
            print(f"  {job.id:>8}  {job.kind:<10} attempts={job.attempts}  {err}")
    return 0


def cli_queue_retry(args: argparse.Namespace, settings: Settings) -> int:
    """``triage queue retry <id>``: re-queue a dead job; exit 1 if it is not dead."""
    q, close = queue_from_settings(settings)
    try:
        ok = q.retry_dead(int(args.job_id), actor=f"cli:{os.environ.get('USER', 'unknown')}")
        job = q.get(int(args.job_id))
    finally:
        close()
    if ok:
        print(f"job {args.job_id} re-queued")
        return 0
    state = job.state if job is not None else "not found"
    print(f"job {args.job_id} not re-queued: {state}")
    return 1
