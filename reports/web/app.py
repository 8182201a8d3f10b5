"""The web node: worklist, study view, audit, operations, ``/api/v1``, ``/metrics``, health.

``create_app(ctx)`` builds the Starlette application; ``run_web(ctx, host, port)`` serves it
with uvicorn (blocking), for ``triage web`` / ``triage serve``.

Who sees what: radiologists and admins use the worklist and study view; only admins open the
audit and operations pages and see full patient names and IDs (radiologists see initials and
the last two characters of the patient ID). Accession numbers are shown to both roles.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import json
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import select, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reports.web import api, dicomweb, metrics, viewer
from reports.web import auth as web_auth
from reports.web import queries as q
from reports.web import users as web_users
from reports.web.auth import (
    EV_LOGOUT,
    ROLES,
    SESSION_TTL_SECONDS,
    audit_record,
    client_ip,
    csrf_ok,
    csrf_token,
    establish_session,
    login,
    requires,
    resolve_user,
    session_secret,
)
from storage import audit
from storage.db import READ_ONLY, session_scope
from storage.lifecycle import JobState
from storage.models import AuditEvent, Feedback, Study, User, Worker
from triage import __version__
from triage.context import AppContext
from triage.labels import LABELS, SHORT
from triage.logging import get_logger
from triage.redact import strip_userinfo

log = get_logger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "triage_session"
SESSION_MAX_AGE = SESSION_TTL_SECONDS
AUDIT_PAGE = 200
AUDIT_CSV_MAX = 100_000
AUDIT_VERIFY_PER_VIEW = 100_000  # events one audit view verifies at most (a first view of a large trail)
AUDIT_COUNT_CAP = 10_000  # a filtered count stops here ("more than 10,000"): counting is work per row
# Spreadsheet formula triggers: a cell starting with one of these is prefixed with "'" in the CSV.
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
WORKLIST_POLL_MS = 5000
ALERT_POLL_MS = 2000  # every page asks /alerts this often: a new flagged study alerts within ~2 s
EV_FEEDBACK = audit.FEEDBACK
EV_AUDIT_EXPORT = audit.VIEWED  # details {"export": "audit.csv", ...}
VOLUME_HELP = ("Voxel volume: the voxels the model's segmentation marks as blood, times the voxel size "
               "(what the overlay outlines).")
ABC2_HELP = ("ABC/2: the bedside ellipsoid estimate from the same region (length A x width B x height C, halved). "
             "Close to the voxel volume for a round haematoma; it overestimates thin or irregular collections "
             "(subdural, subarachnoid).")
NO_REGION = "detected on slice scores, no region above the segmentation threshold"
DISCLAIMER = ("Results come from a research model ({trained_on}). Not for clinical use: "
              "every study must be read by a radiologist.")


def model_disclaimer(bundle_path: str | None) -> str:
    """The banner of every page: what the configured bundle was trained on (its manifest's
    ``trained_on``), and that it is not for clinical use."""
    from triage.models.bundle import default_bundle_path, read_manifest

    try:
        trained_on = str(read_manifest(bundle_path or default_bundle_path()).get("trained_on") or "")
    except Exception:  # noqa: BLE001 - an unreadable bundle must not take the pages down
        trained_on = ""
    return DISCLAIMER.format(trained_on=trained_on or "see its model card for what it was trained on")

CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'")


class SecurityHeaders:
    """Adds CSP and friends to every response; pages and API answers are not cached.

    HSTS (``Strict-Transport-Security: max-age=hsts_seconds``) goes on responses to HTTPS
    requests, and on all responses when the node is configured as HTTPS-only
    (``session_https_only``, i.e. behind a TLS proxy that forwards plain HTTP).
    """

    def __init__(self, app: ASGIApp, hsts_seconds: int = 0, https_only: bool = False) -> None:
        self.app = app
        self.hsts = f"max-age={hsts_seconds}".encode() if hsts_seconds > 0 else b""
        self.https_only = https_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                if self.hsts and (self.https_only or scope.get("scheme") == "https"):
                    headers.append((b"strict-transport-security", self.hsts))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, wrapped)


class DicomwebCORS:
    """CORS for ``/dicomweb`` only, for the origins in ``dicomweb_cors_origins`` (a viewer such as
    OHIF served from another origin, authenticating with a bearer token). No cookies cross origins
    (``allow_credentials`` off), so a session cannot be used from another site; other paths are
    untouched."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        from starlette.middleware.cors import CORSMiddleware

        self.app = app
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET"],
                                   allow_headers=["Authorization", "Accept"], allow_credentials=False,
                                   max_age=600) if origins else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.cors is not None and scope["type"] == "http" and scope["path"].startswith("/dicomweb/"):
            await self.cors(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- template helpers
def _parse_dt(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def fmt_dt(value: Any) -> str:
    when = _parse_dt(value)
    if when is None:
        return "—"
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_duration(seconds: Any) -> str:
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def fmt_bytes(n: Any) -> str:
    if n is None:
        return "—"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{v:.1f} {unit}" if unit != "B" else f"{int(v)} B"
        v /= 1024
    return f"{v:.1f} TiB"


def fmt_pct(x: Any) -> str:
    return "—" if x is None else f"{100 * float(x):.1f} %"


def fmt_details(details: Any, max_chars: int = 400) -> str:
    """Audit details for a table cell: long lists summarised (e.g. hundreds of SOP UIDs), text capped."""
    if not isinstance(details, dict):
        return strip_userinfo(str(details))[:max_chars]
    short = {k: (f"[{len(v)} items]" if isinstance(v, list) and len(v) > 5 else v) for k, v in details.items()}
    text = strip_userinfo(json.dumps(short, sort_keys=True, default=str))
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def make_templates(bundle_path: str | None = None) -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters.update(dt=fmt_dt, duration=fmt_duration, bytes=fmt_bytes, pct=fmt_pct,
                       details=fmt_details,
                       tojson_compact=lambda v: json.dumps(v, sort_keys=True, default=str))
    env.globals.update(LABELS=LABELS, SHORT=SHORT, DISCLAIMER=model_disclaimer(bundle_path), VERSION=__version__,
                       POLL_MS=WORKLIST_POLL_MS, FEEDBACK_ACTIONS=q.FEEDBACK_ACTIONS,
                       FEEDBACK_REASONS=q.FEEDBACK_REASONS, VOLUME_HELP=VOLUME_HELP, ABC2_HELP=ABC2_HELP,
                       NO_REGION=NO_REGION,
                       VIEWER_PRESETS=viewer.PRESETS, ALERT_POLL_MS=ALERT_POLL_MS, LABEL_SHORT=SHORT)
    env.filters["viewer_url"] = viewer_url
    return templates


def viewer_url(template: str, study_uid: str) -> str:
    """The configured external viewer's link for a study (``viewer_url_template`` with
    ``{study_uid}``, URL-quoted), or "" when none is configured."""
    if not template or not study_uid:
        return ""
    from urllib.parse import quote

    return template.replace("{study_uid}", quote(study_uid, safe=""))


def _ctx(request: Request) -> AppContext:
    return request.app.state.ctx


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    context.setdefault("user", getattr(request.state, "user", None))
    context["csrf"] = csrf_token(request)
    return request.app.state.templates.TemplateResponse(request, name, context, status_code=status_code)


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


# --------------------------------------------------------------------------- login / logout
async def login_page(request: Request) -> Response:
    if request.method == "GET":
        return render(request, "login.html", next=_safe_next(request.query_params.get("next")), error="")
    ctx = _ctx(request)
    form = await request.form()
    nxt = _safe_next(str(form.get("next", "")))
    if not await csrf_ok(request):
        return render(request, "login.html", status_code=403, next=nxt,
                      error="The form expired. Please try again.")
    username, password = str(form.get("username", "")), str(form.get("password", ""))
    outcome = await run_in_threadpool(login, ctx, username, password, client_ip(request))
    if outcome.user is None:
        return render(request, "login.html", status_code=401, next=nxt, error=outcome.error, username=username)
    establish_session(request, outcome.user, outcome.session_id)
    return RedirectResponse(nxt, status_code=303)


@requires()
async def logout(request: Request) -> Response:
    """End the session on the server (a copy of the cookie is refused from now on) and clear it."""
    user = request.state.user

    def _end() -> None:
        web_auth.logout(_ctx(request), request)
        with session_scope(_ctx(request).sessions) as s:
            audit_record(s, EV_LOGOUT, actor=user.username, details={"ip": client_ip(request)})

    await run_in_threadpool(_end)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# --------------------------------------------------------------------------- worklist
def _worklist(ctx: AppContext, phi: bool, filters: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    with session_scope(ctx.reads) as s:  # read-only: never queues behind the receiver (SQLite)
        return q.worklist(s, phi, filters=filters), q.to_read_count(s)


def _worklist_context(request: Request) -> dict[str, Any]:
    user = request.state.user
    filters = q.worklist_filters(dict(request.query_params), user.sees_phi)
    return {"filters": filters, "query": urlencode({k: v for k, v in filters.items() if v}),
            "viewer_template": _ctx(request).settings.viewer_url_template}


@requires()
async def worklist_page(request: Request) -> Response:
    extra = _worklist_context(request)
    rows, to_read = await run_in_threadpool(_worklist, _ctx(request), request.state.user.sees_phi, extra["filters"])
    return render(request, "worklist.html", rows=rows, to_read=to_read, statuses=q.STATUSES, **extra)


@requires()
async def worklist_rows(request: Request) -> Response:
    """The worklist table body, polled by the page for live updates (same filters as the page)."""
    extra = _worklist_context(request)
    rows, to_read = await run_in_threadpool(_worklist, _ctx(request), request.state.user.sees_phi, extra["filters"])
    response = render(request, "_worklist_rows.html", rows=rows, **extra)
    response.headers["X-To-Read"] = str(to_read)
    return response


@requires()
async def alerts(request: Request) -> Response:
    """Flagged studies nobody has read yet (accession and subtypes, no patient identifiers):
    every page polls this for the title count, the notification and the sound."""
    ctx = _ctx(request)

    def _load() -> list[dict[str, Any]]:
        with session_scope(ctx.reads) as s:
            return q.alerts(s)

    items = await run_in_threadpool(_load)
    return JSONResponse({"count": len(items), "studies": items})


def _save_feedback(ctx: AppContext, study_id: int, user_id: int, username: str, action: str,
                   comment: str, reason: str = "") -> dict[str, Any] | None:
    with session_scope(ctx.sessions) as s:
        study = s.get(Study, study_id)
        if study is None:
            return None
        result = q.latest_results(s, [study.id]).get(study.id)
        fb = Feedback(study_id=study.id, result_id=result.id if result else None, user_id=user_id,
                      action=action, reason=reason, comment=comment)
        s.add(fb)
        s.flush()
        audit_record(s, EV_FEEDBACK, actor=username, study_uid=study.study_uid, accession=study.accession,
                     details={"action": action, "result_id": fb.result_id, "feedback_id": fb.id,
                              "flagged": bool(study.flagged), "reason": reason, "comment": comment})
        return {"action": action, "user": username, "at": q.iso(fb.created_at), "result_id": fb.result_id,
                "reason": reason}


@requires()
async def feedback(request: Request) -> Response:
    """Acknowledge / agree / disagree on a study's current result (JSON from buttons, or a form)."""
    study_id = _path_int(request, "study_id")
    is_json = request.headers.get("content-type", "").startswith("application/json")
    if is_json:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        body = body if isinstance(body, dict) else {}
    else:
        body = dict(await request.form())
    action = str(body.get("action", ""))
    comment = str(body.get("comment", ""))[:1000]
    if action not in q.FEEDBACK_ACTIONS:
        return JSONResponse({"error": f"action must be one of {', '.join(q.FEEDBACK_ACTIONS)}"}, status_code=400)
    reason = str(body.get("reason", "") or "")
    allowed = [code for code, _text in q.FEEDBACK_REASONS.get(action, ())]
    if reason and reason not in allowed:
        return JSONResponse({"error": f"reason for {action} must be one of {', '.join(allowed) or '(none)'}"},
                            status_code=400)
    user = request.state.user
    saved = await run_in_threadpool(_save_feedback, _ctx(request), study_id, user.id, user.username, action, comment,
                                    reason)
    if saved is None:
        return JSONResponse({"error": "study not found"}, status_code=404)
    if is_json:
        return JSONResponse({"ok": True, "feedback": saved})
    return RedirectResponse(f"/studies/{study_id}", status_code=303)


# --------------------------------------------------------------------------- study view
def _path_int(request: Request, name: str) -> int:
    try:
        value = int(request.path_params[name])
    except (KeyError, ValueError) as exc:
        raise HTTPException(404) from exc
    if not 0 < value < 2**31:
        raise HTTPException(404)
    return value


def _study(ctx: AppContext, study_id: int, username: str, phi: bool) -> dict[str, Any] | None:
    """The study view's data; opening it is audited (who looked at which study, with or without PHI)."""
    with session_scope(ctx.sessions) as s:
        study = s.get(Study, study_id)
        if study is None:
            return None
        audit_record(s, audit.VIEWED, actor=username, study_uid=study.study_uid, accession=study.accession,
                     details={"page": "study", "phi": phi})
    with session_scope(ctx.reads) as s:
        detail = q.study_detail(s, study_id, phi)
        if detail is not None:
            result = q.latest_results(s, [study_id]).get(study_id)
            detail["captions"] = viewer.key_slice_captions(s, result)
            detail["viewer_series_id"] = result.series_id if result is not None else next(
                (se["id"] for se in detail["series"] if se["instances"]), None)
        return detail


@requires()
async def study_page(request: Request) -> Response:
    user = request.state.user
    study = await run_in_threadpool(_study, _ctx(request), _path_int(request, "study_id"), user.username,
                                    user.sees_phi)
    if study is None:
        raise HTTPException(404, "No such study.")
    return render(request, "study.html", study=study,
                  viewer_link=viewer_url(_ctx(request).settings.viewer_url_template, study["study_uid"]))


@requires()
async def preview_image(request: Request) -> Response:
    ctx = _ctx(request)
    study_id, index = _path_int(request, "study_id"), int(request.path_params["index"])
    kind = request.path_params["kind"]

    def _find() -> Path | None:
        with session_scope(ctx.sessions) as s:
            rel = q.preview_path(s, study_id, index, kind)
        if rel is None:
            return None
        path = Path(ctx.store.path(rel)).resolve()
        root = Path(ctx.settings.store_dir).resolve()
        if root not in path.parents or not path.is_file():
            return None
        return path

    path = await run_in_threadpool(_find)
    if path is None:
        raise HTTPException(404, "No such image.")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


# --------------------------------------------------------------------------- series viewer
def _optional_int(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or not 0 < int(value) < 2**31:
        raise HTTPException(404)
    return int(value)


@requires()
async def viewer_manifest(request: Request) -> Response:
    """The series viewer's description of one series (slices in order, key slices, segments)."""
    ctx = _ctx(request)
    study_id = _path_int(request, "study_id")
    series_id = _optional_int(request.query_params.get("series"))

    def _load() -> dict[str, Any] | None:
        with session_scope(ctx.reads) as s:
            return viewer.manifest(s, ctx.store, study_id, series_id)

    data = await run_in_threadpool(_load)
    if data is None:
        return JSONResponse({"error": "no such series"}, status_code=404)
    return JSONResponse(data)


@requires()
async def viewer_slice(request: Request) -> Response:
    """One stored slice as little-endian int16 HU (the browser windows it)."""
    ctx = _ctx(request)
    study_id, instance_id = _path_int(request, "study_id"), _path_int(request, "instance_id")

    frame = _optional_int(request.query_params.get("frame"))

    def _load() -> bytes | None:
        with session_scope(ctx.reads) as s:
            found = viewer.slice_path(s, study_id, instance_id)
        if found is None:
            return None
        try:
            return viewer.slice_hu(ctx.store, instance_id, found[0], frame, found[1])
        except Exception as exc:  # noqa: BLE001 - an undecodable or vanished file is a missing slice, not a 500
            log.warning("web.viewer_slice_unreadable", instance_id=instance_id, error=type(exc).__name__)
            return None

    data = await run_in_threadpool(_load)
    if data is None:
        raise HTTPException(404, "No such slice.")
    return Response(data, media_type="application/octet-stream")


@requires()
async def viewer_overlay(request: Request) -> Response:
    """The segment bitmask of one slice (bit n-1 = segment n), 204 when the slice has none."""
    ctx = _ctx(request)
    study_id, instance_id = _path_int(request, "study_id"), _path_int(request, "instance_id")

    frame = _optional_int(request.query_params.get("frame"))

    def _load() -> bytes | None:
        with session_scope(ctx.reads) as s:
            return viewer.overlay_bytes(s, ctx.store, study_id, instance_id, frame)

    data = await run_in_threadpool(_load)
    if data is None:
        return Response(status_code=204)
    return Response(data, media_type="application/octet-stream")


@requires()
async def viewer_heat(request: Request) -> Response:
    ctx = _ctx(request)
    study_id, index = _path_int(request, "study_id"), int(request.path_params["index"])

    def _load() -> bytes | None:
        with session_scope(ctx.reads) as s:
            return viewer.heat_png(s, ctx.store, study_id, index)

    data = await run_in_threadpool(_load)
    if data is None:
        raise HTTPException(404, "No such image.")
    return Response(data, media_type="image/png")


# --------------------------------------------------------------------------- audit (admins)
AUDIT_FILTERS = ("since", "until", "study_uid", "accession", "event_type", "actor")


def _audit_filters(request: Request) -> tuple[dict[str, str], list[Any], str]:
    # Control characters (NUL) are dropped: PostgreSQL refuses them in text parameters.
    f = {k: "".join(c for c in request.query_params.get(k, "") if c.isprintable()).strip()[:128]
         for k in AUDIT_FILTERS}
    cond: list[Any] = []
    error = ""
    for key, op in (("since", "ge"), ("until", "le")):
        if f[key]:
            try:
                when = api.parse_since(f[key])
            except api.BadParam:
                error = f"{key}: not a date-time"
                continue
            col = AuditEvent.ts
            cond.append(col >= when if op == "ge" else col <= when)
    if f["study_uid"]:
        cond.append(AuditEvent.study_uid == f["study_uid"])
    if f["accession"]:
        cond.append(AuditEvent.accession == f["accession"])
    if f["event_type"]:
        cond.append(AuditEvent.event_type == f["event_type"])
    if f["actor"]:
        cond.append(AuditEvent.actor == f["actor"])
    return f, cond, error


def _verify(ctx: AppContext) -> dict[str, Any]:
    """The chain's state for the page: the events added since the last verified checkpoint are
    verified (``audit.verify_incremental``), not the whole trail, so a view costs the same with
    ten thousand or a million events."""
    import dataclasses

    with session_scope(ctx.sessions) as s:
        report = audit.verify_incremental(s, max_events=AUDIT_VERIFY_PER_VIEW)
    return dataclasses.asdict(report)


def _audit_rows(ctx: AppContext, cond: list[Any], offset: int) -> tuple[list[AuditEvent], int, bool, list[int]]:
    """One page of events, newest first; the total (exact without filters: ids are gap-free;
    counted up to ``AUDIT_COUNT_CAP`` with filters, ``capped`` then True); and the ids among
    the shown events whose content no longer matches their hash."""
    from sqlalchemy import func

    with session_scope(ctx.reads) as s:
        if cond:
            sub = select(AuditEvent.id).where(*cond).limit(AUDIT_COUNT_CAP + 1).subquery()
            total = int(s.scalar(select(func.count()).select_from(sub)) or 0)
        else:
            total = int(s.scalar(select(func.max(AuditEvent.id))) or 0)
        capped = total > AUDIT_COUNT_CAP
        rows = list(s.scalars(select(AuditEvent).where(*cond).order_by(AuditEvent.id.desc())
                              .limit(AUDIT_PAGE).offset(offset)))
        broken = [ev.id for ev in rows if not audit.row_intact(ev)]
    return rows, min(total, AUDIT_COUNT_CAP) if capped else total, capped, broken


@requires("admin")
async def audit_page(request: Request) -> Response:
    ctx = _ctx(request)
    filters, cond, error = _audit_filters(request)
    try:
        offset = max(0, min(int(request.query_params.get("offset", "0") or 0), 10_000_000))
    except ValueError:
        offset = 0
    rows, total, capped, broken = await run_in_threadpool(_audit_rows, ctx, cond, offset)
    try:
        verification: dict[str, Any] = await run_in_threadpool(_verify, ctx)
    except Exception as exc:  # report, never hide, a verification that cannot run
        log.error("web.audit_verify_failed", error=str(exc))
        verification = {"ok": False, "error": f"verification could not run: {exc}"}
    if broken and verification.get("ok"):
        verification = {"ok": False, "checked": verification.get("checked", 0), "bad_id": broken[-1],
                        "problem": f"event {broken[-1]}: content does not match its hash (edited?)"}
    query = urlencode({k: v for k, v in filters.items() if v})
    return render(request, "audit.html", rows=rows, types=sorted(audit.EVENT_TYPES), filters=filters, error=error,
                  total=total, capped=capped, broken=set(broken), offset=offset, page=AUDIT_PAGE, query=query,
                  verification=verification)


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with ``= + - @``, tab or CR gets a
    leading ``'`` (OWASP CSV injection). Numbers stay numbers."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_START):
        return "'" + value
    return value


@requires("admin")
async def audit_csv(request: Request) -> Response:
    ctx = _ctx(request)
    filters, cond, error = _audit_filters(request)
    if error:
        return PlainTextResponse(error, status_code=400)
    user = request.state.user

    def _export() -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "ts", "event_type", "actor", "study_uid", "series_uid", "accession", "outcome",
                    "details", "prev_hash", "hash"])
        with session_scope(ctx.sessions) as s:
            n = 0
            for ev in s.scalars(select(AuditEvent).where(*cond).order_by(AuditEvent.id).limit(AUDIT_CSV_MAX)):
                w.writerow([csv_cell(v) for v in (
                    ev.id, q.iso(ev.ts), ev.event_type, ev.actor, ev.study_uid, ev.series_uid, ev.accession,
                    ev.outcome, strip_userinfo(json.dumps(ev.details or {}, sort_keys=True)), ev.prev_hash, ev.hash)])
                n += 1
            audit_record(s, EV_AUDIT_EXPORT, actor=user.username,
                         details={"export": "audit.csv", "filters": {k: v for k, v in filters.items() if v}, "rows": n})
        return buf.getvalue()

    body = await run_in_threadpool(_export)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Response(body, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.csv"'})


# --------------------------------------------------------------------------- operations (admins)
def _ops(ctx: AppContext) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    counts: dict[tuple[str, str], int]
    try:
        counts = dict(ctx.queue.counts())
    except Exception as exc:  # the queue module may be unavailable; the page still shows the rest
        log.error("web.queue_counts_failed", error=str(exc))
        counts = {}
    kinds = sorted({k for k, _ in counts})
    states = [JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.DEAD, JobState.DONE]
    states += sorted({st for _, st in counts} - set(states))
    with session_scope(ctx.sessions) as s:
        out = {
            "counts": counts, "kinds": kinds, "states": states,
            "workers": q.workers(s, now),
            "dead": q.dead_jobs(s),
            "destinations": q.destinations(s, [str(d) for d in ctx.settings.destinations]),
            "models": q.model_versions(s),
            "quality_7d": q.quality(s, now - dt.timedelta(days=7)),
            "quality_all": q.quality(s),
            "reasons_7d": q.verdict_reasons(s, now - dt.timedelta(days=7)),
        }
    out["disk"] = q.disk_usage(ctx.settings.store_dir if ctx.settings.store_dir.exists()
                               else ctx.settings.resolved_data_dir.parent)
    out["disk_floor"] = ctx.settings.disk_floor_mb * 1024 * 1024
    out["heartbeat_limit"] = readiness_heartbeat_limit(ctx)
    return out


#: The notices ``/ops?msg=CODE&job=N`` can show: fixed texts, never text from the URL.
OPS_MESSAGES = {"retried": "Job {job} queued again.", "not_dead": "Job {job} is not dead-lettered."}


def _notice(request: Request, messages: dict[str, str]) -> str:
    """The fixed notice named by ``msg`` (its only parameter, ``job``, must be a number)."""
    template = messages.get(request.query_params.get("msg", ""))
    job = request.query_params.get("job", "")
    if template is None or ("{job}" in template and not (job.isdigit() and len(job) <= 10)):
        return ""
    return template.format(job=job)


@requires("admin")
async def ops_page(request: Request) -> Response:
    data = await run_in_threadpool(_ops, _ctx(request))
    return render(request, "ops.html", ops=data, message=_notice(request, OPS_MESSAGES))


@requires("admin")
async def retry_job(request: Request) -> Response:
    ctx = _ctx(request)
    job_id = _path_int(request, "job_id")
    user = request.state.user

    def _retry() -> str:
        # retry_dead re-queues and audits "job_retried" with the admin as actor, in one transaction.
        return "retried" if ctx.queue.retry_dead(job_id, actor=user.username) else "not_dead"

    code = await run_in_threadpool(_retry)
    return RedirectResponse("/ops?" + urlencode({"msg": code, "job": job_id}), status_code=303)


# --------------------------------------------------------------------------- users (admins)
#: The notices ``/users?msg=CODE`` can show (fixed texts).
USER_MESSAGES = {
    "created": "User created.", "disabled": "User disabled; its sessions ended.", "enabled": "User enabled.",
    "unlocked": "Login waits cleared.", "password": "Password reset; the user's sessions ended.",
    "role": "Role changed; the user's sessions ended.", "tokens": "API token revoked.",
    "sessions": "Sessions ended.", "self": "You cannot disable yourself or change your own role.",
}
USER_ACTIONS = ("disable", "enable", "unlock", "password", "role", "revoke-tokens", "revoke-sessions")


def _users(ctx: AppContext) -> list[dict[str, Any]]:
    with session_scope(ctx.sessions) as s:
        return web_users.list_users(s)


@requires("admin")
async def users_page(request: Request) -> Response:
    rows = await run_in_threadpool(_users, _ctx(request))
    return render(request, "users.html", users=rows, roles=ROLES, message=_notice(request, USER_MESSAGES),
                  error="")


def _change_user(ctx: AppContext, actor: str, action: str, user_id: int, form: dict[str, str]) -> str:
    """Apply one admin action (audited in the same transaction); return the notice code."""
    with session_scope(ctx.sessions) as s:
        target = s.get(User, user_id) if action != "add" else None
        if action != "add" and target is None:
            raise web_users.UserError("no such user")
        username = target.username if target is not None else ""
        if action == "add":
            web_users.create_user(s, form.get("username", ""), form.get("password", ""),
                                  form.get("role", "radiologist"), actor=actor)
            return "created"
        if action == "disable":
            web_users.set_active(s, username, False, actor=actor)
            return "disabled"
        if action == "enable":
            web_users.set_active(s, username, True, actor=actor)
            return "enabled"
        if action == "unlock":
            web_users.unlock_user(s, username, actor=actor)
            return "unlocked"
        if action == "password":
            web_users.reset_password(s, username, form.get("password", ""), actor=actor)
            return "password"
        if action == "role":
            web_users.set_role(s, username, form.get("role", ""), actor=actor)
            return "role"
        if action == "revoke-tokens":
            web_users.revoke_tokens(s, username, actor=actor)
            return "tokens"
        web_users.revoke_user_sessions(s, username, actor=actor)
        return "sessions"


@requires("admin")
async def users_change(request: Request) -> Response:
    """POST /users (add) and /users/{user_id}/{action}: every change is audited."""
    user = request.state.user
    action = request.path_params.get("action", "add")
    user_id = _path_int(request, "user_id") if action != "add" else 0
    if action != "add" and action not in USER_ACTIONS:
        raise HTTPException(404)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if user_id == user.id and action in ("disable", "role"):
        return RedirectResponse("/users?msg=self", status_code=303)
    try:
        code = await run_in_threadpool(_change_user, _ctx(request), user.username, action, user_id, form)
    except web_users.UserError as exc:
        rows = await run_in_threadpool(_users, _ctx(request))
        return render(request, "users.html", status_code=400, users=rows, roles=ROLES, message="", error=str(exc))
    return RedirectResponse(f"/users?msg={code}", status_code=303)


# --------------------------------------------------------------------------- health and metrics
#: Roles whose own work writes to the file store: for them the disk floor is part of readiness.
STORE_WRITER_ROLES = ("serve", "receiver", "worker")


def readiness_heartbeat_limit(ctx: AppContext) -> float:
    """A worker heartbeat older than this (seconds) counts as stale (operations page, /readyz detail)."""
    return max(60.0, 3 * ctx.settings.heartbeat_seconds)


@functools.lru_cache(maxsize=1)
def _head_revision() -> str | None:
    from storage.migrate import head_revision

    return head_revision()


def readiness(ctx: AppContext, components: dict[str, Any] | None = None) -> tuple[bool, dict[str, Any]]:
    """Whether this process can serve its role, with the checks behind the answer.

    Required: the database answers, its schema is at the head migration, and this process's own
    components (``components``: name -> callable, e.g. the worker threads of ``serve``) are up;
    the disk floor too for the roles that write the store. Reported but not required: whether any
    worker anywhere has a fresh heartbeat (``worker``): web pods run apart from the workers, and a
    stopped worker must not take the worklist out of service (it shows on the operations page).
    """
    checks: dict[str, Any] = {}
    db_ok = False
    try:
        from alembic.runtime.migration import MigrationContext

        with ctx.engine.execution_options(**{READ_ONLY: True}).connect() as conn:  # probes never wait for writers
            conn.execute(text("select 1"))
            db_ok = True
            current = MigrationContext.configure(conn).get_current_revision()
        checks["database"] = {"ok": True, "required": True}
        head = _head_revision()
        checks["migrations"] = {"ok": current == head, "required": True, "current": current, "head": head}
    except Exception as exc:
        checks["database"] = {"ok": db_ok, "required": True, "error": type(exc).__name__}
        checks["migrations"] = {"ok": False, "required": True, "error": "database unreachable" if not db_ok
                                else type(exc).__name__}
    try:
        free = int(ctx.store.free_bytes())
        floor = ctx.settings.disk_floor_mb * 1024 * 1024
        checks["disk"] = {"ok": not ctx.store.below_floor(), "required": ctx.role in STORE_WRITER_ROLES,
                          "free_bytes": free, "floor_bytes": floor}
    except Exception as exc:
        checks["disk"] = {"ok": False, "required": ctx.role in STORE_WRITER_ROLES, "error": type(exc).__name__}
    for name, alive in (components or {}).items():
        try:
            up = bool(alive())
        except Exception:
            up = False
        checks[f"component:{name}"] = {"ok": up, "required": True}
    if db_ok:
        limit = readiness_heartbeat_limit(ctx)
        try:
            with session_scope(ctx.reads) as s:
                newest = s.scalar(select(Worker.heartbeat_at).where(Worker.role.in_(("worker", "serve")))
                                  .order_by(Worker.heartbeat_at.desc()).limit(1))
            age = (dt.datetime.now(dt.UTC) - newest).total_seconds() if newest else None
            checks["worker"] = {"ok": age is not None and age <= limit, "required": False,
                                "heartbeat_age_s": round(age, 1) if age is not None else None, "limit_s": limit}
        except Exception as exc:
            checks["worker"] = {"ok": False, "required": False, "error": type(exc).__name__}
    else:
        checks["worker"] = {"ok": False, "required": False, "error": "database unreachable"}
    return all(c["ok"] for c in checks.values() if c["required"]), checks


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "version": __version__})


async def readyz(request: Request) -> Response:
    ctx = _ctx(request)
    ok, checks = await run_in_threadpool(readiness, ctx, getattr(request.app.state, "components", None))
    return JSONResponse({"ready": ok, "role": ctx.role, "checks": checks}, status_code=200 if ok else 503)


async def metrics_endpoint(request: Request) -> Response:
    body = await run_in_threadpool(metrics.render, request.app.state.registry)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


# --------------------------------------------------------------------------- errors
async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith(("/api/", "/dicomweb/")) or exc.status_code == 405:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    user = getattr(request.state, "user", None)
    if user is None:
        try:
            user = await run_in_threadpool(resolve_user, _ctx(request), request)
        except Exception:
            user = None
    return render(request, "error.html", status_code=exc.status_code, user=user, status=exc.status_code,
                  message=exc.detail)


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("web.unhandled", path=request.url.path, error=repr(exc))
    if request.url.path.startswith(("/api/", "/dicomweb/")):
        return JSONResponse({"error": "internal error"}, status_code=500)
    return PlainTextResponse("Internal error. The event was logged.", status_code=500)


# --------------------------------------------------------------------------- app
def create_app(ctx: AppContext, components: dict[str, Any] | None = None) -> Starlette:
    """The ASGI application for ``ctx`` (database must be migrated).

    ``components``: this process's other parts (name -> callable returning True while up), part
    of ``/readyz`` (e.g. the worker threads of ``triage serve``).
    """
    routes = [
        Route("/", worklist_page, methods=["GET"]),
        Route("/worklist/rows", worklist_rows, methods=["GET"]),
        Route("/alerts", alerts, methods=["GET"]),
        Route("/login", login_page, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/studies/{study_id}", study_page, methods=["GET"]),
        Route("/studies/{study_id}/feedback", feedback, methods=["POST"]),
        Route("/studies/{study_id}/preview/{index:int}/{kind:str}", preview_image, methods=["GET"]),
        Route("/studies/{study_id}/viewer.json", viewer_manifest, methods=["GET"]),
        Route("/studies/{study_id}/viewer/slice/{instance_id}", viewer_slice, methods=["GET"]),
        Route("/studies/{study_id}/viewer/overlay/{instance_id}", viewer_overlay, methods=["GET"]),
        Route("/studies/{study_id}/viewer/heat/{index:int}", viewer_heat, methods=["GET"]),
        Route("/audit", audit_page, methods=["GET"]),
        Route("/audit.csv", audit_csv, methods=["GET"]),
        Route("/ops", ops_page, methods=["GET"]),
        Route("/ops/jobs/{job_id}/retry", retry_job, methods=["POST"]),
        Route("/users", users_page, methods=["GET"]),
        Route("/users", users_change, methods=["POST"]),
        Route("/users/{user_id}/{action}", users_change, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *api.routes,
        *dicomweb.routes,
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    s = ctx.settings
    middleware = [
        Middleware(DicomwebCORS, origins=list(s.dicomweb_cors_origins)),
        Middleware(SecurityHeaders, hsts_seconds=s.hsts_seconds, https_only=s.session_https_only),
        Middleware(SessionMiddleware, secret_key=session_secret(ctx), session_cookie=SESSION_COOKIE,
                   max_age=SESSION_MAX_AGE, same_site="lax", https_only=s.session_https_only),
    ]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.ctx = ctx
    app.state.components = dict(components or {})
    app.state.templates = make_templates(getattr(ctx.settings, "bundle_path", None))
    app.state.registry = metrics.make_registry(ctx)
    return app


def run_web(ctx: AppContext, host: str | None = None, port: int | None = None,
            stop_event: threading.Event | None = None, components: dict[str, Any] | None = None) -> None:
    """Serve the web node with uvicorn (blocking) until interrupted or ``stop_event`` is set."""
    import uvicorn

    host = host or ctx.settings.web_host
    port = port or ctx.settings.web_port
    log.info("web.start", host=host, port=port)
    config = uvicorn.Config(create_app(ctx, components), host=host, port=port, log_level="warning", access_log=False,
                            server_header=False)
    server = uvicorn.Server(config)
    if stop_event is not None:
        def _watch() -> None:
            stop_event.wait()
            server.should_exit = True

        threading.Thread(target=_watch, name="web-stop", daemon=True).start()
    server.run()
