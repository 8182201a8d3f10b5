"""The study lifecycle: its vocabulary and the only functions that change a state.

Series, study and job states, job kinds and priorities are defined here and nowhere else (audit
event names live in :mod:`storage.audit`). The receiver's recorder, the completion monitor, the
inference job and the worker loop call the transition functions below; nobody else writes
``Series.state`` or ``Study.status``. Every transition runs inside the caller's transaction,
writes its audit event in that same transaction and recomputes the study status in one place
(:func:`refresh_study`)::

                 new instance (generation + 1)
         +-----------------------------------------------------------+
         v                                                           |
    receiving --quiet period / provably complete--> complete         |
                                                      |              |
                          selection rules say no  ----+---- yes      |
                                  v                         v        |
                               skipped                  selected     |
                                                            | start_inference
                                                            v        |
                                   fail_inference <--- processing    |
                                         v                  | record_result
                                      failed               done -----+

Study status (:func:`study_status`): ``receiving`` while any series is receiving or complete,
else ``processing`` while any series is processing, else ``queued`` while any is selected, else
``failed`` if any failed, else ``done`` if any is done, else ``skipped`` (every series skipped).
So a study with one series done and another still processing shows ``processing``.

Jobs (:mod:`storage.queue`): ``queued -> running -> done | failed (retry after back-off) | dead``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

import structlog
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from storage import audit
from storage.models import Series, Study, utcnow

log = structlog.get_logger(__name__)


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"  # claimed by the completion monitor, selection running
    SELECTED = "selected"  # an infer job is queued
    SKIPPED = "skipped"  # not a head CT (or not usable): the reason is in skip_reason
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"  # its infer job died


class StudyStatus(StrEnum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # waits for a retry until run_after
    DEAD = "dead"  # attempts used up or a permanent error


class JobKind(StrEnum):
    INFER = "infer"
    DELIVER = "deliver"
    NOTIFY = "notify"


class Priority(IntEnum):
    """Job and study priority; a study's priority is never lowered."""

    ROUTINE = 0
    STAT = 10  # a STAT keyword in the request (selection rules)
    POSITIVE = 20  # the model flagged the study


LIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.FAILED)  # work still to be done
# A series in one of these states may still give its study a result (a thick series arriving after
# the thin one, or the other way round): see :func:`study_pending`.
PENDING_SERIES_STATES = (SeriesState.RECEIVING, SeriesState.COMPLETE, SeriesState.SELECTED, SeriesState.PROCESSING)
FINAL_JOB_STATES = (JobState.DONE, JobState.DEAD)

# Study status from its series' states, most urgent first (module docstring).
_STUDY_STATUS_ORDER: tuple[tuple[StudyStatus, frozenset[str]], ...] = (
    (StudyStatus.RECEIVING, frozenset({SeriesState.RECEIVING, SeriesState.COMPLETE})),
    (StudyStatus.PROCESSING, frozenset({SeriesState.PROCESSING})),
    (StudyStatus.QUEUED, frozenset({SeriesState.SELECTED})),
    (StudyStatus.FAILED, frozenset({SeriesState.FAILED})),
    (StudyStatus.DONE, frozenset({SeriesState.DONE})),
)


class StaleJob(Exception):
    """The series was reopened (or removed) after this job was queued; a newer job covers it."""


def study_status(states: Iterable[str]) -> StudyStatus:
    """The study status that its series' states give (see the module docstring)."""
    present = set(states)
    for status, members in _STUDY_STATUS_ORDER:
        if present & members:
            return status
    return StudyStatus.SKIPPED if present else StudyStatus.RECEIVING


