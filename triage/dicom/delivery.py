"""The ``deliver`` job: send one result object to one DICOM destination.

Each attempt writes a :class:`~storage.models.Delivery` row and an audit event (``delivered``
or ``delivery_failed``; ``delivery_dead`` as well when it was the last attempt). A failure
raises :class:`DeliveryError`, so the queue retries with back-off and dead-letters after
``max_attempts``. Each destination is its own lane (storage/queue.py): its deliveries go out one
at a time, in order (positive/STAT results first among those waiting). When the destination cannot
be reached (no association, or it was lost mid-send) the handler raises
:class:`DestinationDown`, which backs off the whole destination, so later deliveries wait behind
the failed one instead of overtaking it. A destination that is down never holds up the others
or inference.
"""

from __future__ import annotations

from typing import Any

from storage import audit
from storage.models import Delivery, ResultObject, Series, Study, utcnow
from storage.queue import LaneDown
from triage.config import Destination, parse_destination
from triage.context import AppContext
from triage.dicom.scu import SEND_FAILED, NoConnection, SendError, is_success, send_files, status_text
from triage.logging import get_logger

log = get_logger(__name__)


class DeliveryError(RuntimeError):
    """The result object did not reach the destination (the job is retried)."""


class DestinationDown(DeliveryError, LaneDown):
    """The association broke mid-send: the whole destination backs off (the job is retried; the
    attempt counts, since an object that breaks the peer every time must not block it forever)."""


class DestinationUnreachable(DestinationDown):
    """Not even a connection (connection refused, no route, timed out): the destination's outage, not
    this object's. The lane waits as long as the outage lasts and the attempt does not count (up to
    the queue's ``unreachable_wait_seconds``)."""

    spends_attempt = False


def _destination(value: Any) -> Destination:
    if isinstance(value, Destination):
        return value
    return parse_destination(str(value))


def handle_deliver(ctx: AppContext, job: Any) -> None:
    """Send ``payload["result_object_id"]`` to ``payload["destination"]`` (``AET@host:port``)."""
    s = ctx.settings
    payload = job.payload or {}
    destination = _destination(payload["destination"])
    object_id = int(payload["result_object_id"])
    with ctx.sessions() as session:
        obj = session.get(ResultObject, object_id)
        if obj is None:
            raise DeliveryError(f"result object {object_id} does not exist (purged?)")
        path = ctx.store.path(obj.path)
        result_id, sop_uid, kind = obj.result_id, obj.sop_instance_uid, obj.kind
        series = session.get(Series, obj.result.series_id)
        study = session.get(Study, obj.result.study_id)
        study_uid = study.study_uid if study else ""
        accession = study.accession if study else ""
        series_uid = series.series_uid if series else ""
        # One answer per study (triage/pipeline/answer.py), checked again at send time: a negative
        # result's object never goes out once the study is positive, even if its held job escaped
        # the withdrawal (lane down, backlog, a retry after the hold ran out).
        withhold = bool(study is not None and study.flagged and not obj.result.positive)
    if withhold:
        with ctx.sessions.begin() as session:
            audit.record(session, audit.QUEUED, study_uid=study_uid, series_uid=series_uid, accession=accession,
                         details={"withheld": True, "reason": "negative result of a study now positive",
                                  "destination": str(destination), "result_object_id": object_id, "kind": kind,
                                  "sop_instance_uid": sop_uid, "job_id": job.id})
        log.info("negative result withheld: the study is positive", result_object_id=object_id, kind=kind)
        return
    started = utcnow()
    status_str, error, ok, down, unreachable = "", "", False, False, False
    try:
        if not path.is_file():
            raise DeliveryError(f"result file {obj.path} is missing from the file store")
        results = send_files(destination, [path], s.ae_title, acse_timeout=s.acse_timeout,
                             dimse_timeout=s.dimse_timeout, network_timeout=s.network_timeout,
                             allow_compressed=s.send_compressed)
        status = results[0][1] if results else -2
        status_str = status_text(status)
        ok = is_success(status)
        down = status == SEND_FAILED  # the association broke: the destination, not this object
        if not ok:
            error = f"peer answered {status_str}" if not down else f"association lost ({status_str})"
    except DeliveryError as exc:
        error, status_str = str(exc), "missing-file"
    except (SendError, OSError) as exc:
        error = str(exc)
        status_str = status_str or "no-association"
        down = True
        # only when nothing answered: a peer that rejects or aborts (say, no context for this object's
        # SOP class) refuses this object, which must not hold its lane for ever
        unreachable = isinstance(exc, NoConnection | ConnectionError | TimeoutError)
    attempt = int(getattr(job, "attempts", 1) or 1)
    # a laned job does not spend its attempt on an unreachable destination for a while (storage/queue.py)
    waits_for_lane = (unreachable and bool(getattr(job, "lane", None))
                      and ctx.queue.waits_free(getattr(job, "created_at", None)))
    last = not waits_for_lane and attempt >= int(getattr(job, "max_attempts", s.max_attempts) or s.max_attempts)
    with ctx.sessions.begin() as session:
        session.add(Delivery(
            result_id=result_id, result_object_id=object_id, job_id=job.id, channel="dicom",
            destination=str(destination), attempt=attempt, ok=ok, status=status_str, error=error[:2000],
            started_at=started, finished_at=utcnow(),
        ))
        common = {"study_uid": study_uid, "series_uid": series_uid, "accession": accession}
        details = {"destination": str(destination), "result_object_id": object_id, "kind": kind,
                   "sop_instance_uid": sop_uid, "status": status_str, "attempt": attempt, "job_id": job.id}
        if ok:
            audit.record(session, audit.DELIVERED, **common, details=details)
        else:
            audit.record(session, audit.DELIVERY_FAILED, **common, outcome=audit.FAILURE,
                         details={**details, "error": error[:500]})
            if last:
                audit.record(session, audit.DELIVERY_DEAD, **common, outcome=audit.FAILURE,
                             details={**details, "error": error[:500]})
    if ok:
        log.info("result delivered", destination=str(destination), kind=kind, sop_uid=sop_uid, attempt=attempt)
        return
    log.warning("delivery failed", destination=str(destination), kind=kind, attempt=attempt, error=error[:200],
                destination_down=down)
    kind_of_failure = DestinationUnreachable if unreachable else DestinationDown if down else DeliveryError
    raise kind_of_failure(f"delivery of {kind} {sop_uid} to {destination} failed: {error}")
