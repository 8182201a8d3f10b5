"""Read models for the pages and the API: plain dicts built from the database.

Patient identifiers leave this module masked unless the caller says the user may see PHI
(admins; see ``auth.PHI_ROLES``). Destinations and error texts leave it without URL
credentials (``triage.redact.strip_userinfo``): a webhook may be configured as
``https://user:secret@host/hook``, and the secret must not reach a page or the API.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, exists, func, or_, select
from sqlalchemy.orm import Session

from storage.lifecycle import LIVE_JOB_STATES, JobState, StudyStatus
from storage.models import (
    RESULT_OUT_OF_DOMAIN,
    AuditEvent,
    Delivery,
    Feedback,
    Finding,
    Job,
    JobLane,
    ModelVersion,
    Result,
    Series,
    Study,
    User,
    Worker,
)
from triage.labels import DISPLAY, LABELS, SHORT
from triage.redact import strip_userinfo, strip_userinfo_deep

STATUSES: tuple[str, ...] = tuple(StudyStatus)
FEEDBACK_ACTIONS: tuple[str, ...] = ("acknowledge", "agree", "disagree")
#: Optional reasons a reader can give with a verdict (code, text), per action; free text goes in the comment.
FEEDBACK_REASONS: dict[str, tuple[tuple[str, str], ...]] = {
    "agree": (("confirmed", "Hemorrhage confirmed"), ("subtype_differs", "Bleed confirmed, another subtype"),
              ("extent_differs", "Bleed confirmed, extent or volume differs")),
    "disagree": (("no_bleed", "No hemorrhage"), ("artifact", "Artifact (beam hardening, motion, metal)"),
                 ("calcification", "Calcification or contrast"), ("wrong_region", "Marked region is not the bleed"),
                 ("missed", "Hemorrhage missed or under-called"), ("other", "Other")),
}
REASON_TEXT: dict[str, str] = {code: text for items in FEEDBACK_REASONS.values() for code, text in items}


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def mask_patient(name: str, patient_id: str) -> str:
    """Initials (given then family name) plus the last two characters of the ID, e.g. ``J.D. …42``."""
    comps = [c.strip() for c in name.split("=")[0].split("^")]  # DICOM PN: family^given^middle^prefix^suffix
    family, given = (comps + ["", ""])[:2]
    words = [w for w in (given.split() + family.split()) if w]
    initials = "".join(f"{w[0].upper()}." for w in words[:3]) or "?"
    tail = patient_id[-2:] if len(patient_id) >= 2 else ""
    return f"{initials} …{tail}" if tail else initials


def patient_display(study: Study, phi: bool) -> str:
    if phi:
        name = study.patient_name.replace("^", " ").strip() or "(no name)"
        return f"{name} ({study.patient_id})" if study.patient_id else name
    return mask_patient(study.patient_name, study.patient_id)


def latest_results(s: Session, study_ids: Iterable[int]) -> dict[int, Result]:
    """The newest non-superseded result of each study."""
    ids = list(set(study_ids))
    if not ids:
        return {}
    rows = s.scalars(
        select(Result)
        .where(Result.study_id.in_(ids), Result.superseded.is_(False))
        .order_by(Result.study_id, Result.created_at.desc(), Result.id.desc())
    ).all()
    out: dict[int, Result] = {}
    for r in rows:
        out.setdefault(r.study_id, r)
    return out


def findings_of(s: Session, result_ids: Iterable[int]) -> dict[int, dict[str, Finding]]:
    ids = list(set(result_ids))
    out: dict[int, dict[str, Finding]] = defaultdict(dict)
    if ids:
        for f in s.scalars(select(Finding).where(Finding.result_id.in_(ids))):
            out[f.result_id][f.label] = f
    return out


def finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "label": f.label,
        "name": DISPLAY.get(f.label, f.label),
        "short": SHORT.get(f.label, f.label),
        "probability": round(float(f.probability), 4),
        "threshold": round(float(f.threshold), 4),
        "present": bool(f.present),
        "volume_ml": round(float(f.volume_ml), 2),
        "abc2_ml": round(float(f.abc2_ml), 2),
        "key_slice": f.key_slice,
    }


def ordered_findings(by_label: dict[str, Finding]) -> list[dict[str, Any]]:
    known = [finding_dict(by_label[lb]) for lb in LABELS if lb in by_label]
    extra = [finding_dict(f) for lb, f in sorted(by_label.items()) if lb not in LABELS]
    return known + extra


def time_to_result(study: Study) -> float | None:
    """Seconds from the first received image to the result (None before a result)."""
    if study.result_at is None:
        return None
    return max(0.0, (study.result_at - study.first_received_at).total_seconds())


def last_feedback(s: Session, study_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    if not study_ids:
        return out
    rows = s.execute(
        select(Feedback, User.username)
        .outerjoin(User, User.id == Feedback.user_id)
        .where(Feedback.study_id.in_(list(study_ids)))
        .order_by(Feedback.study_id, Feedback.created_at.desc(), Feedback.id.desc())
    ).all()
    for fb, username in rows:
        out.setdefault(fb.study_id, {"action": fb.action, "user": username or "?", "at": iso(fb.created_at)})
    return out


def study_row(study: Study, result: Result | None, findings: dict[str, Finding], phi: bool,
              feedback: dict[str, Any] | None = None) -> dict[str, Any]:
    """One worklist / API row."""
    ttr = time_to_result(study)
    return {
        "id": study.id,
        "study_uid": study.study_uid,
        "accession": study.accession,
        "patient": patient_display(study, phi),
        "patient_masked": not phi,
        "description": study.study_description,
        "study_date": study.study_date,
        "study_when": study_when(study),
        "age": patient_age(study.patient_birth_date, study.study_date),
        "sex": study.patient_sex if study.patient_sex in ("F", "M", "O") else "",
        "status": study.status,
        "status_reason": study.status_reason,
        "priority": study.priority,
        "stat": bool(study.stat),
        "flagged": bool(study.flagged),
        "received_at": iso(study.first_received_at),
        "last_received_at": iso(study.last_received_at),
        "result_at": iso(study.result_at),
        "time_to_result_s": round(ttr, 1) if ttr is not None else None,
        "result_id": result.id if result else None,
        "positive": bool(result.positive) if result else None,
        "total_volume_ml": round(float(result.total_volume_ml), 2) if result else None,
        "abc2_ml": round(float(result.abc2_ml), 2) if result else None,
        "findings": ordered_findings(findings),
        "feedback": feedback,
        "input_domain": result.input_domain if result else None,
    }


#: Study statuses that stay out of the "to read" view: nothing from the node to read there.
NOT_TO_READ = (StudyStatus.SKIPPED, StudyStatus.FAILED)
WORKLIST_VIEWS = ("to-read", "all")
FLAG_FILTERS = ("flagged", "not-flagged")


def read_condition() -> Any:
    """SQL: someone acknowledged, agreed or disagreed with a current (not superseded) result of
    the study. Such a study is read: it leaves the "to read" view and raises no more alerts."""
    return exists().where(Feedback.study_id == Study.id, Feedback.result_id == Result.id,
                          Result.superseded.is_(False))


def subtype_present(label: str) -> Any:
    """SQL: ``label`` is present in a current result of the study."""
    return exists().where(Result.study_id == Study.id, Result.superseded.is_(False), Finding.result_id == Result.id,
                          Finding.label == label, Finding.present.is_(True))


def _like_escape(value: str) -> str:
    return "%" + value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def worklist_filters(params: dict[str, str], phi: bool) -> dict[str, str]:
    """The worklist's filters from query parameters, checked and normalised (unknown values
    dropped). Patient search is kept only for roles that see patient identifiers."""
    out: dict[str, str] = {"view": params.get("view", "") if params.get("view") in WORKLIST_VIEWS else "to-read"}
    for name in ("accession", "patient"):
        v = "".join(c for c in str(params.get(name, "")) if c.isprintable()).strip()[:64]
        if v and (name != "patient" or phi):
            out[name] = v
    for name in ("date_from", "date_to"):
        v = str(params.get(name, "")).replace("-", "")
        if len(v) == 8 and v.isdigit():
            out[name] = v
    if params.get("flag") in FLAG_FILTERS:
        out["flag"] = params["flag"]
    if params.get("status") in STATUSES:
        out["status"] = params["status"]
    if params.get("subtype") in LABELS:
        out["subtype"] = params["subtype"]
    return out


def apply_worklist_filters(stmt: Select[Any], f: dict[str, str]) -> Select[Any]:
    if f.get("view", "to-read") == "to-read":
        stmt = stmt.where(Study.status.not_in([str(x) for x in NOT_TO_READ]), ~read_condition())
    # Case-insensitive substring search, alike on SQLite and PostgreSQL ("rossi maria" finds ROSSI^MARIA).
    if f.get("accession"):
        stmt = stmt.where(func.lower(Study.accession).like(_like_escape(f["accession"].lower()), escape="\\"))
    if f.get("patient"):
        pat = _like_escape(f["patient"].lower().replace(" ", "^"))
        stmt = stmt.where(or_(func.lower(Study.patient_name).like(pat, escape="\\"),
                              func.lower(Study.patient_id).like(_like_escape(f["patient"].lower()), escape="\\")))
    if f.get("date_from"):
        stmt = stmt.where(Study.study_date >= f["date_from"])
    if f.get("date_to"):
        stmt = stmt.where(Study.study_date <= f["date_to"])
    if f.get("flag"):
        stmt = stmt.where(Study.flagged.is_(f["flag"] == "flagged"))
    if f.get("status"):
        stmt = stmt.where(Study.status == f["status"])
    if f.get("subtype"):
        stmt = stmt.where(subtype_present(f["subtype"]))
    return stmt


def worklist(s: Session, phi: bool, limit: int = 200, filters: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Studies for the worklist: flagged first, then newest first (``filters``: see
    :func:`worklist_filters`; none = every study)."""
    stmt = select(Study).where(Study.purged_at.is_(None))
    if filters:
        stmt = apply_worklist_filters(stmt, filters)
    studies = s.scalars(
        stmt.order_by(Study.flagged.desc(), Study.first_received_at.desc(), Study.id.desc()).limit(limit)
    ).all()
    results = latest_results(s, [st.id for st in studies])
    fnd = findings_of(s, [r.id for r in results.values()])
    fb = last_feedback(s, [st.id for st in studies])
    rows = []
    for st in studies:
        r = results.get(st.id)
        rows.append(study_row(st, r, fnd.get(r.id, {}) if r else {}, phi, fb.get(st.id)))
    return rows


