"""REST API: OpenAPI document validity, responses validated against it, filters, auth, fuzzing.

Runs against the app served by uvicorn on a free port (real HTTP).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from openapi_spec_validator import validate as validate_openapi

from reports.web.api import openapi_schema
from tests.web_support import add_user, live_server, seed_study
from triage.context import AppContext


def validator_for(spec: dict[str, Any], component: str) -> Draft202012Validator:
    """A JSON Schema validator for one component of the OpenAPI document (refs resolve in it)."""
    return Draft202012Validator({**spec, "$ref": f"#/components/schemas/{component}"},
                                format_checker=FormatChecker())


@pytest.fixture
def api(ctx: AppContext) -> Iterator[dict[str, Any]]:
    admin = add_user(ctx, "alice", "admin", token=True)
    rad = add_user(ctx, "rad", "radiologist", token=True)
    seeded = {
        "flag": seed_study(ctx, accession="API-FLAG", flagged=True, received_ago_s=3000,
                           probabilities={"any": 0.95, "subdural": 0.91, "subarachnoid": 0.2}),
        "neg": seed_study(ctx, accession="API-NEG", received_ago_s=100),
        "skip": seed_study(ctx, accession="API-SKIP", status="skipped", status_reason="localizer", received_ago_s=50),
    }
    with live_server(ctx) as base:
        yield {"base": base, "admin": admin, "rad": rad, "seeded": seeded, "ctx": ctx}


def get(api: dict[str, Any], path: str, who: str = "rad", **params: Any) -> httpx.Response:
    return httpx.get(api["base"] + path, params=params, headers={"Authorization": f"Bearer {api[who]}"}, timeout=30)


def test_openapi_document_is_valid() -> None:
    validate_openapi(openapi_schema())


def test_responses_match_schema_and_filters(api: dict[str, Any]) -> None:
    spec = httpx.get(api["base"] + "/api/v1/openapi.json", timeout=30).json()
    assert spec == openapi_schema()
    study_page, result_page = validator_for(spec, "StudyPage"), validator_for(spec, "ResultPage")
    finding_page, study_v, result_v = validator_for(spec, "FindingPage"), validator_for(spec, "Study"), \
        validator_for(spec, "Result")
    error_v = validator_for(spec, "Error")

    r = get(api, "/api/v1/studies")
    assert r.status_code == 200
    study_page.validate(r.json())
    items = r.json()["items"]
    assert [s["accession"] for s in items] == ["API-FLAG", "API-SKIP", "API-NEG"]
    assert items[0]["patient"] == "J.D. …42" and items[0]["patient_masked"] is True
    admin_items = get(api, "/api/v1/studies", who="admin").json()["items"]
    assert admin_items[0]["patient"] == "DOE JANE (PID0042)" and admin_items[0]["patient_masked"] is False

    def accessions(**params: Any) -> list[str]:
        resp = get(api, "/api/v1/studies", **params)
        assert resp.status_code == 200, resp.text
        study_page.validate(resp.json())
        return [s["accession"] for s in resp.json()["items"]]

    assert accessions(flagged="true") == ["API-FLAG"]
    assert accessions(flagged="false") == ["API-SKIP", "API-NEG"]
    assert accessions(status="skipped") == ["API-SKIP"]
    assert accessions(label="subdural") == ["API-FLAG"]
    assert accessions(label="epidural") == []
    assert accessions(accession="API-NEG") == ["API-NEG"]
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1000)).isoformat()
    assert accessions(since=since) == ["API-SKIP", "API-NEG"]
    assert accessions(limit=1, offset=1) == ["API-SKIP"]

    sid = api["seeded"]["flag"].study_id
    r = get(api, f"/api/v1/studies/{sid}")
    assert r.status_code == 200
    study_v.validate(r.json())
    assert {f["label"]: f["present"] for f in r.json()["findings"]}["subdural"] is True

    r = get(api, "/api/v1/results", positive="true")
    result_page.validate(r.json())
    assert [x["accession"] for x in r.json()["items"]] == ["API-FLAG"]
    rid = api["seeded"]["flag"].result_id
    r = get(api, f"/api/v1/results/{rid}")
    result_v.validate(r.json())
    assert r.json()["timings"]["predict"] == pytest.approx(3.2)

    r = get(api, "/api/v1/findings", label="subdural", present="true")
    finding_page.validate(r.json())
    assert [(f["accession"], f["probability"]) for f in r.json()["items"]] == [("API-FLAG", 0.91)]
    r = get(api, "/api/v1/findings", study_id=sid)
    assert len(r.json()["items"]) == 6

    for path, params in (("/api/v1/studies", {"flagged": "maybe"}), ("/api/v1/studies", {"since": "yesterday"}),
                         ("/api/v1/studies", {"label": "nonsense"}), ("/api/v1/results", {"limit": "0"}),
                         ("/api/v1/findings", {"offset": "-1"}),
                         ("/api/v1/studies", {"accession": "A\x00B"})):
        r = get(api, path, **params)
        assert r.status_code == 400, (path, params)
        error_v.validate(r.json())
    r = get(api, "/api/v1/studies/999999")
    assert r.status_code == 404
    error_v.validate(r.json())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_api_requires_a_valid_token(api: dict[str, Any]) -> None:
    base = api["base"]
    r = httpx.get(base + "/api/v1/studies", timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.get(base + "/api/v1/studies", headers={"Authorization": "Bearer not-a-token"}, timeout=30)
    assert r.status_code == 401
    r = httpx.get(base + "/api/v1/studies", headers={"Authorization": f"Basic {api['rad']}"}, timeout=30)
    assert r.status_code == 401


# PostgreSQL only: it is the stricter back-end (e.g. it refuses NUL characters in text).
@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_schemathesis_fuzz_finds_no_server_errors(api: dict[str, Any]) -> None:
    """Bounded property-based pass over every operation: no 5xx, responses conform to the schema."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(api["base"] + "/api/v1/openapi.json")
    headers = {"Authorization": f"Bearer {api['admin']}"}
    operations = [res.ok() for res in schema.get_all_operations()]
    assert len(operations) == 5
    for op in operations:
        @settings(max_examples=20, deadline=None, derandomize=True, database=None, phases=[Phase.explicit,
                  Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            response = case.call(base_url=api["base"], headers=headers, timeout=30)
            assert response.status_code < 500, (case.path, case.query, response.text[:300])
            case.validate_response(response)

        run()
