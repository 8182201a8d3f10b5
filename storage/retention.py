"""Retention: purge studies whose last instance arrived more than ``retention_days`` ago.

A study is purged only when none of its jobs is still queued, running or waiting for a retry
(nothing still to do is ever deleted). Purging a study removes its files (instances and result
objects), deletes its ``instances`` rows, sets ``studies.purged_at`` and writes a ``purge`` audit
event. Study, series, result and finding rows stay for the worklist history and statistics.

The database is updated first, then the files are removed; if that is interrupted, the next run
removes the files of studies already marked purged.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import delete, func, or_, select, true
from sqlalchemy.orm import Session, sessionmaker

from storage import audit
from storage.filestore import FileStore
from storage.models import Instance, Job, Series, Study, utcnow
from storage.queue import LIVE_STATES

log = structlog.get_logger(__name__)

JOB_ID = "retention"


@dataclass
class PurgeReport:
    studies: int = 0
    instances: int = 0
    files: int = 0
    bytes: int = 0
    kept_busy: int = 0  # expired studies kept because they still have live jobs
    study_uids: list[str] = field(default_factory=list)


def _live_work(study_id: Any) -> Any:
    """SQL condition: the study has a queued/running/failed job (directly or via a series).

    ``study_id`` is an int or the correlated column ``Study.id``.
    """
    via_series = (
        select(Series.id).where(Series.id == Job.series_id, Series.study_id == study_id).correlate_except(Series)
    )
    return (
        select(Job.id)
        .where(Job.state.in_(LIVE_STATES), or_(Job.study_id == study_id, via_series.exists()))
        .correlate_except(Job)
        .exists()
    )


def purge_expired(
    sessions: sessionmaker[Session],
    store: FileStore,
    retention_days: float,
    *,
    now: dt.datetime | None = None,
    actor: str = "system",
    batch: int = 200,
) -> PurgeReport:
    """Purge every expired study without live jobs; ``retention_days <= 0`` keeps everything."""
    report = PurgeReport()
    if retention_days <= 0:
        return report
    cutoff = (now or utcnow()) - dt.timedelta(days=retention_days)
    expired = (Study.purged_at.is_(None), Study.last_received_at < cutoff)
    with sessions() as s:
        report.kept_busy = int(
            s.scalar(select(func.count()).select_from(Study).where(*expired, _live_work(Study.id))) or 0
        )
    done_ids: set[int] = set()
    while True:
        with sessions() as s:
            ids = list(
                s.scalars(
                    select(Study.id)
                    .where(*expired, ~_live_work(Study.id), Study.id.notin_(done_ids) if done_ids else true())
                    .order_by(Study.last_received_at)
                    .limit(batch)
                ).all()
            )
        if not ids:
            break
        for study_id in ids:
            done_ids.add(study_id)
            _purge_one(sessions, store, study_id, cutoff, retention_days, actor, report)
    report.files += _sweep_purged(sessions, store)
    if report.studies:
        log.info("retention purge", studies=report.studies, files=report.files, bytes=report.bytes)
    return report


def _purge_one(
    sessions: sessionmaker[Session],
    store: FileStore,
    study_id: int,
    cutoff: dt.datetime,
    retention_days: float,
    actor: str,
    report: PurgeReport,
) -> None:
    with sessions.begin() as s:
        q = select(Study).where(Study.id == study_id, Study.purged_at.is_(None), Study.last_received_at < cutoff)
        if s.get_bind().dialect.name == "postgresql":
            q = q.with_for_update()
        study = s.scalars(q).first()
        # Re-check under the lock: an instance may have arrived or a job been queued meanwhile.
        if study is None or s.scalar(select(_live_work(study.id))):
            return
        series_ids = select(Series.id).where(Series.study_id == study.id)
        n_instances = int(s.execute(delete(Instance).where(Instance.series_id.in_(series_ids))).rowcount or 0)
        study.purged_at = utcnow()
        study_uid, accession = study.study_uid, study.accession
        files, size = _file_totals(store, study_uid)
        audit.record(
            s,
            audit.PURGE,
            actor=actor,
            study_uid=study_uid,
            accession=accession,
            details={"instances": n_instances, "files": files, "bytes": size, "retention_days": retention_days},
        )
    try:
        store.delete_study(study_uid)
    except OSError as exc:  # the next run's sweep retries
        log.error("purge: deleting files failed", study_uid=study_uid, error=str(exc))
    report.studies += 1
    report.instances += n_instances
    report.files += files
    report.bytes += size
    report.study_uids.append(study_uid)


def _file_totals(store: FileStore, study_uid: str) -> tuple[int, int]:
    files = size = 0
    for d in store.study_dirs(study_uid):
        for p in d.rglob("*"):
            if p.is_file():
                files += 1
                size += p.stat().st_size
    return files, size


def _sweep_purged(sessions: sessionmaker[Session], store: FileStore) -> int:
    """Remove files left behind for studies already marked purged (interrupted runs)."""
    removed = 0
    for area in ("instances", "results"):
        base = store.root / area
        if not base.is_dir():
            continue
        names = [p.name for p in base.iterdir() if p.is_dir()]
        for i in range(0, len(names), 500):
            chunk = names[i : i + 500]
            with sessions() as s:
                purged = s.scalars(
                    select(Study.study_uid).where(Study.study_uid.in_(chunk), Study.purged_at.is_not(None))
                ).all()
            for uid in purged:
                removed += store.delete_study(uid)[0]
    return removed
