"""Append-only, hash-chained audit trail.

Every row's ``hash`` is the SHA-256 of a canonical JSON of its own fields (id included) and the
previous row's hash (``prev_hash``). Ids are assigned here, gap-free, under a lock:

* PostgreSQL: ``pg_advisory_xact_lock(AUDIT_LOCK_KEY)`` is taken before the chain head is read,
  so concurrent writers from any process append one after another. The lock is held until the
  caller's transaction ends, so record events near the end of a transaction.
* SQLite: every transaction is ``BEGIN IMMEDIATE`` (see :mod:`storage.db`), one writer at a time.

The chain head (last id and hash) is also kept in ``node_settings`` under :data:`HEAD_KEY`, so that
deleting the newest rows is detected as well. The chain makes edits and deletions visible; it is
not a signature (whoever can rewrite the whole table and the head can forge it).

Only :func:`record` may insert rows: ids are explicit, so an ORM insert without an id would
collide with the PostgreSQL sequence.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session

from storage.models import AuditEvent, Setting, utcnow

# Event types ----------------------------------------------------------------------------------
RECEIVED = "received"
REJECTED = "rejected"
ASSOCIATION = "association"
ASSOCIATION_REJECTED = "association_rejected"
SERIES_COMPLETE = "series_complete"
SERIES_REOPENED = "series_reopened"
SKIPPED = "skipped"
QUEUED = "queued"
PROCESSING = "processing"
INFERRED = "inferred"
FLAGGED = "flagged"
INFERENCE_FAILED = "inference_failed"
RESULT_WRITTEN = "result_written"
DELIVERED = "delivered"
DELIVERY_FAILED = "delivery_failed"
DELIVERY_DEAD = "delivery_dead"
NOTIFIED = "notified"
NOTIFY_FAILED = "notify_failed"
LOGIN = "login"
LOGIN_FAILED = "login_failed"
LOGOUT = "logout"
LOCKOUT = "lockout"
ROLE_CHANGE = "role_change"
USER_CREATED = "user_created"
TOKEN_CREATED = "token_created"
USER_UPDATED = "user_updated"  # an admin's change to a user (details.action: disable, unlock, revoke_tokens ...)
FEEDBACK = "feedback"
VIEWED = "viewed"
CONFIG_CHANGE = "config_change"
PURGE = "purge"
DISK_FULL = "disk_full"
JOB_FAILED = "job_failed"
JOB_DEAD = "job_dead"
JOB_RETRIED = "job_retried"
NODE_START = "node_start"
NODE_STOP = "node_stop"
TEMP_SWEPT = "temp_swept"  # half-written temporary files removed from the file store

EVENT_TYPES = frozenset(
    {
        RECEIVED, REJECTED, ASSOCIATION, ASSOCIATION_REJECTED, SERIES_COMPLETE, SERIES_REOPENED, SKIPPED,
        QUEUED, PROCESSING, INFERRED, FLAGGED, INFERENCE_FAILED, RESULT_WRITTEN, DELIVERED, DELIVERY_FAILED,
        DELIVERY_DEAD, NOTIFIED, NOTIFY_FAILED, LOGIN, LOGIN_FAILED, LOGOUT, LOCKOUT, ROLE_CHANGE, USER_CREATED,
        TOKEN_CREATED, FEEDBACK, VIEWED, CONFIG_CHANGE, PURGE, DISK_FULL, JOB_FAILED, JOB_DEAD, JOB_RETRIED,
        NODE_START, NODE_STOP, TEMP_SWEPT, USER_UPDATED,
    }
)

SUCCESS = "success"
FAILURE = "failure"
OUTCOMES = (SUCCESS, FAILURE)

AUDIT_LOCK_KEY = 0x1C4_A0D17  # constant advisory-lock key for the chain (PostgreSQL)
HEAD_KEY = "audit_chain_head"  # node_settings key: "<id>:<hash>"
CHECKPOINT_KEY = "audit_verified_checkpoint"  # node_settings key: "<id>:<hash>" of the last verified event
GENESIS = ""  # prev_hash of the first event

_EVENTS, _SETTINGS = AuditEvent.__table__, Setting.__table__
# Built once: :func:`record` runs on the receiver's hot path (one event per recorded batch), where
# building and keying these statements per call cost more CPU than running them.
_HEAD = select(_EVENTS.c.id, _EVENTS.c.hash).order_by(_EVENTS.c.id.desc()).limit(1)
_INSERT_EVENT = insert(_EVENTS)
_SET_HEAD = update(_SETTINGS).where(_SETTINGS.c.key == HEAD_KEY).values(value=bindparam("b_value"))
HASHED_FIELDS = ("id", "ts", "event_type", "actor", "study_uid", "series_uid", "accession", "outcome", "details")


def _ts_text(ts: dt.datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _finite(value: Any) -> Any:
    """``value`` with every NaN/infinity replaced by its text (``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``), which strict JSON (and PostgreSQL's JSON type) can hold. Finite values and
    everything else are returned as they are, so hashes of rows without such numbers do not change."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _plain(details: dict[str, Any] | None) -> dict[str, Any]:
    """Details as they will read back from the JSON column (so the hash is reproducible).

    Non-finite numbers (e.g. a NaN position recorded before the receiver refused them) become
    text: such a value must never make an audit event, and whatever waits on it, fail."""
    return _finite(json.loads(json.dumps(details or {}, default=str, sort_keys=True)))


def compute_hash(fields: dict[str, Any], prev_hash: str) -> str:
    """SHA-256 over a canonical JSON (sorted keys, no spaces) of the hashed fields and prev_hash.

    Non-finite floats are hashed as their text (see :func:`_finite`) rather than raising."""
    doc = {name: _finite(fields[name]) for name in HASHED_FIELDS}
    doc["ts"] = _ts_text(doc["ts"])
    doc["prev_hash"] = prev_hash
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _row_fields(ev: AuditEvent) -> dict[str, Any]:
    return {name: getattr(ev, name) for name in HASHED_FIELDS}


def lock_chain(session: Session) -> None:
    """Take the chain lock now (PostgreSQL). Call it before row locks to keep one lock order."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK_KEY})


def record(
    session: Session,
    event_type: str,
    *,
    actor: str = "system",
    study_uid: str = "",
    series_uid: str = "",
    accession: str = "",
    outcome: str = SUCCESS,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event inside the caller's transaction (it is committed with it)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown audit event type {event_type!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome must be one of {OUTCOMES}, not {outcome!r}")
    lock_chain(session)
    session.flush()  # the caller's pending ORM changes go first, in the order they were made
    conn = session.connection()
    head = conn.execute(_HEAD).first()
    prev_id, prev_hash = (head[0], head[1]) if head else (0, GENESIS)
    fields: dict[str, Any] = {
        "id": prev_id + 1,
        "ts": utcnow(),
        "event_type": event_type,
        "actor": (actor or "system")[:128],
        "study_uid": (study_uid or "")[:64],
        "series_uid": (series_uid or "")[:64],
        "accession": (accession or "")[:64],
        "outcome": outcome,
        "details": _plain(details),
    }
    ev = AuditEvent(**fields, prev_hash=prev_hash, hash=compute_hash(fields, prev_hash))
    # Core statements on the session's connection (the ORM unit of work for these two rows cost
    # more CPU than the rest of an instance's recording); the returned event is not in the session.
    conn.execute(_INSERT_EVENT, {**fields, "prev_hash": ev.prev_hash, "hash": ev.hash})
    head_value = f"{ev.id}:{ev.hash}"
    if conn.execute(_SET_HEAD, {"b_value": head_value}).rowcount == 0:
        conn.execute(insert(_SETTINGS).values(key=HEAD_KEY, value=head_value))
    return ev


# Verification ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify`. ``bad_id`` names the first event found wrong (or missing)."""

    ok: bool
    checked: int
    bad_id: int | None = None
    problem: str = ""


def _iter_events(session: Session, batch: int = 2000, after: int = 0) -> Iterator[AuditEvent]:
    last = after
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.id > last).order_by(AuditEvent.id).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].id
        session.expunge_all()


