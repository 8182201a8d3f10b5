"""Web pages, sessions and security, through the ASGI app (in-process HTTP), on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy import text as sql
from starlette.testclient import TestClient

from reports.web.app import create_app
from storage import audit
from storage.db import session_scope
from storage.models import AuditEvent, Feedback, Job, LoginThrottle, User
from tests.conftest import make_settings
from tests.web_support import PASSWORD, add_user, heartbeat, seed_study
from triage.context import AppContext

CSRF_RE = re.compile(r'name="csrf-token" content="([^"]+)"')


def csrf_of(client: TestClient, path: str = "/login") -> str:
    m = CSRF_RE.search(client.get(path).text)
    assert m, "page carries no CSRF token"
    return m.group(1)


def log_in(client: TestClient, username: str, password: str = PASSWORD) -> tuple[int, str]:
    token = csrf_of(client)
    r = client.post("/login", data={"username": username, "password": password, "csrf_token": token, "next": "/"},
                    follow_redirects=False)
    return r.status_code, r.text


def events(ctx: AppContext, event_type: str) -> list[AuditEvent]:
    with session_scope(ctx.sessions) as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type)
                              .order_by(AuditEvent.id)))


# Queries that differ between back-ends (worklist, study view, audit, operations, metrics) run on
# SQLite and PostgreSQL (``app_ctx``); session and role mechanics on SQLite only (``lite_ctx``).
def _with_users(ctx: AppContext) -> AppContext:
    add_user(ctx, "alice", "admin")
    add_user(ctx, "rad", "radiologist")
    return ctx


@pytest.fixture
def app_ctx(ctx: AppContext) -> AppContext:
    return _with_users(ctx)


@pytest.fixture
def lite_ctx(sqlite_ctx: AppContext) -> AppContext:
    return _with_users(sqlite_ctx)


@pytest.fixture
def client(app_ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(app_ctx), base_url="http://testserver") as c:
        yield c


@pytest.fixture
def lite_client(lite_ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(lite_ctx), base_url="http://testserver") as c:
        yield c


def test_login_session_cookie_and_logout_are_audited(lite_ctx: AppContext, lite_client: TestClient) -> None:
    assert lite_client.get("/", follow_redirects=False).headers["location"].startswith("/login")
    token = csrf_of(lite_client)
    r = lite_client.post("/login", data={"username": "rad", "password": PASSWORD, "csrf_token": token, "next": "/"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    page = lite_client.get("/")
    assert page.status_code == 200 and "Worklist" in page.text
    assert "not for clinical use" in page.text.lower()
    assert "content-security-policy" in page.headers
    new_token = csrf_of(lite_client, "/")
    assert new_token != token, "login must rotate the CSRF token"
    r = lite_client.post("/logout", data={"csrf_token": new_token}, follow_redirects=False)
    assert r.status_code == 303
    assert lite_client.get("/", follow_redirects=False).status_code == 303
    assert [e.actor for e in events(lite_ctx, audit.LOGIN)] == ["rad"]
    assert [e.actor for e in events(lite_ctx, audit.LOGOUT)] == ["rad"]


def test_secure_cookie_when_https_only(tmp_path, sqlite_ctx: AppContext) -> None:
    ctx = AppContext(make_settings(tmp_path, database_url=sqlite_ctx.settings.database_url,
                                   session_https_only="true"))
    try:
        add_user(ctx, "alice", "admin")
        with TestClient(create_app(ctx), base_url="https://testserver") as c:
            token = csrf_of(c)
            r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token},
                       follow_redirects=False)
            assert r.status_code == 303
            assert "secure" in r.headers["set-cookie"].lower()
    finally:
        ctx.close()


def test_wrong_password_then_lockout(lite_ctx: AppContext, lite_client: TestClient) -> None:
    attempts = lite_ctx.settings.lockout_attempts
    for _ in range(attempts - 1):
        status, body = log_in(lite_client, "rad", "wrong password!")
        assert status == 401 and "Invalid user name or password" in body
    status, body = log_in(lite_client, "rad", "wrong password!")
    assert status == 401 and "locked" in body
    status, body = log_in(lite_client, "rad")  # right password, still waiting at this address
    assert status == 401 and "locked" in body
    assert len(events(lite_ctx, audit.LOCKOUT)) == 1
    failed = events(lite_ctx, audit.LOGIN_FAILED)
    assert len(failed) == attempts + 1
    assert failed[-1].details["reason"] == "throttled"
    with session_scope(lite_ctx.sessions) as s:
        row = s.scalars(select(LoginThrottle).where(LoginThrottle.account == "rad")).one()
        assert row.blocked_until is not None and row.address == "testclient"
    status, body = log_in(lite_client, "nobody", "whatever12345")  # unknown user: same answer
    assert status == 401 and "Invalid user name or password" in body


def test_csrf_is_required(lite_ctx: AppContext, lite_client: TestClient) -> None:
    r = lite_client.post("/login", data={"username": "rad", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403
    assert log_in(lite_client, "rad")[0] == 303
    seeded = seed_study(lite_ctx, accession="ACC-CSRF", flagged=True, probabilities={"any": 0.9, "subdural": 0.9})
    r = lite_client.post(f"/studies/{seeded.study_id}/feedback", json={"action": "acknowledge"})
    assert r.status_code == 403
    r = lite_client.post(f"/studies/{seeded.study_id}/feedback", json={"action": "acknowledge"},
                    headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403
    with session_scope(lite_ctx.sessions) as s:
        assert s.scalars(select(Feedback)).first() is None
    denied = [e for e in events(lite_ctx, audit.VIEWED) if e.outcome == "failure"]
    assert denied and denied[-1].details["denied"] == "csrf"


def test_feedback_is_stored_and_audited(lite_ctx: AppContext, lite_client: TestClient) -> None:
    seeded = seed_study(lite_ctx, accession="ACC-FB", flagged=True, probabilities={"any": 0.9, "subdural": 0.8})
    assert log_in(lite_client, "rad")[0] == 303
    token = csrf_of(lite_client, "/")
    r = lite_client.post(f"/studies/{seeded.study_id}/feedback", json={"action": "agree"},
                    headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["feedback"]["action"] == "agree"
    bad = lite_client.post(f"/studies/{seeded.study_id}/feedback", json={"action": "delete"},
                      headers={"X-CSRF-Token": token})
    assert bad.status_code == 400
    missing = lite_client.post("/studies/999999/feedback", json={"action": "agree"}, headers={"X-CSRF-Token": token})
    assert missing.status_code == 404
    with session_scope(lite_ctx.sessions) as s:
        fbs = list(s.scalars(select(Feedback)))
    assert [(f.action, f.result_id) for f in fbs] == [("agree", seeded.result_id)]
    ev = events(lite_ctx, audit.FEEDBACK)
    assert len(ev) == 1 and ev[0].actor == "rad" and ev[0].accession == "ACC-FB"
    assert ev[0].details["action"] == "agree"


def test_roles_phi_masking_and_forbidden_pages(lite_ctx: AppContext, lite_client: TestClient) -> None:
    seed_study(lite_ctx, accession="ACC-PHI", patient_name="DOE^JANE", patient_id="PID0042")
    assert log_in(lite_client, "rad")[0] == 303
    page = lite_client.get("/").text
    assert "J.D. …42" in page and "DOE" not in page and "PID0042" not in page
    for path in ("/audit", "/ops", "/audit.csv"):
        assert lite_client.get(path).status_code == 403
    token = csrf_of(lite_client, "/")
    assert lite_client.post("/ops/jobs/1/retry", data={"csrf_token": token}).status_code == 403
    denied = [e for e in events(lite_ctx, audit.VIEWED) if e.outcome == "failure"]
    assert {e.details["path"] for e in denied} >= {"/audit", "/ops"}
    lite_client.post("/logout", data={"csrf_token": token})
    assert log_in(lite_client, "alice")[0] == 303
    page = lite_client.get("/").text
    assert "DOE JANE (PID0042)" in page


def test_study_view_and_previews(app_ctx: AppContext, client: TestClient) -> None:
    seeded = seed_study(app_ctx, accession="ACC-VIEW", flagged=True,
                        probabilities={"any": 0.93, "subdural": 0.88, "epidural": 0.1},
                        deliveries=(("PACS@127.0.0.1:4242", True), ("ARCH@10.0.0.9:104", False)))
    assert client.get(f"/studies/{seeded.study_id}/preview/0/overlay", follow_redirects=False).status_code == 303
    assert log_in(client, "rad")[0] == 303
    page = client.get(f"/studies/{seeded.study_id}")
    assert page.status_code == 200
    for text in ("Subdural hemorrhage", "0.880", "ich-synthetic 0.1.0", "PACS@127.0.0.1:4242", "ARCH@10.0.0.9:104",
                 "out of resources", "inferred", "12.4 mL", "11.8 mL"):
        assert text in page.text, text
    views = [e for e in events(app_ctx, audit.VIEWED) if e.study_uid == seeded.study_uid]
    assert [(e.actor, e.details["phi"]) for e in views] == [("rad", False)]
    img = client.get(f"/studies/{seeded.study_id}/preview/0/overlay")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content.startswith(b"\x89PNG")
    assert client.get(f"/studies/{seeded.study_id}/preview/0/plain").status_code == 200
    assert client.get(f"/studies/{seeded.study_id}/preview/7/overlay").status_code == 404
    assert client.get(f"/studies/{seeded.study_id}/preview/0/secret").status_code == 404
    assert client.get("/studies/424242").status_code == 404
    assert client.get("/studies/abc").status_code == 404


def test_worklist_order_status_and_rows_endpoint(app_ctx: AppContext, client: TestClient) -> None:
    seed_study(app_ctx, accession="ACC-OLD-FLAG", flagged=True, received_ago_s=5000,
               probabilities={"any": 0.9, "intraparenchymal": 0.9})
    seed_study(app_ctx, accession="ACC-NEW", received_ago_s=60)
    seed_study(app_ctx, accession="ACC-SKIP", status="skipped", status_reason="not a head CT: body part CHEST",
               received_ago_s=30)
    assert log_in(client, "rad")[0] == 303
    rows = client.get("/worklist/rows?view=all").text  # skipped studies are not in the default "to read" view
    order = re.findall(r">(ACC-[A-Z-]+)</a>", rows)
    assert order == ["ACC-OLD-FLAG", "ACC-SKIP", "ACC-NEW"]
    assert "not a head CT: body part CHEST" in rows
    assert "IPH 90%" in rows


def test_a_result_outside_the_models_input_domain_is_marked(app_ctx: AppContext, client: TestClient) -> None:
    ood = seed_study(app_ctx, accession="ACC-OOD", flagged=True, probabilities={"any": 0.97, "subarachnoid": 0.96},
                     input_domain={"distance": 41.27, "threshold": 9.5, "in_domain": False})
    ind = seed_study(app_ctx, accession="ACC-IND", input_domain={"distance": 4.2, "threshold": 9.5, "in_domain": True})
    old = seed_study(app_ctx, accession="ACC-NOCHECK")
    assert log_in(client, "rad")[0] == 303
    rows = client.get("/worklist/rows").text
    marked = {m for m in re.findall(r'data-study-id="(\d+)"', rows.split("OUT OF DOMAIN")[0])}
    assert rows.count("OUT OF DOMAIN") == 1 and str(ood.study_id) in marked
    assert "distance 41.3 &gt; 9.5" in rows
    page = client.get(f"/studies/{ood.study_id}").text
    assert "OUT OF DOMAIN" in page and "do not rely on this result" in page
    assert "like the training studies (distance 4.2" in client.get(f"/studies/{ind.study_id}").text
    assert "not checked" in client.get(f"/studies/{old.study_id}").text
    waiting = seed_study(app_ctx, accession="ACC-WAIT", status="processing")
    assert "Input domain" not in client.get(f"/studies/{waiting.study_id}").text, "no result: nothing to say"
    api = {r["accession"]: r["input_domain"] for r in client.get("/api/v1/results").json()["items"]}
    assert api["ACC-OOD"] == {"distance": 41.27, "threshold": 9.5, "in_domain": False}
    assert api["ACC-IND"]["in_domain"] is True and api["ACC-NOCHECK"] is None
    assert client.get(f"/api/v1/studies/{ood.study_id}").json()["input_domain"]["in_domain"] is False


def test_audit_page_filters_csv_and_verification(app_ctx: AppContext, client: TestClient) -> None:
    seed_study(app_ctx, accession="ACC-AUD")
    seed_study(app_ctx, accession="ACC-OTHER")
    assert log_in(client, "alice")[0] == 303
    page = client.get("/audit", params={"accession": "ACC-AUD"})
    assert page.status_code == 200
    assert "verified" in page.text and "NOT verified" not in page.text
    assert "ACC-AUD" in page.text and "ACC-OTHER" not in page.text
    assert client.get("/audit", params={"since": "garbage"}).status_code == 200
    assert client.get("/audit", params={"accession": "A\x00B", "actor": "\x00"}).status_code == 200
    r = client.get("/audit.csv", params={"event_type": "received"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["accession"] for row in rows} == {"ACC-AUD", "ACC-OTHER"}
    assert all(row["event_type"] == "received" for row in rows)
    exports = [e for e in events(app_ctx, audit.VIEWED) if e.details.get("export") == "audit.csv"]
    assert exports and exports[-1].actor == "alice"
    # Tamper with an event: the page must say the chain is broken.
    with session_scope(app_ctx.sessions) as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.accession == "ACC-AUD")).first()
        ev.actor = "mallory"
    assert "NOT verified" in client.get("/audit").text


def test_operations_page_shows_a_destination_backing_off(app_ctx: AppContext, client: TestClient) -> None:
    seed_study(app_ctx, accession="ACC-LANE", deliveries=(("PACS@h:1", False),))
    q = app_ctx.queue
    first = q.enqueue("deliver", {"result_object_id": 1, "destination": "PACS@h:1"}, lane="dicom:PACS@h:1")
    q.enqueue("deliver", {"result_object_id": 2, "destination": "PACS@h:1"}, lane="dicom:PACS@h:1")
    assert q.claim("w").id == first
    q.fail(first, "w", "association with PACS@h:1 could not connect", lane_down=True)
    assert log_in(client, "alice")[0] == 303
    page = client.get("/ops").text
    row = page[page.index("PACS@h:1"):][:1500]
    assert "unreachable" in row and "1 attempts in a row" in row, row
    assert '<td class="num">2</td>' in row  # both deliveries still waiting, in order


def test_operations_page_and_retry(app_ctx: AppContext, client: TestClient) -> None:
    seed_study(app_ctx, accession="ACC-OPS", flagged=True, probabilities={"any": 0.9, "subdural": 0.9})
    heartbeat(app_ctx)
    q = app_ctx.queue
    job_id = q.enqueue("deliver", {"result_object_id": 1, "destination": "PACS@127.0.0.1:4242"}, max_attempts=1)
    job = q.claim("test-worker")
    assert job is not None and job.id == job_id
    q.fail(job.id, "test-worker", "association rejected", retry=False)
    assert log_in(client, "alice")[0] == 303
    page = client.get("/ops")
    assert page.status_code == 200
    for text in ("association rejected", "test:1:worker", "ich-synthetic", "PACS@127.0.0.1:4242", "Flag rate"):
        assert text in page.text, text
    token = csrf_of(client, "/ops")
    assert client.post(f"/ops/jobs/{job_id}/retry", data={}, follow_redirects=False).status_code == 403
    r = client.post(f"/ops/jobs/{job_id}/retry", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    with session_scope(app_ctx.sessions) as s:
        assert s.get(Job, job_id).state == "queued"
    retried = events(app_ctx, audit.JOB_RETRIED)
    assert retried and retried[-1].actor == "alice"


def test_quality_ppv_and_ttr(app_ctx: AppContext, client: TestClient) -> None:
    from reports.web import queries as q

    a = seed_study(app_ctx, accession="Q1", flagged=True, probabilities={"any": 0.9}, ttr_s=60)
    b = seed_study(app_ctx, accession="Q2", flagged=True, probabilities={"any": 0.9}, ttr_s=120)
    seed_study(app_ctx, accession="Q3", ttr_s=180,
               input_domain={"distance": 10.0, "threshold": 6.0, "in_domain": False})
    seed_study(app_ctx, accession="Q4", ttr_s=240, input_domain={"distance": 2.0, "threshold": 6.0, "in_domain": True})
    with session_scope(app_ctx.sessions) as s:
        uid = s.scalars(select(User.id).where(User.username == "rad")).one()
        s.add_all([Feedback(study_id=a.study_id, user_id=uid, action="disagree"),
                   Feedback(study_id=a.study_id, user_id=uid, action="agree"),  # latest answer counts
                   Feedback(study_id=b.study_id, user_id=uid, action="disagree")])
    with session_scope(app_ctx.sessions) as s:
        qd = q.quality(s)
    assert qd["done"] == 4 and qd["flagged"] == 2 and qd["flag_rate"] == pytest.approx(0.5)
    assert qd["verdicts"] == 2 and qd["agree"] == 1 and qd["ppv"] == pytest.approx(0.5)
    assert qd["ttr_p50"] == pytest.approx(150, abs=1)
    assert qd["out_of_domain"] == 1 and qd["out_of_domain_rate"] == pytest.approx(0.25)
    assert log_in(client, "alice")[0] == 303
    ops = client.get("/ops").text
    assert re.search(r'class="num ood">1 \(25', ops), "the operations page shows the out-of-domain count"
    assert q.percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)


def test_trusted_proxy_header(tmp_path, sqlite_ctx: AppContext) -> None:
    ctx = AppContext(make_settings(tmp_path, database_url=sqlite_ctx.settings.database_url,
                                   trusted_proxy_header="X-Remote-User"))
    try:
        add_user(ctx, "rad", "radiologist")
        with TestClient(create_app(ctx)) as c:
            assert c.get("/", headers={"X-Remote-User": "rad"}).status_code == 200
            assert c.get("/", headers={"X-Remote-User": "stranger"}, follow_redirects=False).status_code == 303
        assert [e.details["method"] for e in events(ctx, audit.LOGIN)] == ["proxy header X-Remote-User"]
        # Without the setting the header is ignored.
        with TestClient(create_app(sqlite_ctx)) as c:
            assert c.get("/", headers={"X-Remote-User": "rad"}, follow_redirects=False).status_code == 303
    finally:
        ctx.close()


def test_health_ready_and_metrics(app_ctx: AppContext, client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    # Readiness is about this process: no worker anywhere is reported, not a reason to be unready.
    r = client.get("/readyz")
    checks = r.json()["checks"]
    assert r.status_code == 200, r.json()
    assert checks["worker"]["ok"] is False and checks["worker"]["required"] is False
    assert checks["database"]["ok"] is True and checks["migrations"]["ok"] is True
    heartbeat(app_ctx)
    r = client.get("/readyz")
    assert r.status_code == 200 and all(c["ok"] for c in r.json()["checks"].values())
    heartbeat(app_ctx, age_s=3600)
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["worker"]["ok"] is False
    # The disk floor: reported for a web process; required where the process writes the store.
    app_ctx.store.free_bytes_override = 0
    ctx_floor, ctx_role = app_ctx.store.floor_bytes, app_ctx.role
    app_ctx.store.floor_bytes = 1
    try:
        app_ctx.role = "web"
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"]["disk"] == {**r.json()["checks"]["disk"], "ok": False,
                                                                          "required": False}
        app_ctx.role = "serve"
        assert client.get("/readyz").status_code == 503
    finally:
        app_ctx.store.free_bytes_override = None
        app_ctx.store.floor_bytes = ctx_floor
        app_ctx.role = ctx_role
    # The schema behind the code's head revision: not ready.
    with app_ctx.engine.begin() as conn:
        head = conn.execute(sql("SELECT version_num FROM alembic_version")).scalar_one()
        conn.execute(sql("UPDATE alembic_version SET version_num = '0001'"))
    try:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["migrations"]["current"] == "0001"
    finally:
        with app_ctx.engine.begin() as conn:
            conn.execute(sql("UPDATE alembic_version SET version_num = :h"), {"h": head})
    # This process's own components (e.g. the worker threads of ``triage serve``).
    up = {"on": True}
    with TestClient(create_app(app_ctx, {"worker-infer": lambda: up["on"]})) as c:
        assert c.get("/readyz").status_code == 200
        up["on"] = False
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["component:worker-infer"]["ok"] is False
    seed_study(app_ctx, accession="M1", flagged=True, probabilities={"any": 0.9},
               deliveries=(("PACS@h:1", True), ("PACS@h:1", False)))
    app_ctx.queue.enqueue("infer", {"series_id": 1, "generation": 0})
    body = client.get("/metrics").text
    assert "triage_flagged_studies_total 1.0" in body
    assert 'triage_jobs{kind="infer",state="queued"} 1.0' in body
    assert 'triage_deliveries_total{channel="dicom",outcome="ok"} 1.0' in body
    assert 'triage_deliveries_total{channel="dicom",outcome="failed"} 1.0' in body
    assert 'triage_stage_duration_seconds_bucket{le="5.0",stage="predict"} 1.0' in body
    assert 'triage_stage_duration_seconds_count{stage="total"} 1.0' in body
    assert "triage_instances_received_total 32.0" in body
    assert "triage_results_out_of_domain_total 0.0" in body, "a result without the check is not counted"
    for i, inside in enumerate((False, True, False)):
        seed_study(app_ctx, accession=f"D{i}", input_domain={"distance": 1.0, "threshold": 2.0, "in_domain": inside})
    assert "triage_results_out_of_domain_total 2.0" in client.get("/metrics").text


def test_cli_user_add_and_token(tmp_path) -> None:
    """`triage user add` / `triage user token` as a fresh install runs them (subprocess, no stdin)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "TRIAGE_DATA_DIR": str(tmp_path / "node"), "TRIAGE_DISK_FLOOR_MB": "0"}
    env.pop("TRIAGE_NEW_PASSWORD", None)

    def triage(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "triage.cli", *args], cwd=REPO, env={**env, **extra},
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    r = triage("user", "add", "alice", "--role", "admin")
    assert r.returncode == 1 and "no password" in r.stderr
    r = triage("user", "add", "alice", "--role", "admin", "--password", "short")
    assert r.returncode == 1 and "at least 10" in r.stderr
    r = triage("user", "add", "alice", "--role", "admin", TRIAGE_NEW_PASSWORD=PASSWORD)
    assert r.returncode == 0, r.stderr
    r = triage("user", "add", "alice", "--password", PASSWORD)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = triage("user", "token", "nobody")
    assert r.returncode == 1 and "no user" in r.stderr
    r = triage("user", "token", "alice")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert len(token) >= 40 and token not in r.stderr

    ctx = AppContext(make_settings(tmp_path / "x", data_dir=str(tmp_path / "node")))
    try:
        with session_scope(ctx.sessions) as s:
            user = s.scalars(select(User).where(User.username == "alice")).one()
            assert user.role == "admin" and user.password_hash.startswith("$argon2id$")
            assert user.api_token_hash and token not in user.api_token_hash
        with TestClient(create_app(ctx)) as c:
            assert c.get("/api/v1/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert [e.event_type for e in events(ctx, audit.USER_CREATED)] == ["user_created"]
        assert len(events(ctx, audit.TOKEN_CREATED)) == 1
    finally:
        ctx.close()


def test_audit_details_are_summarised_for_tables() -> None:
    from reports.web.app import fmt_details

    text = fmt_details({"count": 300, "sop_instance_uids": ["1.2.3"] * 300, "z_note": "x" * 1000})
    assert '"sop_instance_uids": "[300 items]"' in text and '"count": 300' in text
    assert len(text) == 400 and text.endswith("…")
    assert fmt_details({"ids": [1, 2]}) == '{"ids": [1, 2]}'


def test_timeline_collapses_received_batches() -> None:
    from reports.web.queries import collapse_received

    ev = [{"ts": f"t{i}", "event_type": "received", "actor": "CT", "outcome": "success", "series_uid": "1",
           "details": {"count": 10, "sop_instance_uids": ["x"] * 10}} for i in range(3)]
    ev.append({"ts": "t9", "event_type": "inferred", "actor": "w", "outcome": "success", "series_uid": "1",
               "details": {"positive": True}})
    out = collapse_received(ev)
    assert [e["event_type"] for e in out] == ["received", "inferred"]
    assert out[0]["details"] == {"count": 30, "batches": 3} and out[0]["ts_last"] == "t2"


def test_every_page_says_what_the_model_was_trained_on(app_ctx: AppContext, client: TestClient) -> None:
    from triage.models.bundle import default_bundle_path, read_manifest

    assert log_in(client, "rad")[0] == 303
    page = client.get("/").text
    banner = re.search(r'id="disclaimer">([^<]*)<', page)
    assert banner is not None
    text = banner.group(1)
    assert read_manifest(default_bundle_path())["trained_on"] in text.replace("&#39;", "'")
    assert "real head CT slices" in text and "Not for clinical use" in text