def to_read_count(s: Session) -> int:
    stmt = apply_worklist_filters(select(func.count()).select_from(Study).where(Study.purged_at.is_(None)),
                                  {"view": "to-read"})
    return int(s.scalar(stmt) or 0)


def alerts(s: Session, limit: int = 50) -> list[dict[str, Any]]:
    """Flagged studies that nobody has read yet (newest result first): what raises alerts.
    Accession and subtypes only, no patient identifiers."""
    studies = s.scalars(select(Study).where(Study.purged_at.is_(None), Study.flagged.is_(True), ~read_condition())
                        .order_by(Study.result_at.desc(), Study.id.desc()).limit(limit)).all()
    results = latest_results(s, [st.id for st in studies])
    fnd = findings_of(s, [r.id for r in results.values()])
    out = []
    for st in studies:
        r = results.get(st.id)
        present = [SHORT[lb] for lb in LABELS[1:] if r and lb in fnd.get(r.id, {}) and fnd[r.id][lb].present]
        out.append({"id": st.id, "accession": st.accession, "result_at": iso(st.result_at), "subtypes": present})
    return out


def patient_age(birth_date: str, study_date: str) -> str:
    """Age at the study from DICOM dates (YYYYMMDD), e.g. ``76 y`` (``8 mo`` under two years), or ""."""
    try:
        b = dt.date(int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:8]))
        d = dt.date(int(study_date[:4]), int(study_date[4:6]), int(study_date[6:8]))
    except (ValueError, TypeError):
        return ""
    months = (d.year - b.year) * 12 + d.month - b.month - (d.day < b.day)
    if months < 0:
        return ""
    return f"{months // 12} y" if months >= 24 else f"{months} mo"


