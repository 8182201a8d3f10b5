"""REST API ``/api/v1``: studies, results and findings as JSON, plus its OpenAPI 3.1 description.

Authentication: ``Authorization: Bearer <token>`` (``triage user token``) or a logged-in
browser session. Patient name and ID are masked unless the user is an admin.

Every answer that carries study identifiers (patient, accession, study UID) is audited as the
study page is: an event ``viewed`` with ``details.api`` (the path), ``details.phi`` (whether
full patient identifiers were returned) and the studies concerned.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy import Select, exists, func, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reports.web import queries as q
from reports.web.auth import CurrentUser, audit_reads, requires
from storage.db import session_scope
from storage.models import Finding, Result, Study
from triage import __version__
from triage.context import AppContext
from triage.labels import LABELS

MAX_LIMIT = 500
# C0/C1 control characters are refused in text parameters (PostgreSQL refuses NUL outright).
NO_CONTROL_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"
CONTROL_CHARS = re.compile(r"[\u0000-\u001f\u007f-\u009f]")
DEFAULT_LIMIT = 100


class BadParam(ValueError):
    """A query parameter that cannot be used (answered with 400)."""


# --------------------------------------------------------------------------- parameters
def _bool(value: str | None, name: str) -> bool | None:
    if value is None or value == "":
        return None
    low = value.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise BadParam(f"{name} must be true or false")


def _int(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError as exc:
        raise BadParam(f"{name} must be an integer") from exc
    if not lo <= n <= hi:
        raise BadParam(f"{name} must be between {lo} and {hi}")
    return n


def parse_since(value: str | None) -> dt.datetime | None:
    """ISO 8601 date or date-time; a value without offset is taken as UTC."""
    if value is None or value == "":
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadParam("since must be an ISO 8601 date-time, e.g. 2026-11-23T08:00:00Z") from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _choice(value: str | None, name: str, choices: tuple[str, ...]) -> str | None:
    if value is None or value == "":
        return None
    if value not in choices:
        raise BadParam(f"{name} must be one of {', '.join(choices)}")
    return value


def _page(request: Request) -> tuple[int, int]:
    p = request.query_params
    return (_int(p.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
            _int(p.get("offset"), "offset", 0, 0, 10_000_000))


def _accession(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > 64:
        raise BadParam("accession is at most 64 characters")
    if CONTROL_CHARS.search(value):
        raise BadParam("accession contains control characters")
    return value


# --------------------------------------------------------------------------- audit of reads
# --------------------------------------------------------------------------- queries
def _label_present(label: str) -> Any:
    return exists().where(
        Result.study_id == Study.id, Result.superseded.is_(False),
        Finding.result_id == Result.id, Finding.label == label, Finding.present.is_(True),
    )


def list_studies(ctx: AppContext, params: dict[str, str], user: CurrentUser) -> dict[str, Any]:
    flagged = _bool(params.get("flagged"), "flagged")
    status = _choice(params.get("status"), "status", q.STATUSES)
    since = parse_since(params.get("since"))
    accession = _accession(params.get("accession"))
    label = _choice(params.get("label"), "label", LABELS)
    limit = _int(params.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _int(params.get("offset"), "offset", 0, 0, 10_000_000)
    stmt: Select[Any] = select(Study).where(Study.purged_at.is_(None))
    if flagged is not None:
        stmt = stmt.where(Study.flagged.is_(flagged))
    if status:
        stmt = stmt.where(Study.status == status)
    if since:
        stmt = stmt.where(Study.first_received_at >= since)
    if accession:
        stmt = stmt.where(Study.accession == accession)
    if label:
        stmt = stmt.where(_label_present(label))
    with session_scope(ctx.sessions) as s:
        total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
        studies = s.scalars(stmt.order_by(Study.flagged.desc(), Study.first_received_at.desc(), Study.id.desc())
                            .limit(limit).offset(offset)).all()
        results = q.latest_results(s, [st.id for st in studies])
        fnd = q.findings_of(s, [r.id for r in results.values()])
        items = []
        for st in studies:
            r = results.get(st.id)
            items.append(q.study_row(st, r, fnd.get(r.id, {}) if r else {}, user.sees_phi))
        audit_reads(s, user, "/api/v1/studies", list(studies), user.sees_phi)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def result_dict(r: Result, study: Study, findings: dict[str, Finding]) -> dict[str, Any]:
    return {
        "id": r.id,
        "study_id": r.study_id,
        "study_uid": study.study_uid,
        "accession": study.accession,
        "series_id": r.series_id,
        "generation": r.generation,
        "positive": bool(r.positive),
        "superseded": bool(r.superseded),
        "total_volume_ml": round(float(r.total_volume_ml), 2),
        "abc2_ml": round(float(r.abc2_ml), 2),
        "device": r.device,
        "created_at": q.iso(r.created_at),
        "timings": {k: float(v) for k, v in (r.timings or {}).items()
                    if isinstance(v, int | float) and not isinstance(v, bool)},
        "findings": q.ordered_findings(findings),
        "input_domain": r.input_domain,
    }


def _filtered_page(stmt: Select[Any], params: dict[str, str]) -> tuple[Select[Any], int, int]:
    """Apply the filters every list shares (``since``, ``study_id``, ``accession``) to a query
    joining Result and Study; return it with the page's ``limit`` and ``offset``."""
    since = parse_since(params.get("since"))
    study_id = _int(params.get("study_id"), "study_id", 0, 0, 2**31 - 1) or None
    accession = _accession(params.get("accession"))
    limit = _int(params.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _int(params.get("offset"), "offset", 0, 0, 10_000_000)
    if since:
        stmt = stmt.where(Result.created_at >= since)
    if study_id:
        stmt = stmt.where(Result.study_id == study_id)
    if accession:
        stmt = stmt.where(Study.accession == accession)
    return stmt, limit, offset


def list_results(ctx: AppContext, params: dict[str, str], user: CurrentUser) -> dict[str, Any]:
    positive = _bool(params.get("positive"), "positive")
    include_superseded = bool(_bool(params.get("include_superseded"), "include_superseded"))
    stmt, limit, offset = _filtered_page(select(Result, Study).join(Study, Study.id == Result.study_id), params)
    if not include_superseded:
        stmt = stmt.where(Result.superseded.is_(False))
    if positive is not None:
        stmt = stmt.where(Result.positive.is_(positive))
    with session_scope(ctx.sessions) as s:
        total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
        rows = s.execute(stmt.order_by(Result.created_at.desc(), Result.id.desc()).limit(limit).offset(offset)).all()
        fnd = q.findings_of(s, [r.id for r, _ in rows])
        items = [result_dict(r, st, fnd.get(r.id, {})) for r, st in rows]
        audit_reads(s, user, "/api/v1/results", list({st.id: st for _, st in rows}.values()), False)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def list_findings(ctx: AppContext, params: dict[str, str], user: CurrentUser) -> dict[str, Any]:
    label = _choice(params.get("label"), "label", LABELS)
    present = _bool(params.get("present"), "present")
    stmt, limit, offset = _filtered_page(
        select(Finding, Result, Study).join(Result, Result.id == Finding.result_id)
        .join(Study, Study.id == Result.study_id).where(Result.superseded.is_(False)), params)
    if label:
        stmt = stmt.where(Finding.label == label)
    if present is not None:
        stmt = stmt.where(Finding.present.is_(present))
    with session_scope(ctx.sessions) as s:
        total = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
        rows = s.execute(stmt.order_by(Result.created_at.desc(), Finding.id).limit(limit).offset(offset)).all()
        items = [
            {**q.finding_dict(f), "result_id": r.id, "study_id": st.id, "study_uid": st.study_uid,
             "accession": st.accession, "created_at": q.iso(r.created_at)}
            for f, r, st in rows
        ]
        audit_reads(s, user, "/api/v1/findings", list({st.id: st for _, _, st in rows}.values()), False)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def get_study(ctx: AppContext, study_id: int, user: CurrentUser) -> dict[str, Any] | None:
    with session_scope(ctx.sessions) as s:
        d = q.study_detail(s, study_id, user.sees_phi)
        study = s.get(Study, study_id) if d is not None else None
        if study is not None:
            audit_reads(s, user, "/api/v1/studies/{id}", [study], user.sees_phi)
    if d is None:
        return None
    keep = set(STUDY_SCHEMA["properties"])
    return {k: v for k, v in d.items() if k in keep}


def get_result(ctx: AppContext, result_id: int, user: CurrentUser) -> dict[str, Any] | None:
    with session_scope(ctx.sessions) as s:
        r = s.get(Result, result_id)
        if r is None:
            return None
        st = s.get(Study, r.study_id)
        assert st is not None
        out = result_dict(r, st, q.findings_of(s, [r.id]).get(r.id, {}))
        audit_reads(s, user, "/api/v1/results/{id}", [st], False)
        return out


# --------------------------------------------------------------------------- endpoints
def _id(request: Request, name: str) -> int | None:
    try:
        value = int(request.path_params[name])
    except (KeyError, ValueError):
        return None
    return value if 0 < value < 2**31 else None


def _bad(exc: BadParam) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


def _not_found(what: str) -> JSONResponse:
    return JSONResponse({"error": f"{what} not found"}, status_code=404)


@requires()
async def studies_endpoint(request: Request) -> Response:
    try:
        body = await run_in_threadpool(list_studies, request.app.state.ctx, dict(request.query_params),
                                       request.state.user)
    except BadParam as exc:
        return _bad(exc)
    return JSONResponse(body)


@requires()
async def study_endpoint(request: Request) -> Response:
    sid = _id(request, "study_id")
    body = await run_in_threadpool(get_study, request.app.state.ctx, sid, request.state.user) if sid else None
    return JSONResponse(body) if body is not None else _not_found("study")


@requires()
async def results_endpoint(request: Request) -> Response:
    try:
        body = await run_in_threadpool(list_results, request.app.state.ctx, dict(request.query_params),
                                       request.state.user)
    except BadParam as exc:
        return _bad(exc)
    return JSONResponse(body)


@requires()
async def result_endpoint(request: Request) -> Response:
    rid = _id(request, "result_id")
    body = await run_in_threadpool(get_result, request.app.state.ctx, rid, request.state.user) if rid else None
    return JSONResponse(body) if body is not None else _not_found("result")


@requires()
async def findings_endpoint(request: Request) -> Response:
    try:
        body = await run_in_threadpool(list_findings, request.app.state.ctx, dict(request.query_params),
                                       request.state.user)
    except BadParam as exc:
        return _bad(exc)
    return JSONResponse(body)


async def openapi_endpoint(request: Request) -> Response:
    return JSONResponse(openapi_schema())


routes = [
    Route("/api/v1/openapi.json", openapi_endpoint, methods=["GET"]),
    Route("/api/v1/studies", studies_endpoint, methods=["GET"]),
    Route("/api/v1/studies/{study_id}", study_endpoint, methods=["GET"]),
    Route("/api/v1/results", results_endpoint, methods=["GET"]),
    Route("/api/v1/results/{result_id}", result_endpoint, methods=["GET"]),
    Route("/api/v1/findings", findings_endpoint, methods=["GET"]),
]


# --------------------------------------------------------------------------- OpenAPI
def _nullable(t: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(t, str):
        return {"type": [t, "null"]}
    return {"anyOf": [t, {"type": "null"}]}


_DT = {"type": "string", "format": "date-time"}
FINDING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["label", "name", "short", "probability", "threshold", "present", "volume_ml", "abc2_ml", "key_slice"],
    "properties": {
        "label": {"type": "string", "description": "any, epidural, intraparenchymal, intraventricular, "
                                                  "subarachnoid or subdural"},
        "name": {"type": "string"},
        "short": {"type": "string"},
        "probability": {"type": "number", "minimum": 0, "maximum": 1},
        "threshold": {"type": "number"},
        "present": {"type": "boolean"},
        "volume_ml": {"type": "number", "description": "Segmented volume (voxel count x voxel volume)"},
        "abc2_ml": {"type": "number", "description": "ABC/2 estimate of the largest component"},
        "key_slice": _nullable("integer"),
    },
}
STUDY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "study_uid", "accession", "patient", "patient_masked", "status", "status_reason", "flagged",
                 "priority", "received_at", "result_at", "time_to_result_s", "result_id", "findings"],
    "properties": {
        "id": {"type": "integer"},
        "study_uid": {"type": "string"},
        "accession": {"type": "string"},
        "patient": {"type": "string", "description": "Masked (initials and last 2 ID characters) unless admin"},
        "patient_masked": {"type": "boolean"},
        "description": {"type": "string"},
        "study_date": {"type": "string"},
        "study_when": {"type": "string", "description": "Study date and time from the header, e.g. 2026-01-02 03:15"},
        "age": {"type": "string", "description": "Age at the study from the birth date, e.g. '76 y' or '8 mo'"},
        "sex": {"type": "string", "enum": ["F", "M", "O", ""]},
        "status": {"type": "string", "enum": list(q.STATUSES)},
        "status_reason": {"type": "string"},
        "priority": {"type": "integer"},
        "stat": {"type": "boolean"},
        "flagged": {"type": "boolean"},
        "received_at": _DT,
        "last_received_at": _DT,
        "result_at": _nullable(_DT),
        "time_to_result_s": _nullable("number"),
        "result_id": _nullable("integer"),
        "positive": _nullable("boolean"),
        "total_volume_ml": _nullable("number"),
        "abc2_ml": _nullable("number"),
        "findings": {"type": "array", "items": {"$ref": "#/components/schemas/Finding"}},
        "feedback": _nullable({"type": "object"}),
        "input_domain": {"$ref": "#/components/schemas/InputDomain"},
        "model": _nullable({"type": "object", "properties": {"name": {"type": "string"},
                                                              "version": {"type": "string"},
                                                              "sha256": {"type": "string"}}}),
        "series": {"type": "array", "items": {"type": "object"}},
        "deliveries": {"type": "array", "items": {"type": "object"}},
        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}
RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "study_id", "study_uid", "accession", "series_id", "generation", "positive", "superseded",
                 "total_volume_ml", "abc2_ml", "created_at", "timings", "findings"],
    "properties": {
        "id": {"type": "integer"},
        "study_id": {"type": "integer"},
        "study_uid": {"type": "string"},
        "accession": {"type": "string"},
        "series_id": {"type": "integer"},
        "generation": {"type": "integer"},
        "positive": {"type": "boolean"},
        "superseded": {"type": "boolean"},
        "total_volume_ml": {"type": "number"},
        "abc2_ml": {"type": "number"},
        "device": {"type": "string"},
        "created_at": _DT,
        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
        "findings": {"type": "array", "items": {"$ref": "#/components/schemas/Finding"}},
        "input_domain": {"$ref": "#/components/schemas/InputDomain"},
    },
}
INPUT_DOMAIN_SCHEMA: dict[str, Any] = _nullable({
    "type": "object",
    "description": "The bundle's input-domain check: in_domain false means the series is unlike the studies "
                   "the model was trained on, so its result must not be relied on. Null when the bundle has no check.",
    "required": ["distance", "threshold", "in_domain"],
    "properties": {"distance": {"type": "number", "minimum": 0}, "threshold": {"type": "number"},
                   "in_domain": {"type": "boolean"}},
})
FINDING_ROW_SCHEMA: dict[str, Any] = {
    "allOf": [
        {"$ref": "#/components/schemas/Finding"},
        {"type": "object", "required": ["result_id", "study_id", "study_uid", "accession", "created_at"],
         "properties": {"result_id": {"type": "integer"}, "study_id": {"type": "integer"},
                        "study_uid": {"type": "string"}, "accession": {"type": "string"}, "created_at": _DT}},
    ]
}


