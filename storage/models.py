"""Database schema (SQLAlchemy 2.x). Runs unchanged on SQLite and PostgreSQL.

Alembic migrations in ``alembic/versions`` create exactly these tables; a test compares them.
Identifiers that are PHI (patient name/ID) live only in ``studies`` and the audit trail.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on both back-ends (SQLite stores naive UTC text).

    A TypeDecorator, so that SQLite's own DATETIME adaptation cannot drop the conversion:
    values are stored as UTC and always read back timezone-aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: ANN001, ANN201
        if isinstance(value, dt.datetime):
            value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        return value

    def process_result_value(self, value, dialect):  # noqa: ANN001, ANN201
        if isinstance(value, dt.datetime):
            value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, dt.datetime: UTCDateTime}


# --------------------------------------------------------------------------- studies
class Study(Base):
    """One imaging study (Study Instance UID). Status summarises its series and jobs."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    accession: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(128), default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="")
    # receiving | queued | processing | done | skipped | failed
    status: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    # 0 routine, 10 STAT (rules), 20 flagged positive. Never lowered.
    priority: Mapped[int] = mapped_column(Integer, default=0, index=True)
    stat: Mapped[bool] = mapped_column(Boolean, default=False)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    result_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    purged_at: Mapped[dt.datetime | None] = mapped_column(default=None)

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")


class Series(Base):
    """One series. ``generation`` counts re-openings by late instances."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, default=None)
    description: Mapped[str] = mapped_column(String(128), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    # receiving | complete | selected | skipped | processing | done | failed
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    skip_reason: Mapped[str] = mapped_column(Text, default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # geometry found at assembly: tilt_deg, spacing, missing slices, kernel ...
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    """One received SOP instance and where its bytes are on disk."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, default=None)
    transfer_syntax: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)  # relative to the file store root
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)  # position, orientation, thickness ...

    series: Mapped[Series] = relationship(back_populates="instances")


# --------------------------------------------------------------------------- queue
class Job(Base):
    """A durable unit of work. States: queued -> running -> done | failed (retry) | dead."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "state", "kind", "priority", "run_after"),
        Index("ix_jobs_lane", "lane", "state"),
        UniqueConstraint("dedupe_key", name="uq_jobs_dedupe_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # infer | deliver | notify | ...
    state: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dedupe_key: Mapped[str | None] = mapped_column(String(255), default=None)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"), default=None)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id", ondelete="SET NULL"), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(default=None, index=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_error: Mapped[str] = mapped_column(Text, default="")
    #: Jobs of one lane (e.g. deliveries to one destination) run one at a time, in order (storage/queue.py).
    lane: Mapped[str | None] = mapped_column(String(255), default=None)


class JobLane(Base):
    """Back-off state of a lane (a destination): set when it is down, cleared when it answers."""

    __tablename__ = "job_lanes"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # consecutive "lane down" failures
    blocked_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A running process of any role, with its last heartbeat (operations page)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(32), default="worker")
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    current_job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)


# --------------------------------------------------------------------------- models and results
class ModelVersion(Base):
    """A model bundle the worker has loaded (identity recorded with every result)."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    first_loaded_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Result(Base):
    """The outcome of one inference job on one series generation."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), default=None
    )
    generation: Mapped[int] = mapped_column(Integer, default=0)
    positive: Mapped[bool] = mapped_column(Boolean, default=False)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    total_volume_ml: Mapped[float] = mapped_column(Float, default=0.0)
    abc2_ml: Mapped[float] = mapped_column(Float, default=0.0)
    key_slices: Mapped[dict[str, Any]] = mapped_column(default=dict)  # label -> [slice indices]
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # stage -> seconds
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    device: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    findings: Mapped[list[Finding]] = relationship(back_populates="result", cascade="all, delete-orphan")
    objects: Mapped[list[ResultObject]] = relationship(back_populates="result", cascade="all, delete-orphan")

    @property
    def input_domain(self) -> dict[str, Any] | None:
        """The model's input-domain check of this result (``summary["input_domain"]``:
        ``distance``, ``threshold``, ``in_domain``), or None when the bundle had none."""
        d = (self.summary or {}).get("input_domain")
        if not isinstance(d, dict) or "in_domain" not in d:
            return None
        return {"distance": float(d.get("distance", 0.0)), "threshold": float(d.get("threshold", 0.0)),
                "in_domain": bool(d["in_domain"])}


# SQL condition: the result's series was outside the model's input domain (a result without the
# check does not match). Counted by the metrics and the operations page.
RESULT_OUT_OF_DOMAIN = Result.summary["input_domain"]["in_domain"].as_boolean().is_(False)


class Finding(Base):
    """Per-label output of a result (any ICH and each of the five subtypes)."""

    __tablename__ = "findings"
    __table_args__ = (UniqueConstraint("result_id", "label", name="uq_findings_result_label"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(32))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    present: Mapped[bool] = mapped_column(Boolean)
    volume_ml: Mapped[float] = mapped_column(Float, default=0.0)
    abc2_ml: Mapped[float] = mapped_column(Float, default=0.0)
    key_slice: Mapped[int | None] = mapped_column(Integer, default=None)

    result: Mapped[Result] = relationship(back_populates="findings")


class ResultObject(Base):
    """A DICOM object produced for a result (SEG, SR, SC) and stored in the file store."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # seg | sr | sc
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    result: Mapped[Result] = relationship(back_populates="objects")