def study_when(study: Study) -> str:
    """Study date and time from the DICOM header, e.g. ``2026-01-02 03:15``, or ""."""
    d, t = study.study_date or "", (study.study_time or "").split(".")[0]
    if len(d) != 8:
        return ""
    out = f"{d[:4]}-{d[4:6]}-{d[6:8]}"
    return out + (f" {t[:2]}:{t[2:4]}" if len(t) >= 4 and t[:4].isdigit() else "")


# --------------------------------------------------------------------------- study view
def study_detail(s: Session, study_id: int, phi: bool) -> dict[str, Any] | None:
    study = s.get(Study, study_id)
    if study is None:
        return None
    result = latest_results(s, [study.id]).get(study.id)
    fnd = findings_of(s, [result.id]).get(result.id, {}) if result else {}
    row = study_row(study, result, fnd, phi, last_feedback(s, [study.id]).get(study.id))
    row["series"] = [
        {"id": se.id, "series_uid": se.series_uid, "number": se.series_number, "description": se.description,
         "modality": se.modality, "state": se.state, "skip_reason": se.skip_reason,
         "instances": se.instance_count}
        for se in s.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.series_number))
    ]
    row["model"] = None
    row["previews"] = []
    row["timings"] = {}
    row["device"] = ""
    if result is not None:
        if result.model_version_id is not None:
            mv = s.get(ModelVersion, result.model_version_id)
            if mv is not None:
                row["model"] = {"name": mv.name, "version": mv.version, "sha256": mv.sha256}
        previews = (result.summary or {}).get("previews") or []
        row["previews"] = [
            {"index": i, "label": str(p.get("label", "")), "slice": p.get("slice"),
             "has_plain": bool(p.get("plain")), "has_overlay": bool(p.get("overlay"))}
            for i, p in enumerate(previews) if isinstance(p, dict)
        ]
        row["timings"] = {k: v for k, v in (result.timings or {}).items() if isinstance(v, int | float)}
        row["device"] = result.device
        row["generation"] = result.generation
    row["feedback_history"] = [
        {"action": fb.action, "user": username or "?", "at": iso(fb.created_at), "comment": fb.comment,
         "reason": REASON_TEXT.get(fb.reason, fb.reason)}
        for fb, username in s.execute(
            select(Feedback, User.username).outerjoin(User, User.id == Feedback.user_id)
            .where(Feedback.study_id == study.id).order_by(Feedback.created_at, Feedback.id)
        )
    ]
    row["timeline"] = collapse_received([
        {"ts": iso(ev.ts), "event_type": ev.event_type, "actor": ev.actor, "outcome": ev.outcome,
         "series_uid": ev.series_uid, "details": strip_userinfo_deep(ev.details or {})}
        for ev in s.scalars(
            select(AuditEvent).where(AuditEvent.study_uid == study.study_uid)
            .order_by(AuditEvent.ts, AuditEvent.id).limit(2000)
        )
    ])
    row["deliveries"] = deliveries_by_destination(s, study.id)
    return row