def refresh_study(s: Session, study_id: int, *, reason: str = "") -> StudyStatus:
    """Recompute and store ``Study.status`` (and its reason) from the study's series: the one place
    a study status is decided. ``reason`` is kept when the study ends ``failed``."""
    rows = s.execute(select(Series.state, Series.skip_reason, Series.description)
                     .where(Series.study_id == study_id)).all()
    status = study_status(r.state for r in rows)
    text = ""
    if status is StudyStatus.SKIPPED:
        text = "; ".join(f"{r.description or 'series'}: {r.skip_reason}" for r in rows)
    elif status is StudyStatus.FAILED:
        text = reason or (s.scalar(select(Study.status_reason).where(Study.id == study_id)) or "")
    s.execute(update(Study).where(Study.id == study_id).values(status=str(status), status_reason=text[:4000]))
    return status


# ---------------------------------------------------------------------------------- receive
_STUDIES, _SERIES = Study.__table__, Series.__table__
# Built once: the receiver runs these for every group of instances it records, and building and
# keying a Core statement costs more CPU than executing it (bench/ingest.py, docs/benchmarks.md).
_STUDY_TOUCH = (update(_STUDIES).where(_STUDIES.c.study_uid == bindparam("b_study_uid"))
                .values(last_received_at=bindparam("b_now"), status=str(StudyStatus.RECEIVING), status_reason="",
                        purged_at=None)  # a study sent again after its purge is live again
                .returning(_STUDIES.c.id))
_STUDY_ID = select(_STUDIES.c.id).where(_STUDIES.c.study_uid == bindparam("b_study_uid"))
_SERIES_ROW = (select(_SERIES.c.id, _SERIES.c.state, _SERIES.c.generation)
               .where(_SERIES.c.series_uid == bindparam("b_series_uid")))
_SERIES_ROW_LOCKED = _SERIES_ROW.with_for_update()


def receive(s: Session, study_uid: str, series_uid: str, study_values: dict[str, Any],
            series_values: dict[str, Any], now: dt.datetime, *, first_sop_uid: str) -> tuple[int, int, int]:
    """New instances of ``series_uid`` are being recorded: create or refresh the study and series
    rows; a series that had left ``receiving`` is reopened (generation + 1, audit
    ``series_reopened``). Returns (study id, series id, generation).

    Prebuilt Core statements: this is the receiver's hot path."""
    c = s.connection()
    receiving = str(StudyStatus.RECEIVING)
    if c.dialect.insert_returning and c.dialect.update_returning:
        study_id = c.execute(_STUDY_TOUCH, {"b_study_uid": study_uid, "b_now": now}).scalar()
    else:  # pragma: no cover - both supported back-ends have UPDATE ... RETURNING
        study_id = c.execute(_STUDY_ID, {"b_study_uid": study_uid}).scalar()
        if study_id is not None:
            c.execute(update(_STUDIES).where(_STUDIES.c.id == study_id)
                      .values(last_received_at=now, status=receiving, status_reason="", purged_at=None))
    if study_id is None:
        study_id = c.execute(insert(_STUDIES).values(**study_values, status=receiving, first_received_at=now,
                                                     last_received_at=now).returning(_STUDIES.c.id)).scalar_one()
    # PostgreSQL: a concurrent completion waits for us, or we see the state it set
    q = _SERIES_ROW_LOCKED if c.dialect.name == "postgresql" else _SERIES_ROW
    row = c.execute(q, {"b_series_uid": series_uid}).first()
    if row is None:
        series_id = c.execute(insert(_SERIES).values(
            study_id=study_id, **series_values, state=str(SeriesState.RECEIVING), first_received_at=now,
            last_received_at=now, instance_count=0, generation=0, skip_reason="", meta={},
        ).returning(_SERIES.c.id)).scalar_one()
        return int(study_id), int(series_id), 0
    generation = int(row.generation)
    if row.state != SeriesState.RECEIVING:
        generation = _reopen(s, int(row.id), row.state, generation, study_uid, series_uid,
                             str(study_values.get("accession", "")), first_sop_uid)
    return int(study_id), int(row.id), generation


