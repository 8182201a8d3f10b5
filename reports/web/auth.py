"""Authentication for the web node: local users, sessions, API tokens, CSRF, login throttle.

Three ways to be a user, checked in this order:

1. ``Authorization: Bearer <token>`` (API clients). ``users.api_token_hash`` holds the sha256
   of the token; no cookie is involved, so no CSRF check applies.
2. A trusted reverse-proxy header (``settings.trusted_proxy_header``, e.g. ``X-Remote-User``)
   naming an existing active user. Only enable it behind a proxy that strips the header
   from client requests.
3. The signed session cookie set at login (Starlette ``SessionMiddleware``, itsdangerous). It
   carries a random session id whose sha256 is a ``web_sessions`` row: the session lives only
   while that row does. Logout deletes it; disabling an account, changing its role or password
   and an admin's "revoke sessions" delete all of the user's rows, so a copied cookie replayed
   afterwards is refused.

Every state-changing request made with a cookie (or the proxy header) must carry the
session's CSRF token, as a ``csrf_token`` form field or an ``X-CSRF-Token`` header.

Failed logins are throttled (``login_throttle``) per client address and per account as tried
from that address, with doubling waits; see :func:`login`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from storage import audit
from storage.db import session_scope
from storage.models import LoginThrottle, Setting, User, WebSession
from triage.context import AppContext
from triage.logging import get_logger

log = get_logger(__name__)

ROLES: tuple[str, ...] = ("radiologist", "admin")
PHI_ROLES: frozenset[str] = frozenset({"admin"})  # roles that see full patient name and ID
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECRET_SETTING_KEY = "web_session_secret"
MIN_PASSWORD_LENGTH = 10
SESSION_TTL_SECONDS = 12 * 3600
SESSION_TOUCH_SECONDS = 60  # last_seen_at is written at most this often per session
THROTTLE_FORGET = dt.timedelta(days=1)  # throttle rows idle this long are forgotten
GENERIC_LOGIN_ERROR = "Invalid user name or password."
THROTTLED_LOGIN_ERROR = ("Too many failed attempts: logins are locked here for {wait}. "
                         "Try again later or ask an administrator.")

# Audit event types written here (storage/audit.py). A refused request (wrong role, bad CSRF
# token) is recorded as "viewed" with outcome "failure" and the reason in its details.
EV_LOGIN = audit.LOGIN
EV_LOGIN_FAILED = audit.LOGIN_FAILED
EV_LOGOUT = audit.LOGOUT
EV_LOCKOUT = audit.LOCKOUT
EV_ACCESS_DENIED = audit.VIEWED

_hasher = PasswordHasher()
# Verified against when the user does not exist, so timing does not reveal valid names.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))

Endpoint = Callable[[Request], Awaitable[Response]]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def token_hash(token: str) -> str:
    """What ``users.api_token_hash`` stores: the hex sha256 of the bearer token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_password_policy(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")


def audit_record(session: Session, event_type: str, **kwargs: Any) -> None:
    """Write an audit event in the caller's transaction (storage.audit contract)."""
    audit.record(session, event_type, **kwargs)


AUDIT_ID_LIST_MAX = 1000  # study ids listed in one read's audit event (a list page holds at most 1,000)


def audit_reads(s: Session, user: CurrentUser, path: str, studies: Sequence[Any], phi: bool, *,
                channel: str = "api") -> None:
    """Record that ``user`` read identifiers of ``studies`` through ``channel`` (``api``: the REST
    API, ``dicomweb``) at ``path``; nothing when none. One study: the event names its UID and accession, as
    the study page's does. Several: one event listing their ids (a page of a list)."""
    if not studies:
        return
    details: dict[str, Any] = {channel: path, "phi": phi, "via": user.via}
    if len(studies) == 1:
        st = studies[0]
        audit_record(s, audit.VIEWED, actor=user.username, study_uid=st.study_uid, accession=st.accession,
                     details={**details, "study_id": st.id})
        return
    ids = sorted({st.id for st in studies})
    audit_record(s, audit.VIEWED, actor=user.username,
                 details={**details, "studies": len(ids), "study_ids": ids[:AUDIT_ID_LIST_MAX]})


def session_secret(ctx: AppContext) -> str:
    """``settings.secret_key``, or a random key generated once and kept in ``node_settings``.

    Several web processes sharing one database therefore sign sessions with the same key.
    """
    if ctx.settings.secret_key:
        return ctx.settings.secret_key
    with session_scope(ctx.sessions) as s:
        row = s.get(Setting, SECRET_SETTING_KEY)
        if row is not None and row.value:
            return row.value
    candidate = secrets.token_urlsafe(48)
    try:
        with session_scope(ctx.sessions) as s:
            s.add(Setting(key=SECRET_SETTING_KEY, value=candidate))
    except IntegrityError:  # another process won the race: use its key
        pass
    with session_scope(ctx.sessions) as s:
        row = s.get(Setting, SECRET_SETTING_KEY)
        assert row is not None
        return row.value


@dataclass(frozen=True)
class CurrentUser:
    id: int
    username: str
    role: str
    via: str  # session | token | proxy

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def sees_phi(self) -> bool:
        return self.role in PHI_ROLES


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


# --------------------------------------------------------------------------- login / throttle
@dataclass(frozen=True)
class LoginOutcome:
    user: CurrentUser | None
    error: str = ""
    session_id: str = ""  # the new session's id (goes into the signed cookie)


def _session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


def _fmt_wait(seconds: float) -> str:
    s = max(1, int(seconds + 0.999))
    return f"{s} s" if s < 120 else f"{(s + 59) // 60} min"


def _throttle_rows(s: Session, pairs: list[tuple[str, str]], now: dt.datetime) -> list[LoginThrottle]:
    """The throttle rows of (account, address) pairs, created when missing, locked for update."""
    dialect = s.get_bind().dialect.name
    table = LoginThrottle.__table__
    for account, address in pairs:
        values = {"account": account, "address": address, "failures": 0, "blocks": 0, "updated_at": now}
        if dialect == "postgresql":
            s.execute(postgresql.insert(table).values(**values).on_conflict_do_nothing(
                index_elements=["account", "address"]))
        elif dialect == "sqlite":
            s.execute(sqlite.insert(table).values(**values).on_conflict_do_nothing(
                index_elements=["account", "address"]))
        elif s.scalars(select(LoginThrottle).where(LoginThrottle.account == account,
                                                   LoginThrottle.address == address)).first() is None:
            s.add(LoginThrottle(**values))
            s.flush()
    rows = []
    for account, address in pairs:
        row = s.scalars(select(LoginThrottle).where(LoginThrottle.account == account,
                                                    LoginThrottle.address == address)
                        .with_for_update().execution_options(populate_existing=True)).one()
        if row.updated_at < now - THROTTLE_FORGET and not _blocked(row, now):
            row.failures, row.blocks = 0, 0  # an old history no longer counts
        rows.append(row)
    return rows


def _blocked(row: LoginThrottle, now: dt.datetime) -> bool:
    return row.blocked_until is not None and row.blocked_until > now


def _fail(row: LoginThrottle, limit: int, ctx: AppContext, now: dt.datetime) -> float:
    """Count a failure; start the next (doubled, capped) wait at ``limit`` failures. Returns the
    wait started, in seconds (0 when none)."""
    row.failures += 1
    row.updated_at = now
    if row.failures < limit:
        return 0.0
    st = ctx.settings
    wait = min(st.lockout_minutes * 60.0, st.lockout_base_seconds * 2.0 ** row.blocks)
    row.blocks += 1
    row.failures = 0
    row.blocked_until = now + dt.timedelta(seconds=wait)
    return wait


def _account_wide_until(s: Session, account: str, ctx: AppContext, now: dt.datetime) -> dt.datetime | None:
    """When ``lockout_account_addresses`` or more addresses are waiting on one account at once
    (a guess spread over several addresses), the account waits for every address until the
    soonest of those waits ends. One address alone can never cause this."""
    untils = sorted(s.scalars(select(LoginThrottle.blocked_until).where(
        LoginThrottle.account == account, LoginThrottle.blocked_until > now)))
    if len(untils) < ctx.settings.lockout_account_addresses:
        return None
    return untils[0]


def start_session(s: Session, user_id: int, ip: str, via: str = "password") -> str:
    """Create a server-side session row for ``user_id``; return the id for the cookie."""
    now = utcnow()
    s.execute(delete(WebSession).where(WebSession.expires_at <= now))  # housekeeping (indexed)
    session_id = secrets.token_urlsafe(32)
    s.add(WebSession(id_hash=_session_hash(session_id), user_id=user_id, via=via, ip=ip[:64], created_at=now,
                     last_seen_at=now, expires_at=now + dt.timedelta(seconds=SESSION_TTL_SECONDS)))
    s.flush()
    return session_id


def end_session(s: Session, session_id: str) -> bool:
    """Delete one session (logout). True when it existed."""
    return bool(s.execute(delete(WebSession).where(WebSession.id_hash == _session_hash(session_id))).rowcount)


def revoke_sessions(s: Session, user_id: int) -> int:
    """End every session of a user; return how many there were."""
    return int(s.execute(delete(WebSession).where(WebSession.user_id == user_id)).rowcount or 0)


def active_sessions(s: Session) -> dict[int, int]:
    """Open (unexpired) sessions per user id."""
    return {uid: n for uid, n in s.execute(
        select(WebSession.user_id, func.count()).where(WebSession.expires_at > utcnow())
        .group_by(WebSession.user_id))}


def unlock(s: Session, username: str) -> int:
    """Clear every wait of an account (all addresses); return how many throttle rows went."""
    return int(s.execute(delete(LoginThrottle).where(LoginThrottle.account == username)).rowcount or 0)


def throttled_accounts(s: Session) -> set[str]:
    """Accounts that some address is waiting on now (for the users page)."""
    return set(s.scalars(select(LoginThrottle.account).where(
        LoginThrottle.account != "", LoginThrottle.blocked_until > utcnow()).distinct()))


def login(ctx: AppContext, username: str, password: str, ip: str) -> LoginOutcome:
    """Check a password under the login throttle, start a session, and audit the attempt.

    Two throttles, both with doubling waits (``lockout_base_seconds``, capped at
    ``lockout_minutes``): one address that fails ``lockout_address_attempts`` times (any user
    names; a successful login forgives only its own account's failures there) waits, and one
    account that fails ``lockout_attempts`` times in a row from one address waits *at that
    address*; other addresses can still log in to it. Only when
    ``lockout_account_addresses`` addresses are waiting on the same account at once does the
    account wait everywhere. A waiting address gets no password check at all.

    User names that do not exist are throttled exactly as real ones, and both get the same
    messages, so neither the message nor the throttle tells which names exist.
    """
    now = utcnow()
    username = "".join(c for c in username if c.isprintable()).strip()[:64]
    ip = (ip or "unknown")[:64]
    account = username or "(empty)"
    with session_scope(ctx.sessions) as s:
        s.execute(delete(LoginThrottle).where(LoginThrottle.updated_at < now - THROTTLE_FORGET,
                                              LoginThrottle.blocked_until.is_(None)
                                              | (LoginThrottle.blocked_until < now)))
        by_address, by_pair = _throttle_rows(s, [("", ip), (account, ip)], now)
        account_until = _account_wide_until(s, account, ctx, now)
        waits = [r.blocked_until for r in (by_address, by_pair) if r.blocked_until and r.blocked_until > now]
        if account_until is not None:
            waits.append(account_until)
        if waits:
            until = max(waits)
            scope = "address" if _blocked(by_address, now) else "account" if _blocked(by_pair, now) else "account-wide"
            audit_record(s, EV_LOGIN_FAILED, actor=account, outcome="failure",
                         details={"reason": "throttled", "scope": scope, "ip": ip})
            return LoginOutcome(None, THROTTLED_LOGIN_ERROR.format(wait=_fmt_wait((until - now).total_seconds())))
        user = s.scalars(select(User).where(User.username == username)).first()
        usable = user is not None and user.active and bool(user.password_hash)
        ok = verify_password(user.password_hash if usable and user else _DUMMY_HASH, password) and usable
        if not ok or user is None:
            reason = "unknown user" if user is None else "inactive user" if not usable else "bad password"
            audit_record(s, EV_LOGIN_FAILED, actor=account, outcome="failure", details={"reason": reason, "ip": ip})
            waited = [(scope, _fail(row, limit, ctx, now)) for scope, row, limit in (
                ("address", by_address, ctx.settings.lockout_address_attempts),
                ("account", by_pair, ctx.settings.lockout_attempts))]
            started = [(scope, w) for scope, w in waited if w > 0]
            for scope, wait in started:
                audit_record(s, EV_LOCKOUT, actor=account, outcome="failure",
                             details={"scope": scope, "seconds": wait, "ip": ip})
                log.warning("web.login_throttled", scope=scope, seconds=wait)
            if started:
                return LoginOutcome(None, THROTTLED_LOGIN_ERROR.format(wait=_fmt_wait(max(w for _, w in started))))
            return LoginOutcome(None, GENERIC_LOGIN_ERROR)
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = hash_password(password)
        # The address forgets only this account's own failures (a user's typos): a success on an
        # account the caller owns must not wipe out failures on other names (password spraying
        # between logins to one's own account).
        by_address.failures = max(0, by_address.failures - by_pair.failures)
        by_address.updated_at = now
        s.delete(by_pair)
        user.last_login_at = now
        session_id = start_session(s, user.id, ip)
        audit_record(s, EV_LOGIN, actor=username, details={"ip": ip, "method": "password"})
        return LoginOutcome(CurrentUser(user.id, user.username, user.role, "session"), session_id=session_id)


def establish_session(request: Request, user: CurrentUser, session_id: str) -> None:
    """Put a fresh session into the signed cookie (new CSRF token: no fixation across logins)."""
    request.session.clear()
    request.session["sid"] = session_id
    request.session["csrf"] = secrets.token_urlsafe(32)
    request.session["t"] = int(utcnow().timestamp())


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use (also for the anonymous login form)."""
    tok = request.session.get("csrf")
    if not tok:
        tok = secrets.token_urlsafe(32)
        request.session["csrf"] = tok
    return str(tok)


async def csrf_ok(request: Request) -> bool:
    expected = request.session.get("csrf")
    if not expected:
        return False
    sent = request.headers.get("x-csrf-token", "")
    if not sent:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get("csrf_token", "")
            sent = value if isinstance(value, str) else ""
    return bool(sent) and hmac.compare_digest(str(sent), str(expected))


# --------------------------------------------------------------------------- who is asking
def _load(s: Session, **where: Any) -> User | None:
    stmt = select(User)
    for key, value in where.items():
        stmt = stmt.where(getattr(User, key) == value)
    user = s.scalars(stmt).first()
    if user is None or not user.active:
        return None
    return user


def resolve_user(ctx: AppContext, request: Request) -> CurrentUser | None:
    """The user behind a request (bearer token, trusted proxy header, or session), or None.

    Read in a read session (on SQLite it never queues behind the receiver's commits: every viewer
    slice and DICOMweb frame passes here); a write transaction only when there is something to
    write (a proxy login, or a session's last-seen time older than ``SESSION_TOUCH_SECONDS``)."""
    authz = request.headers.get("authorization", "")
    proxy_header = ctx.settings.trusted_proxy_header
    if proxy_header and not authz and request.headers.get(proxy_header, "").strip():
        return _resolve_proxy(ctx, request, proxy_header)
    now = utcnow()
    with session_scope(ctx.reads) as s:
        if authz:
            scheme, _, token = authz.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            user = _load(s, api_token_hash=token_hash(token.strip()))
            return CurrentUser(user.id, user.username, user.role, "token") if user else None
        row = _session_row(s, request)
        if row is None:
            return None
        user = _load(s, id=row.user_id)
        if user is None:
            return None
        current = CurrentUser(user.id, user.username, user.role, "session")
        stale, row_id = (now - row.last_seen_at).total_seconds() > SESSION_TOUCH_SECONDS, row.id_hash
    if stale:
        with session_scope(ctx.sessions) as s:
            s.execute(update(WebSession).where(WebSession.id_hash == row_id).values(last_seen_at=now))
    return current


def _resolve_proxy(ctx: AppContext, request: Request, proxy_header: str) -> CurrentUser | None:
    """A user named by the trusted proxy header; starts (and audits) a session for it when the
    request has none for that user."""
    name = request.headers.get(proxy_header, "").strip()
    with session_scope(ctx.sessions) as s:
        user = _load(s, username=name)
        if user is None:
            return None
        current = CurrentUser(user.id, user.username, user.role, "proxy")
        row = _session_row(s, request)
        if row is None or row.user_id != user.id:
            establish_session(request, current, start_session(s, user.id, client_ip(request), "proxy"))
            audit_record(s, EV_LOGIN, actor=user.username,
                         details={"ip": client_ip(request), "method": f"proxy header {proxy_header}"})
        return current


def _session_row(s: Session, request: Request) -> WebSession | None:
    """The live ``web_sessions`` row behind the request's cookie, or None (none, ended, expired)."""
    session_id = request.session.get("sid")
    if not isinstance(session_id, str) or not session_id:
        return None
    row = s.get(WebSession, _session_hash(session_id))
    if row is None or row.expires_at <= utcnow():
        return None
    return row


def logout(ctx: AppContext, request: Request) -> None:
    """End the request's server-side session (the cookie is cleared by the caller)."""
    session_id = request.session.get("sid")
    if isinstance(session_id, str) and session_id:
        with session_scope(ctx.sessions) as s:
            end_session(s, session_id)


def _wants_json(request: Request) -> bool:
    """API and DICOMweb clients get 401/403 as JSON; browsers are sent to the login page."""
    path = request.url.path
    return path.startswith(("/api/", "/dicomweb/")) or "application/json" in request.headers.get("accept", "")


def _deny(ctx: AppContext, request: Request, user: CurrentUser, reason: str) -> None:
    with session_scope(ctx.sessions) as s:
        audit_record(s, EV_ACCESS_DENIED, actor=user.username, outcome="failure",
                     details={"path": request.url.path, "method": request.method, "denied": reason})


def requires(*roles: str) -> Callable[[Endpoint], Endpoint]:
    """Endpoint decorator: authenticated user with one of ``roles`` (any role when empty), CSRF on writes."""
    allowed = frozenset(roles or ROLES)

    def deco(fn: Endpoint) -> Endpoint:
        @functools.wraps(fn)
        async def wrapper(request: Request) -> Response:
            ctx: AppContext = request.app.state.ctx
            user = await run_in_threadpool(resolve_user, ctx, request)
            if user is None:
                if _wants_json(request):
                    return JSONResponse({"error": "authentication required"}, status_code=401,
                                        headers={"WWW-Authenticate": 'Bearer realm="ich-triage"'})
                nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                from urllib.parse import quote

                return RedirectResponse(f"/login?next={quote(nxt, safe='')}", status_code=303)
            if user.role not in allowed:
                await run_in_threadpool(_deny, ctx, request, user, "role")
                if _wants_json(request):
                    return JSONResponse({"error": "forbidden"}, status_code=403)
                return request.app.state.templates.TemplateResponse(
                    request, "error.html", {"user": user, "status": 403,
                                            "message": "Your role may not open this page."}, status_code=403)
            if request.method not in SAFE_METHODS and user.via != "token" and not await csrf_ok(request):
                await run_in_threadpool(_deny, ctx, request, user, "csrf")
                if _wants_json(request):
                    return JSONResponse({"error": "missing or invalid CSRF token"}, status_code=403)
                return PlainTextResponse("Missing or invalid CSRF token.", status_code=403)
            request.state.user = user
            return await fn(request)

        return wrapper

    return deco