def collapse_received(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge runs of ``received`` events of one series and sender into one timeline row (count summed)."""
    out: list[dict[str, Any]] = []
    for ev in events:
        prev = out[-1] if out else None
        if (prev is not None and ev["event_type"] == "received" == prev["event_type"]
                and ev["series_uid"] == prev["series_uid"] and ev["actor"] == prev["actor"]
                and ev["outcome"] == prev["outcome"]):
            d = prev["details"]
            d["count"] = int(d.get("count", 1)) + int(ev["details"].get("count", 1))
            d["batches"] = int(d.get("batches", 1)) + 1
            prev["ts_last"] = ev["ts"]
            continue
        out.append({**ev, "details": {"count": ev["details"].get("count", 1), "batches": 1}
                    if ev["event_type"] == "received" else ev["details"]})
    return out


def preview_path(s: Session, study_id: int, index: int, kind: str) -> str | None:
    """The file-store path of a preview image, looked up in the database (never taken from the URL)."""
    result = latest_results(s, [study_id]).get(study_id)
    if result is None or kind not in ("plain", "overlay"):
        return None
    previews = (result.summary or {}).get("previews") or []
    if not 0 <= index < len(previews) or not isinstance(previews[index], dict):
        return None
    rel = previews[index].get(kind)
    return str(rel) if rel else None


def deliveries_by_destination(s: Session, study_id: int) -> list[dict[str, Any]]:
    """Per (channel, destination): attempts, objects sent, the last outcome."""
    rows = s.scalars(
        select(Delivery).join(Result, Result.id == Delivery.result_id)
        .where(Result.study_id == study_id)
        .order_by(Delivery.started_at, Delivery.id)
    ).all()
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for d in rows:
        destination = strip_userinfo(d.destination)
        g = groups.setdefault((d.channel, destination), {
            "channel": d.channel, "destination": destination, "attempts": 0, "ok": 0, "failed": 0,
            "objects": set(), "last_status": "", "last_error": "", "last_ok": None, "last_at": None})
        g["attempts"] += 1
        g["ok" if d.ok else "failed"] += 1
        if d.result_object_id is not None and d.ok:
            g["objects"].add(d.result_object_id)
        g["last_status"], g["last_error"], g["last_ok"] = d.status, strip_userinfo(d.error or ""), bool(d.ok)
        g["last_at"] = iso(d.finished_at or d.started_at)
    out = []
    for g in groups.values():
        g["objects_delivered"] = len(g.pop("objects"))
        out.append(g)
    return out


# --------------------------------------------------------------------------- operations
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def quality(s: Session, since: dt.datetime | None = None) -> dict[str, Any]:
    """Flag rate, PPV from radiologist feedback, results outside the model's input domain,
    time-to-result percentiles."""
    cond = [Study.status == StudyStatus.DONE]
    if since is not None:
        cond.append(Study.first_received_at >= since)
    done = s.scalar(select(func.count()).select_from(Study).where(*cond)) or 0
    flagged = s.scalar(select(func.count()).select_from(Study).where(*cond, Study.flagged.is_(True))) or 0
    # PPV: of the verdicts on flagged studies' results, the share that agree. One verdict per
    # user per result: a user's latest answer replaces only that user's own earlier answers, so
    # no user can move the PPV by more than one verdict per result.
    verdicts = s.execute(
        select(Feedback.study_id, Feedback.result_id, Feedback.user_id, Feedback.action)
        .join(Study, Study.id == Feedback.study_id)
        .where(*cond, Study.flagged.is_(True), Feedback.action.in_(("agree", "disagree")))
        .order_by(Feedback.created_at.desc(), Feedback.id.desc())
    ).all()
    latest: dict[tuple[int, int | None, int | None], str] = {}
    for sid, rid, uid, action in verdicts:
        latest.setdefault((sid, rid, uid), action)
    agree = sum(1 for a in latest.values() if a == "agree")
    disagree = len(latest) - agree
    # Agreement between readers: results with verdicts from two or more users, and how many of
    # those have the same verdict from all of them.
    by_result: dict[tuple[int, int | None], set[str]] = defaultdict(set)
    readers: dict[tuple[int, int | None], int] = defaultdict(int)
    for (sid, rid, _uid), action in latest.items():
        by_result[(sid, rid)].add(action)
        readers[(sid, rid)] += 1
    multi = [key for key, n in readers.items() if n >= 2]
    concordant = sum(1 for key in multi if len(by_result[key]) == 1)
    # current results on series unlike the model's training studies (triage/models/domain.py)
    ood = s.scalar(
        select(func.count()).select_from(Result).join(Study, Study.id == Result.study_id)
        .where(*cond, Result.superseded.is_(False), RESULT_OUT_OF_DOMAIN)
    ) or 0
    ttr = [
        (ra - fr).total_seconds()
        for fr, ra in s.execute(
            select(Study.first_received_at, Study.result_at).where(*cond, Study.result_at.is_not(None))
            .order_by(Study.result_at.desc()).limit(5000)
        )
    ]
    ttr = [max(0.0, v) for v in ttr]
    return {
        "done": done,
        "flagged": flagged,
        "flag_rate": (flagged / done) if done else None,
        "verdicts": len(latest),
        "agree": agree,
        "disagree": disagree,
        "ppv": (agree / len(latest)) if latest else None,
        "multi_reader": len(multi),
        "concordant": concordant,
        "agreement": (concordant / len(multi)) if multi else None,
        "out_of_domain": ood,
        "out_of_domain_rate": (ood / done) if done else None,
        "ttr_n": len(ttr),
        "ttr_p50": percentile(ttr, 50),
        "ttr_p90": percentile(ttr, 90),
        "ttr_p99": percentile(ttr, 99),
        "ttr_max": max(ttr) if ttr else None,
    }


def verdict_reasons(s: Session, since: dt.datetime | None = None, recent: int = 20) -> dict[str, Any]:
    """Agree / disagree verdicts by reason (counts) and the latest ones with their free text
    (operations page, admins only)."""
    cond = [Feedback.action.in_(("agree", "disagree"))]
    if since is not None:
        cond.append(Feedback.created_at >= since)
    counts = [{"action": a, "reason": r, "text": REASON_TEXT.get(r, "(no reason given)") if r else "(no reason given)",
               "n": int(n)}
              for a, r, n in s.execute(select(Feedback.action, Feedback.reason, func.count()).where(*cond)
                                       .group_by(Feedback.action, Feedback.reason)
                                       .order_by(Feedback.action, func.count().desc()))]
    latest = [{"at": iso(fb.created_at), "user": username or "?", "accession": accession, "study_id": fb.study_id,
               "action": fb.action, "reason": REASON_TEXT.get(fb.reason, fb.reason), "comment": fb.comment}
              for fb, username, accession in s.execute(
                  select(Feedback, User.username, Study.accession).outerjoin(User, User.id == Feedback.user_id)
                  .join(Study, Study.id == Feedback.study_id).where(*cond)
                  .order_by(Feedback.created_at.desc(), Feedback.id.desc()).limit(recent))]
    return {"counts": counts, "latest": latest}


def workers(s: Session, now: dt.datetime) -> list[dict[str, Any]]:
    return [
        {"id": w.id, "role": w.role, "host": w.host, "pid": w.pid, "started_at": iso(w.started_at),
         "heartbeat_at": iso(w.heartbeat_at), "age_s": round((now - w.heartbeat_at).total_seconds(), 1),
         "current_job_id": w.current_job_id}
        for w in s.scalars(select(Worker).order_by(Worker.heartbeat_at.desc()))
    ]


def dead_jobs(s: Session, limit: int = 100) -> list[dict[str, Any]]:
    return [
        {"id": j.id, "kind": j.kind, "attempts": j.attempts, "payload": strip_userinfo_deep(j.payload),
         "study_id": j.study_id, "finished_at": iso(j.finished_at),
         "last_error": strip_userinfo(j.last_error or "")[:500]}
        for j in s.scalars(select(Job).where(Job.state == JobState.DEAD).order_by(Job.id.desc()).limit(limit))
    ]


def destinations(s: Session, configured: Sequence[str]) -> list[dict[str, Any]]:
    """Each configured destination (and any other seen in deliveries) with its last attempt."""
    names = list(configured)
    seen = [d for (d,) in s.execute(select(Delivery.destination).distinct()) if d not in names]
    out = []
    for name in names + sorted(seen):
        last = s.scalars(
            select(Delivery).where(Delivery.destination == name)
            .order_by(Delivery.started_at.desc(), Delivery.id.desc()).limit(1)
        ).first()
        counts = dict(s.execute(
            select(Delivery.ok, func.count()).where(Delivery.destination == name).group_by(Delivery.ok)
        ).all())
        lane = s.get(JobLane, f"dicom:{name}"[:255])  # the destination's back-off (storage/queue.py)
        waiting = s.scalar(select(func.count()).select_from(Job).where(
            Job.lane == f"dicom:{name}"[:255], Job.state.in_(LIVE_JOB_STATES)))
        out.append({
            "destination": strip_userinfo(name), "configured": name in configured,
            "channel": last.channel if last else "",
            "last_ok": bool(last.ok) if last else None, "last_status": last.status if last else "",
            "last_error": strip_userinfo(last.error or "")[:300] if last else "",
            "last_at": iso(last.finished_at or last.started_at) if last else None,
            "ok": int(counts.get(True, 0)), "failed": int(counts.get(False, 0)),
            "waiting": int(waiting or 0), "down_failures": int(lane.failures) if lane else 0,
            "backoff_until": iso(lane.blocked_until) if lane and lane.blocked_until else None,
        })
    return out


def model_versions(s: Session) -> list[dict[str, Any]]:
    return [
        {"name": m.name, "version": m.version, "sha256": m.sha256, "first_loaded_at": iso(m.first_loaded_at),
         "manifest": m.manifest or {}}
        for m in s.scalars(select(ModelVersion).order_by(ModelVersion.first_loaded_at.desc()))
    ]


def disk_usage(path: Any) -> dict[str, Any]:
    try:
        u = shutil.disk_usage(path)
    except OSError as exc:
        return {"error": str(exc)}
    return {"total": u.total, "used": u.used, "free": u.free, "used_fraction": u.used / u.total if u.total else None}