def _reopen(s: Session, series_id: int, old_state: str, old_gen: int, study_uid: str, series_uid: str,
            accession: str, sop_uid: str) -> int:
    res = s.execute(
        update(Series)
        .where(Series.id == series_id, Series.state == old_state, Series.generation == old_gen)
        .values(state=str(SeriesState.RECEIVING), generation=old_gen + 1, completed_at=None, skip_reason="")
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return int(s.scalar(select(Series.generation).where(Series.id == series_id)) or old_gen)
    audit.record(s, audit.SERIES_REOPENED, study_uid=study_uid, series_uid=series_uid, accession=accession,
                 details={"previous_state": old_state, "generation": old_gen + 1, "sop_instance_uid": sop_uid})
    log.info("series reopened", series_uid=series_uid, previous_state=old_state, generation=old_gen + 1)
    return old_gen + 1


# ---------------------------------------------------------------------------------- completion
def receiving_series(s: Session) -> list[Any]:
    """(id, generation, instance_count, last_received_at) of every series still receiving."""
    return list(s.execute(
        select(Series.id, Series.generation, Series.instance_count, Series.last_received_at)
        .where(Series.state == SeriesState.RECEIVING)
    ).all())


def study_pending(s: Session, study_id: int, *, besides: int | None = None) -> bool:
    """True while a series of the study (other than ``besides``) may still bring a result:
    it is receiving, complete, selected or processing."""
    q = select(Series.id).where(Series.study_id == study_id, Series.state.in_([str(x) for x in PENDING_SERIES_STATES]))
    if besides is not None:
        q = q.where(Series.id != besides)
    return s.execute(q.limit(1)).first() is not None


def overdue_after(settings: Any) -> float:
    """Seconds after its last instance past which a series still ``receiving`` is overdue: its
    completion is stuck (metrics ``triage_series_overdue``, /readyz of the receiver)."""
    return max(60.0, 10.0 * float(settings.stable_seconds))


_STUDY_OF_SERIES_LOCKED = (select(_STUDIES.c.id)
                           .select_from(_STUDIES.join(_SERIES, _SERIES.c.study_id == _STUDIES.c.id))
                           .where(_SERIES.c.id == bindparam("b_series_id")).with_for_update(of=_STUDIES))


def _lock_study_of(s: Session, series_id: int) -> None:
    """PostgreSQL: lock the series' study row first. Every writer takes its locks in the receiver's
    order (study, series, audit chain); the monitor and the workers, which start from a series and
    update the study last, would otherwise deadlock with a receiver recording another series of the
    same study. SQLite writers hold the database lock already."""
    c = s.connection()
    if c.dialect.name == "postgresql":
        c.execute(_STUDY_OF_SERIES_LOCKED, {"b_series_id": series_id})


def complete_series(s: Session, series_id: int, generation: int, count: int) -> bool:
    """Claim a quiet series for completion. False when another monitor got it or an instance
    arrived meanwhile (its generation or count moved): look again on the next tick."""
    _lock_study_of(s, series_id)
    claimed = s.execute(
        update(Series)
        .where(Series.id == series_id, Series.state == SeriesState.RECEIVING, Series.generation == generation,
               Series.instance_count == count)
        .values(state=str(SeriesState.COMPLETE), completed_at=utcnow())
    ).rowcount
    return claimed == 1


def select_for_inference(s: Session, series: Series, study: Study, *, stat: bool) -> Priority:
    """A completed series passed the selection rules: ``selected`` (the caller queues its job in the
    same transaction). A STAT request raises the study's priority (never lowers it)."""
    series.state = str(SeriesState.SELECTED)
    series.skip_reason = ""
    priority = Priority.STAT if stat else Priority.ROUTINE
    if stat:
        study.stat = True
        study.priority = max(study.priority or 0, int(Priority.STAT))
    s.flush()
    refresh_study(s, study.id)
    return priority


def skip_series(s: Session, series: Series, study: Study, reason: str, *, generation: int, instances: int) -> None:
    """A completed series is not analysed: ``skipped`` with its reason (audit ``skipped``)."""
    series.state = str(SeriesState.SKIPPED)
    series.skip_reason = reason
    s.flush()
    audit.record(s, audit.SKIPPED, study_uid=study.study_uid, series_uid=series.series_uid,
                 accession=study.accession,
                 details={"reason": reason, "generation": generation, "instances": instances})
    refresh_study(s, study.id)


# ---------------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class InferenceStart:
    """What the inference job needs to know about the series it started on."""

    study_id: int
    series_id: int
    study_uid: str
    series_uid: str
    accession: str


def _locked_series(s: Session, series_id: int) -> Series | None:
    """The series row, read afresh and locked (PostgreSQL ``FOR UPDATE``, its study's row first;
    SQLite writers hold the database lock already): a concurrent reopen by the receiver either
    happened before (its new generation is seen) or waits for this transaction; it can never be
    overwritten."""
    _lock_study_of(s, series_id)
    return s.get(Series, series_id, with_for_update=True, populate_existing=True)


def start_inference(s: Session, series_id: int, generation: int, *, actor: str, job_id: int) -> InferenceStart:
    """The series goes ``processing`` (audit ``processing``). Raises :class:`StaleJob` when the
    series is gone or at another generation."""
    series = _locked_series(s, series_id)
    if series is None:
        raise StaleJob(f"series {series_id} no longer exists")
    if series.generation != generation:
        raise StaleJob(f"series {series.series_uid} is at generation {series.generation}, job is {generation}")
    study = series.study
    series.state = str(SeriesState.PROCESSING)
    s.flush()
    refresh_study(s, study.id)
    audit.record(s, audit.PROCESSING, actor=actor, study_uid=study.study_uid, series_uid=series.series_uid,
                 accession=study.accession, details={"job_id": job_id, "generation": generation})
    return InferenceStart(study.id, series.id, study.study_uid, series.series_uid, study.accession)


def current_series(s: Session, series_id: int, generation: int) -> Series:
    """The series row when it is still at ``generation`` (else :class:`StaleJob`)."""
    series = _locked_series(s, series_id)
    if series is None or series.generation != generation:
        raise StaleJob(f"series {series_id} changed while inferring")
    return series


def record_result(s: Session, series: Series, *, positive: bool) -> StudyStatus:
    """The series' result is stored (same transaction): series ``done``, the study flagged when
    positive, its priority raised (never lowered) and its status recomputed."""
    study = series.study
    series.state = str(SeriesState.DONE)
    study.result_at = utcnow()
    if positive:
        study.flagged = True
    study.priority = max(study.priority or 0, int(Priority.POSITIVE if positive else Priority.ROUTINE))
    s.flush()
    return refresh_study(s, study.id)


def fail_inference(s: Session, series_id: int, *, job_id: int, error: str, actor: str,
                   generation: int | None = None) -> bool:
    """The series' infer job died: series ``failed``, audit ``inference_failed``, study status
    recomputed. False (nothing changed) when the series is gone, has moved to another generation, or
    is no longer waiting for that job (its result was recorded, then the job itself could not be
    marked done and died on lease expiry)."""
    series = _locked_series(s, series_id)
    if series is None or (generation is not None and series.generation != generation):
        return False
    if series.state not in (SeriesState.SELECTED, SeriesState.PROCESSING):
        return False
    study = series.study
    series.state = str(SeriesState.FAILED)
    s.flush()
    refresh_study(s, study.id, reason=error[:500])
    audit.record(s, audit.INFERENCE_FAILED, actor=actor, study_uid=study.study_uid, series_uid=series.series_uid,
                 accession=study.accession, outcome=audit.FAILURE,
                 details={"job_id": job_id, "generation": series.generation, "error": error[:500]})
    log.warning("inference failed", series_id=series_id, job_id=job_id)
    return True