def _page_of(ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "total", "limit", "offset"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}},
            "total": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
        },
    }


def _param(name: str, schema: dict[str, Any], description: str, where: str = "query") -> dict[str, Any]:
    p = {"name": name, "in": where, "schema": schema, "description": description}
    if where == "path":
        p["required"] = True
    return p


_BOOL = {"type": "boolean"}
_P_SINCE = _param("since", {"type": "string", "format": "date-time"}, "Only items at or after this time (ISO 8601)")
_P_ACC = _param("accession", {"type": "string", "maxLength": 64, "pattern": NO_CONTROL_PATTERN},
                "Exact accession number")
_P_LIMIT = _param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
                  "Page size")
_P_OFFSET = _param("offset", {"type": "integer", "minimum": 0, "maximum": 10_000_000, "default": 0}, "Items to skip")
_P_LABEL = _param("label", {"type": "string", "enum": list(LABELS)}, "Hemorrhage label")
_P_STUDY = _param("study_id", {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}, "Study id")


def _responses(ok_ref: str, *, not_found: bool = False) -> dict[str, Any]:
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    out: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": ok_ref}}}},
        "400": {"description": "Invalid parameter", **err},
        "401": {"description": "Authentication required", **err},
        "403": {"description": "Forbidden", **err},
    }
    if not_found:
        out["404"] = {"description": "Not found", **err}
    return out


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``/api/v1`` (hand-written; a test validates it and the responses)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ICH triage node API",
            "version": __version__,
            "description": "Studies, results and findings of the intracranial hemorrhage triage node. "
                           "Results come from a research model (its model card says what it was trained on): "
                           "not for clinical use.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/studies": {"get": {
                "operationId": "listStudies", "summary": "Studies, flagged first then newest first",
                "parameters": [
                    _param("flagged", _BOOL, "Only flagged (true) or unflagged (false) studies"),
                    _param("status", {"type": "string", "enum": list(q.STATUSES)}, "Study status"),
                    _P_SINCE, _P_ACC,
                    {**_P_LABEL, "description": "Only studies with this label present in a current result"},
                    _P_LIMIT, _P_OFFSET,
                ],
                "responses": _responses("#/components/schemas/StudyPage"),
            }},
            "/api/v1/studies/{study_id}": {"get": {
                "operationId": "getStudy", "summary": "One study with its current result and deliveries",
                "parameters": [{**_P_STUDY, "in": "path", "required": True}],
                "responses": _responses("#/components/schemas/Study", not_found=True),
            }},
            "/api/v1/results": {"get": {
                "operationId": "listResults", "summary": "Inference results, newest first",
                "parameters": [
                    _param("positive", _BOOL, "Only positive (true) or negative (false) results"),
                    _P_SINCE, _P_STUDY, _P_ACC,
                    _param("include_superseded", _BOOL, "Also list results replaced by a newer generation"),
                    _P_LIMIT, _P_OFFSET,
                ],
                "responses": _responses("#/components/schemas/ResultPage"),
            }},
            "/api/v1/results/{result_id}": {"get": {
                "operationId": "getResult", "summary": "One result with its findings",
                "parameters": [_param("result_id", {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                                      "Result id", "path")],
                "responses": _responses("#/components/schemas/Result", not_found=True),
            }},
            "/api/v1/findings": {"get": {
                "operationId": "listFindings", "summary": "Per-label findings of current results",
                "parameters": [_P_LABEL, _param("present", _BOOL, "Only present (true) or absent (false)"),
                               _P_SINCE, _P_STUDY, _P_ACC, _P_LIMIT, _P_OFFSET],
                "responses": _responses("#/components/schemas/FindingPage"),
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Token from `triage user token USER`"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "Finding": FINDING_SCHEMA,
                "FindingRow": FINDING_ROW_SCHEMA,
                "Study": STUDY_SCHEMA,
                "Result": RESULT_SCHEMA,
                "InputDomain": INPUT_DOMAIN_SCHEMA,
                "StudyPage": _page_of("Study"),
                "ResultPage": _page_of("Result"),
                "FindingPage": _page_of("FindingRow"),
            },
        },
    }