class Delivery(Base):
    """One send attempt of a result object or notification to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    result_object_id: Mapped[int | None] = mapped_column(
        ForeignKey("result_objects.id", ondelete="CASCADE"), default=None
    )
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    channel: Mapped[str] = mapped_column(String(16), default="dicom")  # dicom | webhook | hl7
    destination: Mapped[str] = mapped_column(String(255))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    ok: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(32), default="")  # DIMSE status / HTTP code / ACK code
    error: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


# --------------------------------------------------------------------------- people
class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255), default="")
    role: Mapped[str] = mapped_column(String(16), default="radiologist")  # radiologist | admin
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    api_token_hash: Mapped[str | None] = mapped_column(String(128), default=None, unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WebSession(Base):
    """A server-side web session: the cookie carries a random id, this row its sha256.

    Deleting the row ends the session at once (logout, account disabled, role or password
    changed, an admin's "revoke sessions"), whatever copy of the cookie is replayed later.
    """

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    via: Mapped[str] = mapped_column(String(16), default="password")  # password | proxy
    ip: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class LoginThrottle(Base):
    """Failed-login back-off of one client address (``account`` empty) or of one account as
    tried from one address (reports/web/auth.py). User names typed at login get rows whether
    or not they exist, so the throttle does not reveal which names exist."""

    __tablename__ = "login_throttle"
    __table_args__ = (UniqueConstraint("account", "address", name="uq_login_throttle_account_address"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account: Mapped[str] = mapped_column(String(64), default="", index=True)
    address: Mapped[str] = mapped_column(String(64), default="")
    failures: Mapped[int] = mapped_column(Integer, default=0)  # consecutive failures
    blocks: Mapped[int] = mapped_column(Integer, default=0)  # back-off periods so far (doubles the next)
    blocked_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class Feedback(Base):
    """A radiologist's answer on a result: acknowledge, agree or disagree."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id", ondelete="SET NULL"), default=None)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    action: Mapped[str] = mapped_column(String(16))  # acknowledge | agree | disagree
    reason: Mapped[str] = mapped_column(String(64), default="")  # a code of reports.web.queries.FEEDBACK_REASONS
    comment: Mapped[str] = mapped_column(Text, default="")  # free text
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- audit
class AuditEvent(Base):
    """Append-only audit trail; each row's hash covers its content and the previous hash."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    event_type: Mapped[str] = mapped_column(String(48), index=True)
    actor: Mapped[str] = mapped_column(String(128), default="system", index=True)
    study_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    accession: Mapped[str] = mapped_column(String(64), default="", index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="success")  # success | failure
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64), default="")
    hash: Mapped[str] = mapped_column(String(64), default="")


class Setting(Base):
    """Small key/value store for node state (e.g. the generated session key, chain head)."""

    __tablename__ = "node_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")
