"""The ``notify`` job: tell the configured channel (webhook, HL7 MLLP) about a positive result.

Each attempt is a ``deliveries`` row (channel ``webhook`` / ``hl7``) and an audit event; a failure
raises so the queue retries with back-off and dead-letters after the last attempt.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select

from storage import audit
from storage.models import Delivery, Finding, ModelVersion, Result, Study, utcnow
from triage.context import AppContext
from triage.models.types import BundleIdentity
from triage.notify import FindingInfo, StudyInfo, send_notification


def handle_notify(ctx: AppContext, job: Any) -> None:
    result_id = int(job.payload["result_id"])
    channel = str(job.payload["channel"])
    with ctx.sessions() as s:
        result = s.get(Result, result_id)
        if result is None:
            return  # purged meanwhile: nothing left to announce
        study = s.get(Study, result.study_id)
        series_uid = result.summary.get("series_uid", "") if result.summary else ""
        if not series_uid:
            from storage.models import Series

            series_uid = s.scalar(select(Series.series_uid).where(Series.id == result.series_id)) or ""
        info = StudyInfo(
            study_uid=study.study_uid, series_uid=series_uid, accession=study.accession,
            patient_id=study.patient_id, patient_name=study.patient_name,
            patient_birth_date=study.patient_birth_date, patient_sex=study.patient_sex,
            study_date=study.study_date, study_time=study.study_time,
            study_description=study.study_description, result_id=result.id,
        )
        findings = [
            FindingInfo(f.label, f.probability, f.threshold, f.present, f.volume_ml, f.abc2_ml)
            for f in s.scalars(select(Finding).where(Finding.result_id == result_id))
        ]
        mv = s.get(ModelVersion, result.model_version_id) if result.model_version_id else None
        bundle = BundleIdentity(mv.name, mv.version, mv.sha256) if mv else None
        attempt = 1 + (s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.result_id == result_id, Delivery.channel == channel)) or 0)
        superseded = result.superseded
        input_domain = result.input_domain
    destination = ctx.settings.webhook_url if channel == "webhook" else ctx.settings.hl7_destination
    if superseded:
        return  # a newer result of the series has its own notification
    started = utcnow()
    t0 = time.perf_counter()
    try:
        receipt = send_notification(channel, ctx.settings, info, findings, bundle=bundle, input_domain=input_domain)
    except Exception as exc:
        with ctx.sessions.begin() as s:
            s.add(Delivery(result_id=result_id, job_id=job.id, channel=channel, destination=_safe(destination),
                           attempt=attempt, ok=False, error=str(exc)[:2000], started_at=started,
                           finished_at=utcnow()))
            audit.record(s, "notify_failed", actor=ctx.worker_id, study_uid=info.study_uid,
                         series_uid=info.series_uid, accession=info.accession, outcome="failure",
                         details={"channel": channel, "attempt": attempt, "error": str(exc)[:500]})
        raise
    with ctx.sessions.begin() as s:
        s.add(Delivery(result_id=result_id, job_id=job.id, channel=channel, destination=_safe(destination),
                       attempt=attempt, ok=True, status=str(receipt.status), started_at=started,
                       finished_at=utcnow()))
        audit.record(s, "notified", actor=ctx.worker_id, study_uid=info.study_uid, series_uid=info.series_uid,
                     accession=info.accession,
                     details={"channel": channel, "status": receipt.status, "attempt": attempt,
                              "seconds": round(time.perf_counter() - t0, 3), **receipt.detail})


def _safe(destination: str) -> str:
    """Destinations without credentials or query strings (they may carry tokens)."""
    return destination.split("?", 1)[0].split("#", 1)[0]