def verify(session: Session, *, start_id: int = 1, start_prev_hash: str = GENESIS,
           end_id: int | None = None) -> VerifyReport:
    """Walk the chain from the first event (or from ``start_id``, whose predecessor's hash is
    ``start_prev_hash``; up to ``end_id`` when given, without the chain-head check); report the
    first edited, deleted or reordered row."""
    expected_id, prev_hash, checked = start_id, start_prev_hash, 0
    for ev in _iter_events(session, after=start_id - 1):
        if end_id is not None and ev.id > end_id:
            return VerifyReport(True, checked)
        if ev.id != expected_id:  # ids are assigned gap-free by record()
            return VerifyReport(
                False, checked, expected_id, f"event {expected_id} is missing (deleted?): next id is {ev.id}"
            )
        if ev.prev_hash != prev_hash:
            return VerifyReport(
                False, checked, ev.id, f"event {ev.id}: prev_hash does not match the hash of event {ev.id - 1}"
            )
        if compute_hash(_row_fields(ev), ev.prev_hash) != ev.hash:
            return VerifyReport(False, checked, ev.id, f"event {ev.id}: content does not match its hash (edited?)")
        prev_hash = ev.hash
        expected_id += 1
        checked += 1
    head = session.get(Setting, HEAD_KEY, populate_existing=True)  # record() updates it with Core
    last_id = expected_id - 1
    if head is not None and head.value:
        head_id_text, _, head_hash = head.value.partition(":")
        head_id = int(head_id_text)
        if head_id > last_id:
            return VerifyReport(
                False, checked, last_id + 1, f"events {last_id + 1}..{head_id} are missing (chain head is {head_id})"
            )
        if head_id < last_id:
            return VerifyReport(
                False, checked, head_id + 1, f"events after {head_id} were not written through the audit chain"
            )
        if head_hash != prev_hash:
            return VerifyReport(False, checked, last_id, f"event {last_id}: hash differs from the recorded chain head")
    elif checked:
        return VerifyReport(False, checked, None, "chain head record is missing")
    return VerifyReport(True, checked)


