"""Durable job queue in the database (table ``jobs``), shared by every process of the node.

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` (waits for a retry until ``run_after``)
| ``dead`` (``max_attempts`` used up, or a permanent error). A claim takes a lease of
``lease_seconds``; the holder extends it with :meth:`JobQueue.heartbeat`. A job whose lease
expired (its worker died, even by ``kill -9``) is claimable again; one that already used all its
attempts goes to ``dead`` instead, so a job that kills its worker cannot loop forever.

Claiming is atomic: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite each transaction
is ``BEGIN IMMEDIATE`` (:mod:`storage.db`), one writer at a time, and the claim is two short
statements. Order: priority (higher first), then ``run_after``, then id (oldest first).

All times are taken from the clock of the calling process (UTC); hosts sharing one database must
keep their clocks in sync (NTP), as the lease lengths are seconds to minutes.

Only the lease holder may change a running job: :meth:`heartbeat`, :meth:`complete` and
:meth:`fail` return ``False`` (and change nothing) when another worker has taken the job over.

Lanes (``jobs.lane``, e.g. ``dicom:PACS@host:104`` for the deliveries to one destination) keep
order after an outage. Within a lane only the head job may be claimed: the first of the lane's
runnable or running jobs by (priority desc, id asc), so a positive/STAT result still goes ahead of
routine ones queued behind it, and otherwise the oldest goes first. At most one job of a lane is in
flight at a time. A failure that says the lane itself is down (:class:`LaneDown`, e.g. no
association) backs off the whole lane (table ``job_lanes``: a destination-level back-off that grows
with its consecutive failures; the failed job keeps its place at the head, and when nothing could
connect at all the attempt does not count, for up to ``unreachable_wait_seconds``). Any other failure
(the peer refused that one object) backs off only that job, and the lane goes on without it. A
lane that is blocked never holds up other lanes or jobs without a lane (inference).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import Connection, and_, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from storage import audit
from storage.lifecycle import FINAL_JOB_STATES, LIVE_JOB_STATES, JobKind, JobState, Priority, fail_inference
from storage.models import Job, JobLane, Study, utcnow

log = structlog.get_logger(__name__)

# The job vocabulary is the lifecycle's (storage/lifecycle.py); short names for this module.
QUEUED, RUNNING, DONE, FAILED, DEAD = (JobState.QUEUED, JobState.RUNNING, JobState.DONE, JobState.FAILED,
                                       JobState.DEAD)
STATES = tuple(JobState)
LIVE_STATES = LIVE_JOB_STATES
FINAL_STATES = FINAL_JOB_STATES

MAX_ERROR_CHARS = 4000


class _Moved(Exception):
    """The job changed hands while a transaction looked at it: roll the transaction back."""


class LaneDown(RuntimeError):
    """Raised by a handler when the job's lane (its destination) is unreachable: back off the lane.

    ``spends_attempt`` False (a subclass's) when the failure cannot be the job's own (no connection
    at all): the job waits for its lane as long as the outage lasts instead of dying of it."""

    spends_attempt = True


def delivery_lane(destination: object) -> str:
    """The lane of DICOM deliveries to ``destination`` (``AET@host:port``)."""
    return f"dicom:{destination}"[:255]

# Hot-path statements, built once (building SQLAlchemy expressions costs more CPU than SQLite's
# own work for these one-row statements). Bind parameters take their column's type.
_CLAIM_COLUMNS = (
    Job.id, Job.kind, Job.payload, Job.attempts, Job.priority, Job.study_id, Job.series_id,
    Job.max_attempts, Job.state, Job.lease_owner, Job.lane, Job.created_at,
)
_Other = aliased(Job, name="other")
# A laned job may run when its lane is not backed off, no other job of the lane is in flight, and
# no other job of the lane that could run now is ahead of it (priority desc, id asc).
_LANE_FREE = or_(
    Job.lane.is_(None),
    and_(
        ~exists().where(JobLane.key == Job.lane, JobLane.blocked_until > bindparam("now")),
        ~exists().where(
            _Other.lane == Job.lane, _Other.id != Job.id,
            or_(
                and_(_Other.state == RUNNING, _Other.lease_expires_at >= bindparam("now")),
                and_(
                    or_(_Other.state == RUNNING,
                        and_(_Other.state.in_((QUEUED, FAILED)), _Other.run_after <= bindparam("now"))),
                    or_(_Other.priority > Job.priority, and_(_Other.priority == Job.priority, _Other.id < Job.id)),
                ),
            ),
        ),
    ),
)
_RUNNABLE = and_(
    or_(
        and_(Job.state.in_((QUEUED, FAILED)), Job.run_after <= bindparam("now")),
        and_(Job.state == RUNNING, Job.lease_expires_at < bindparam("now")),
    ),
    _LANE_FREE,
)
_CLAIM_ORDER = (Job.priority.desc(), Job.run_after, Job.id)
_SELECT_ANY = select(*_CLAIM_COLUMNS).where(_RUNNABLE).order_by(*_CLAIM_ORDER).limit(1)
_SELECT_KINDS = (
    select(*_CLAIM_COLUMNS)
    .where(_RUNNABLE, Job.kind.in_(bindparam("kinds", expanding=True)))
    .order_by(*_CLAIM_ORDER)
    .limit(1)
)
_SELECT_ANY_PG = _SELECT_ANY.with_for_update(skip_locked=True)
_SELECT_KINDS_PG = _SELECT_KINDS.with_for_update(skip_locked=True)
_LEASE_VALUES = {
    "state": RUNNING,
    "attempts": Job.attempts + 1,
    "lease_owner": bindparam("owner"),
    "lease_expires_at": bindparam("expires"),
    "heartbeat_at": bindparam("now"),
    "started_at": bindparam("now"),
    "finished_at": None,
}
_LEASE = update(Job).where(Job.id == bindparam("jid")).values(**_LEASE_VALUES)
_LEASE_TAKEOVER = update(Job).where(Job.id == bindparam("jid")).values(**_LEASE_VALUES, last_error=bindparam("err"))
_HELD = and_(Job.id == bindparam("jid"), Job.state == RUNNING, Job.lease_owner == bindparam("owner"))
_HEARTBEAT = update(Job).where(_HELD).values(lease_expires_at=bindparam("expires"), heartbeat_at=bindparam("now"))
_COMPLETE = update(Job).where(_HELD).values(state=DONE, finished_at=bindparam("now"), lease_expires_at=None)
_LANE_RESET = (
    update(JobLane)
    .where(JobLane.key == bindparam("lane"), or_(JobLane.failures > 0, JobLane.blocked_until.is_not(None)))
    .values(failures=0, blocked_until=None, updated_at=bindparam("now"))
)


@dataclass(frozen=True)
class ClaimedJob:
    """A job leased to one worker. ``attempts`` counts this attempt (1 on the first run)."""

    id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    priority: int
    study_id: int | None
    series_id: int | None
    max_attempts: int = 5
    lease_expires_at: dt.datetime | None = None
    lane: str | None = None
    owner: str = ""  # the worker that holds the lease
    created_at: dt.datetime | None = None  # when it was queued


class JobQueue:
    """The queue API (see docs/architecture.md). Thread- and process-safe; holds no state itself."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        lease_seconds: float = 60.0,
        max_attempts: int = 5,
        retry_base_seconds: float = 5.0,
        retry_max_seconds: float = 900.0,
        jitter: float = 0.1,
        reads: sessionmaker[Session] | None = None,
        unreachable_wait_seconds: float = 72 * 3600.0,
    ) -> None:
        """``reads``: sessions for listings and counts (storage.db.make_read_sessionmaker), so they
        do not wait for writers on SQLite; ``sessions`` by default. ``unreachable_wait_seconds``: how
        long after it was queued a job's unreachable-lane failures stay free (``fail(spend_attempt=False)``)."""
        if lease_seconds <= 0 or max_attempts < 1 or retry_base_seconds < 0 or retry_max_seconds < 0 or jitter < 0:
            raise ValueError("invalid queue parameters")
        self.sessions = sessions
        self.reads = reads or sessions
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = int(max_attempts)
        self.retry_base_seconds = float(retry_base_seconds)
        self.retry_max_seconds = float(retry_max_seconds)
        self.jitter = float(jitter)
        self.unreachable_wait_seconds = float(unreachable_wait_seconds)

    # ---------------------------------------------------------------- helpers
    @contextmanager
    def _tx(self, session: Session | None) -> Iterator[Session]:
        """The caller's session (its transaction, not committed here) or a new committed one."""
        if session is not None:
            yield session
            return
        with self.sessions.begin() as s:
            yield s

    @contextmanager
    def _conn(self, session: Session | None = None) -> Iterator[Connection | Session]:
        """The caller's session, or a committed transaction on the engine (no ORM overhead)."""
        if session is not None:
            yield session
            return
        bind = self.sessions.kw.get("bind")
        if bind is None:
            with self.sessions.begin() as s:
                yield s
            return
        with bind.begin() as conn:
            yield conn

    @staticmethod
    def _pg(session: Session | Connection) -> bool:
        bind = session.get_bind() if isinstance(session, Session) else session
        return bind.dialect.name == "postgresql"

    def backoff_seconds(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): base * 2**(attempt-1), jittered, capped."""
        base = self.retry_base_seconds * (2 ** max(0, attempt - 1))
        return min(self.retry_max_seconds, base * (1.0 + random.uniform(0.0, self.jitter)))

    # ---------------------------------------------------------------- producer side
    def enqueue(
        self,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        priority: int = Priority.ROUTINE,
        dedupe_key: str | None = None,
        study_id: int | None = None,
        series_id: int | None = None,
        run_after: dt.datetime | None = None,
        max_attempts: int | None = None,
        lane: str | None = None,
        session: Session | None = None,
    ) -> int:
        """Add a job and return its id. Jobs with the same ``lane`` run one at a time, in order.

        With ``dedupe_key``: if a job with that key is still queued, running or waiting for a
        retry, its id is returned instead (and its priority raised to ``priority`` if higher).
        A finished (done/dead) job's key is renamed ``<key>#<id>`` so the new job can take it.
        Pass ``session`` to enqueue inside the caller's transaction.
        """
        if not kind or len(kind) > 32:
            raise ValueError(f"invalid job kind {kind!r}")
        if dedupe_key is not None and not 0 < len(dedupe_key) <= 200:
            raise ValueError("dedupe_key must be 1..200 characters")
        values = {
            "kind": str(kind),
            "state": str(QUEUED),
            "priority": int(priority),
            "payload": dict(payload or {}),
            "dedupe_key": dedupe_key,
            "study_id": study_id,
            "series_id": series_id,
            "attempts": 0,
            "max_attempts": int(max_attempts or self.max_attempts),
            "run_after": run_after or utcnow(),
            "created_at": utcnow(),
            "lane": lane[:255] if lane else None,
        }
        with self._tx(session) as s:
            for _ in range(5):
                if dedupe_key is not None:
                    existing = self._live_by_key(s, dedupe_key, int(priority))
                    if existing is not None:
                        return existing
                try:
                    with s.begin_nested():  # a savepoint: a lost insert race does not spoil the transaction
                        job_id = s.execute(Job.__table__.insert().values(**values).returning(Job.id)).scalar_one()
                    return int(job_id)
                except IntegrityError:
                    if dedupe_key is None:
                        raise
                    # Another process inserted the same key between our check and insert: look again.
            raise RuntimeError(f"could not enqueue job with dedupe key {dedupe_key!r}")

    def _live_by_key(self, s: Session, key: str, priority: int) -> int | None:
        q = select(Job.id, Job.state, Job.priority).where(Job.dedupe_key == key)
        if self._pg(s):
            q = q.with_for_update()
        row = s.execute(q).first()
        if row is None:
            return None
        job_id, state, prio = row
        if state in FINAL_STATES:
            s.execute(update(Job).where(Job.id == job_id).values(dedupe_key=f"{key}#{job_id}"))
            return None
        if priority > prio:
            s.execute(update(Job).where(Job.id == job_id).values(priority=priority))
        return int(job_id)

    # ---------------------------------------------------------------- worker side
    def claim(self, worker_id: str, kinds: Iterable[str] | None = None) -> ClaimedJob | None:
        """Lease the most urgent runnable job to ``worker_id``, or return None."""
        kinds = list(kinds) if kinds else None
        for _ in range(20):  # passes over jobs found dead on lease expiry
            poisoned: int | None = None
            with self._conn() as c:
                now = utcnow()
                pg = self._pg(c)
                if kinds:
                    row = c.execute(_SELECT_KINDS_PG if pg else _SELECT_KINDS, {"now": now, "kinds": kinds}).first()
                else:
                    row = c.execute(_SELECT_ANY_PG if pg else _SELECT_ANY, {"now": now}).first()
                if row is None:
                    return None
                (job_id, kind, payload, attempts, priority, study_id, series_id, max_attempts, state, owner, lane,
                 created_at) = row
                if state == RUNNING and attempts >= max_attempts:
                    poisoned = job_id  # buried below, in its own transaction (audit lock first)
                else:
                    expires = now + dt.timedelta(seconds=self.lease_seconds)
                    params = {"jid": job_id, "owner": worker_id, "expires": expires, "now": now}
                    if state == RUNNING:  # the previous holder's lease ran out
                        params["err"] = f"lease of {owner} expired; taken over"
                        c.execute(_LEASE_TAKEOVER, params)
                        log.warning("job lease expired, taken over", job_id=job_id, kind=kind, previous=owner)
                    else:
                        c.execute(_LEASE, params)
                    return ClaimedJob(
                        id=job_id,
                        kind=kind,
                        payload=dict(payload or {}),
                        attempts=attempts + 1,
                        priority=priority,
                        study_id=study_id,
                        series_id=series_id,
                        max_attempts=max_attempts,
                        lease_expires_at=expires,
                        lane=lane,
                        owner=worker_id,
                        created_at=created_at,
                    )
            self._bury_expired(poisoned)
        return None

    def _bury_expired(self, job_id: int) -> None:
        """A job whose worker died on its last attempt goes dead (not claimed yet again); an infer
        job's series is marked failed (audit ``inference_failed``) in the same transaction, as when a
        worker records the death (the held answers of the study are released by their backstop)."""
        with self.sessions() as s:  # which series, read first: the locks go study, series, audit chain, job
            found = s.execute(select(Job.kind, Job.payload).where(Job.id == job_id)).first()
        if found is None:
            return
        payload = found.payload or {}
        try:
            with self.sessions.begin() as s:
                if found.kind == JobKind.INFER:  # study, series, audit chain: the receiver's lock order
                    fail_inference(s, int(payload.get("series_id", 0)), job_id=job_id, actor="queue",
                                   error="the lease expired on the last attempt: its worker died",
                                   generation=payload.get("generation"))
                audit.lock_chain(s)
                q = select(Job).where(
                    Job.id == job_id, Job.state == RUNNING, Job.lease_expires_at < utcnow(),
                    Job.attempts >= Job.max_attempts,
                )
                if self._pg(s):
                    q = q.with_for_update()
                job = s.scalars(q).first()
                if job is None:  # taken over or finished meanwhile: its series is not failed either
                    raise _Moved
                self._bury(s, job, f"lease of {job.lease_owner} expired on the last attempt ({job.attempts})")
        except _Moved:
            return

    def waits_free(self, created_at: dt.datetime | None) -> bool:
        """Whether a job queued at ``created_at`` may still fail on an unreachable lane without
        spending an attempt (``fail(spend_attempt=False)``): for ``unreachable_wait_seconds``."""
        return created_at is not None and (utcnow() - created_at).total_seconds() < self.unreachable_wait_seconds

    def heartbeat(self, job_id: int, worker_id: str, *, session: Session | None = None) -> bool:
        """Extend the lease. False when the lease was lost: stop working on the job.

        Inside ``session`` (the transaction that stores the job's results, as its last statement) it
        also keeps the job's row locked until that commit: no other worker can take the job over
        between this check and the results becoming visible."""
        now = utcnow()
        expires = now + dt.timedelta(seconds=self.lease_seconds)
        with self._conn(session) as c:
            res = c.execute(_HEARTBEAT, {"jid": job_id, "owner": worker_id, "expires": expires, "now": now})
            return res.rowcount == 1

    def complete(self, job_id: int, worker_id: str, *, session: Session | None = None,
                 lane: str | None = None) -> bool:
        """Mark done. False (nothing changed) when ``worker_id`` no longer holds the lease.

        Pass ``session`` to complete inside the transaction that stores the job's results, and
        the job's ``lane`` to clear that lane's back-off (its destination answered).
        """
        now = utcnow()
        with self._conn(session) as c:
            res = c.execute(_COMPLETE, {"jid": job_id, "owner": worker_id, "now": now})
            if lane and res.rowcount == 1:
                c.execute(_LANE_RESET, {"lane": lane, "now": now})
            return res.rowcount == 1

    def fail(self, job_id: int, worker_id: str, error: str, retry: bool = True, *, lane_down: bool = False,
             spend_attempt: bool = True) -> bool:
        """Record a failed attempt: back to ``failed`` with a back-off, or ``dead``.

        ``retry=False`` (a permanent error) or no attempts left sends the job to ``dead``. Writes
        a ``job_failed`` or ``job_dead`` audit event. False when the lease was lost.

        For a job with a lane, ``lane_down=True`` (its destination is unreachable) backs off the
        whole lane by the lane's own count of consecutive failures, and the job retries when the
        lane opens again, still at its head; otherwise the lane's back-off is cleared. With
        ``spend_attempt=False`` as well (the destination could not be reached at all: nothing about the
        job failed), the attempt does not count, so an outage never kills the head of the lane (the
        lane's back-off is capped at ``retry_max_seconds``) until the job has waited
        ``unreachable_wait_seconds`` since it was queued; then its failures count again.
        """
        error = (error or "error")[:MAX_ERROR_CHARS]
        with self.sessions.begin() as s:
            audit.lock_chain(s)  # the audit lock before the row lock, as elsewhere: no lock-order deadlock
            q = select(Job).where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == worker_id)
            if self._pg(s):
                q = q.with_for_update()
            job = s.scalars(q).first()
            if job is None:
                return False
            lane_until = self._lane_failed(s, job.lane, error, lane_down) if job.lane else None
            if lane_until is not None and not spend_attempt and self.waits_free(job.created_at):
                job.attempts = max(0, job.attempts - 1)  # the destination's outage, not this job's failure
            if retry and job.attempts < job.max_attempts:
                now = utcnow()
                if lane_until is not None:  # retried exactly when the lane opens again, still at its head
                    delay = max(0.0, (lane_until - now).total_seconds())
                    job.run_after = lane_until
                else:
                    delay = self.backoff_seconds(job.attempts)
                    job.run_after = now + dt.timedelta(seconds=delay)
                job.state = FAILED
                job.lease_expires_at = None
                job.last_error = error
                extra = {"lane": job.lane, "lane_down": True} if lane_until is not None else {}
                self._audit(s, job, audit.JOB_FAILED, {"error": error[:500], "retry_in_s": round(delay, 3), **extra})
                log.info("job failed, will retry", job_id=job.id, kind=job.kind, attempt=job.attempts, delay_s=delay)
            else:
                self._bury(s, job, error)
            return True

    def postpone(self, job_id: int, worker_id: str, error: str, *, cap_seconds: float = 60.0) -> bool:
        """The attempt failed for want of a resource that comes back by itself (a full file store):
        retry later without using up an attempt, backing off from ``retry_base_seconds`` up to
        ``cap_seconds`` with each consecutive postponement (counted in ``payload["postponed"]``).
        Writes a ``job_failed`` audit event with ``postponed: true``. False when the lease was lost."""
        error = (error or "error")[:MAX_ERROR_CHARS]
        with self.sessions.begin() as s:
            audit.lock_chain(s)
            q = select(Job).where(Job.id == job_id, Job.state == RUNNING, Job.lease_owner == worker_id)
            if self._pg(s):
                q = q.with_for_update()
            job = s.scalars(q).first()
            if job is None:
                return False
            times = int((job.payload or {}).get("postponed", 0)) + 1
            delay = min(cap_seconds, self.retry_base_seconds * (2 ** min(times - 1, 16)))
            job.payload = {**(job.payload or {}), "postponed": times}
            job.attempts = max(0, job.attempts - 1)  # this attempt does not count
            job.state = str(FAILED)
            job.run_after = utcnow() + dt.timedelta(seconds=delay)
            job.lease_expires_at = None
            job.last_error = error
            self._audit(s, job, audit.JOB_FAILED, {"error": error[:500], "retry_in_s": round(delay, 3),
                                                   "postponed": True, "times": times})
            log.warning("job postponed", job_id=job.id, kind=job.kind, times=times, delay_s=delay)
            return True

    def _lane_failed(self, s: Session, key: str, error: str, down: bool) -> dt.datetime | None:
        """Update the lane's back-off after a failure; return when the lane opens when it is down."""
        now = utcnow()
        q = select(JobLane).where(JobLane.key == key)
        if self._pg(s):
            q = q.with_for_update()
        lane = s.scalars(q).first()
        if lane is None:
            if not down:
                return None
            try:
                with s.begin_nested():
                    s.add(JobLane(key=key, failures=0, last_error="", updated_at=now))
                    s.flush()
            except IntegrityError:  # created by another worker meanwhile
                pass
            lane = s.scalars(q).one()
        if not down:
            lane.failures, lane.blocked_until, lane.updated_at = 0, None, now
            return None
        lane.failures = (lane.failures or 0) + 1
        delay = self.backoff_seconds(lane.failures)
        lane.blocked_until = now + dt.timedelta(seconds=delay)
        lane.last_error = error[:MAX_ERROR_CHARS]
        lane.updated_at = now
        log.warning("lane down, backing off", lane=key, failures=lane.failures, delay_s=round(delay, 3))
        return lane.blocked_until

    def _bury(self, s: Session, job: Job, error: str) -> None:
        job.state = DEAD
        job.finished_at = utcnow()
        job.lease_expires_at = None
        job.last_error = error[:MAX_ERROR_CHARS]
        self._audit(s, job, audit.JOB_DEAD, {"error": error[:500]})
        log.warning("job dead", job_id=job.id, kind=job.kind, attempts=job.attempts)

    @staticmethod
    def _audit(s: Session, job: Job, event: str, extra: dict[str, Any]) -> None:
        study_uid = ""
        if job.study_id is not None:
            study_uid = s.scalar(select(Study.study_uid).where(Study.id == job.study_id)) or ""
        details = {"job_id": job.id, "kind": job.kind, "attempt": job.attempts, "worker": job.lease_owner, **extra}
        audit.record(s, event, study_uid=study_uid, outcome=audit.FAILURE, details=details)

    def drain(
        self,
        worker_id: str,
        handler: Callable[[ClaimedJob], None],
        *,
        kinds: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> int:
        """Claim and run jobs until none is runnable (or ``limit``); return how many ran.

        ``handler`` raising marks the attempt failed (retried with back-off). No heartbeats are
        sent: use it for jobs much shorter than the lease (tests, benchmarks, ``--once`` runs).
        """
        ran = 0
        while limit is None or ran < limit:
            job = self.claim(worker_id, kinds)
            if job is None:
                break
            try:
                handler(job)
            except Exception as exc:  # noqa: BLE001 - any handler error is a failed attempt
                self.fail(job.id, worker_id, f"{type(exc).__name__}: {exc}", lane_down=isinstance(exc, LaneDown),
                          spend_attempt=getattr(exc, "spends_attempt", True))
            else:
                self.complete(job.id, worker_id, lane=job.lane)
            ran += 1
        return ran

    # ---------------------------------------------------------------- operations
    def retry_dead(self, job_id: int, *, actor: str = "system") -> bool:
        """Re-queue a dead job with fresh attempts (audit ``job_retried``). False if not dead."""
        with self.sessions.begin() as s:
            audit.lock_chain(s)
            q = select(Job).where(Job.id == job_id, Job.state == DEAD)
            if self._pg(s):
                q = q.with_for_update()
            job = s.scalars(q).first()
            if job is None:
                return False
            if job.dedupe_key:
                # Another live job may hold the key meanwhile: then this one gives its key up.
                other = s.scalar(select(Job.id).where(Job.dedupe_key == job.dedupe_key, Job.id != job.id))
                if other is not None:
                    job.dedupe_key = f"{job.dedupe_key}#{job.id}"
            job.state = QUEUED
            job.attempts = 0
            job.run_after = utcnow()
            job.lease_owner = None
            job.lease_expires_at = None
            job.finished_at = None
            study_uid = s.scalar(select(Study.study_uid).where(Study.id == job.study_id)) if job.study_id else ""
            audit.record(
                s, audit.JOB_RETRIED, actor=actor, study_uid=study_uid or "",
                details={"job_id": job.id, "kind": job.kind, "last_error": (job.last_error or "")[:500]},
            )
            return True

    def release_held(self, study_id: int, kind: str, *, session: Session | None = None) -> int:
        """Jobs of ``kind`` for the study that were queued to run later (held, never tried) run now;
        returns how many."""
        now = utcnow()
        with self._tx(session) as s:
            return int(s.execute(
                update(Job).where(Job.study_id == study_id, Job.kind == kind, Job.state == QUEUED, Job.attempts == 0,
                                  Job.run_after > now).values(run_after=now)
            ).rowcount or 0)  # type: ignore[attr-defined]

    def withdraw_held(self, study_id: int, kind: str, *, session: Session | None = None) -> int:
        """Remove the study's held jobs of ``kind`` (queued to run later, never tried); returns how many."""
        now = utcnow()
        with self._tx(session) as s:
            return int(s.execute(
                delete(Job).where(Job.study_id == study_id, Job.kind == kind, Job.state == QUEUED, Job.attempts == 0,
                                  Job.run_after > now)
            ).rowcount or 0)  # type: ignore[attr-defined]

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of jobs by (kind, state)."""
        with self.reads() as s:
            rows = s.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
        return {(kind, state): int(n) for kind, state, n in rows}

    def jobs(
        self,
        *,
        state: str | Iterable[str] | None = None,
        kind: str | None = None,
        study_id: int | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Jobs for listings (newest first), detached from the session."""
        q = select(Job)
        if state is not None:
            q = q.where(Job.state.in_([state] if isinstance(state, str) else list(state)))
        if kind is not None:
            q = q.where(Job.kind == kind)
        if study_id is not None:
            q = q.where(Job.study_id == study_id)
        with self.reads() as s:
            rows = list(s.scalars(q.order_by(Job.id.desc()).limit(limit)).all())
            s.expunge_all()
        return rows

    def get(self, job_id: int) -> Job | None:
        with self.reads() as s:
            job = s.get(Job, job_id)
            if job is not None:
                s.expunge(job)
            return job