def verify_incremental(session: Session, max_events: int | None = None) -> VerifyReport:
    """Verify only the events added since the last verified checkpoint, then move it forward.

    The checkpoint (node_settings ``CHECKPOINT_KEY``: id and hash of the last event found good)
    makes the work proportional to the events added since the previous call, not to the size
    of the trail, so the web audit page can show the chain's state on every view. The
    checkpoint event itself is re-hashed on each call; edits further back are found by the
    full :func:`verify` (``triage audit verify``, run daily). ``checked`` counts the events
    verified by this call. The caller commits (the checkpoint is written in its transaction).

    ``max_events`` bounds the work of one call (a first call on a large trail without a
    checkpoint): the checkpoint then moves to the last event verified, and ``problem`` says how far
    it got; the next calls go on from there.
    """
    raw = str(session.execute(select(_SETTINGS.c.value).where(_SETTINGS.c.key == CHECKPOINT_KEY)).scalar() or "")
    cp_text, sep, cp_hash = raw.partition(":")
    start_id, prev_hash = 1, GENESIS
    if sep and cp_text.isdigit():
        cp_id = int(cp_text)
        row = session.get(AuditEvent, cp_id, populate_existing=True)
        if row is None:
            return VerifyReport(False, 0, cp_id, f"event {cp_id} (verified earlier) is missing (deleted?)")
        if row.hash != cp_hash or not row_intact(row):
            return VerifyReport(False, 0, cp_id, f"event {cp_id} changed after it was verified (edited?)")
        start_id, prev_hash = cp_id + 1, cp_hash
    end_id = start_id + max_events - 1 if max_events else None
    report = verify(session, start_id=start_id, start_prev_hash=prev_hash, end_id=end_id)
    if report.ok and report.checked:
        cp_id = start_id + report.checked - 1  # the last event verified (ids are gap-free)
        mark_verified(session, cp_id)
        head_id = int(session.scalar(select(func.max(AuditEvent.id))) or 0)
        if head_id > cp_id:
            return VerifyReport(True, report.checked, None,
                                f"verified up to event {cp_id} of {head_id}; the next views go on from there")
    return report


def mark_verified(session: Session, event_id: int) -> None:
    """Move the verified checkpoint to ``event_id`` (every event up to it was found good); the
    caller commits. ``triage audit verify`` calls it after a clean full run, so the audit page
    never walks the whole trail itself."""
    value = f"{event_id}:{session.execute(select(AuditEvent.hash).where(AuditEvent.id == event_id)).scalar_one()}"
    conn = session.connection()
    if conn.execute(update(_SETTINGS).where(_SETTINGS.c.key == CHECKPOINT_KEY).values(value=value)).rowcount == 0:
        conn.execute(insert(_SETTINGS).values(key=CHECKPOINT_KEY, value=value))


def row_intact(ev: AuditEvent) -> bool:
    """Whether one event's stored hash still matches its content (no chain walk)."""
    return compute_hash(_row_fields(ev), ev.prev_hash) == ev.hash


# Queries ---------------------------------------------------------------------------------------
def events(
    session: Session,
    *,
    event_type: str | list[str] | None = None,
    actor: str | None = None,
    study_uid: str | None = None,
    accession: str | None = None,
    outcome: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    before_id: int | None = None,
    limit: int = 100,
    newest_first: bool = True,
) -> list[AuditEvent]:
    """Events matching all given filters (for the web audit page). Page with ``before_id``."""
    q = select(AuditEvent)
    if event_type:
        types = [event_type] if isinstance(event_type, str) else list(event_type)
        q = q.where(AuditEvent.event_type.in_(types))
    if actor:
        q = q.where(AuditEvent.actor == actor)
    if study_uid:
        q = q.where(AuditEvent.study_uid == study_uid)
    if accession:
        q = q.where(AuditEvent.accession == accession)
    if outcome:
        q = q.where(AuditEvent.outcome == outcome)
    if since is not None:
        q = q.where(AuditEvent.ts >= since)
    if until is not None:
        q = q.where(AuditEvent.ts < until)
    if before_id is not None:
        q = q.where(AuditEvent.id < before_id)
    order = AuditEvent.id.desc() if newest_first else AuditEvent.id.asc()
    return list(session.scalars(q.order_by(order).limit(max(1, min(limit, 10_000)))).all())


def count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)
