"""Authentication for the web node: local users, sessions, API tokens, CSRF, lock-out.

Three ways to be a user, checked in this order:

1. ``Authorization: Bearer <token>`` (API clients). ``users.api_token_hash`` holds the sha256
   of the token; no cookie is involved, so no CSRF check applies.
2. A trusted reverse-proxy header (``settings.trusted_proxy_header``, e.g. ``X-Remote-User``)
   naming an existing active user. Only enable it behind a proxy that strips the header
   from client requests.
3. The signed session cookie set at login (Starlette ``SessionMiddleware``, itsdangerous).

Every state-changing request made with a cookie (or the proxy header) must carry the
session's CSRF token, as a ``csrf_token`` form field or an ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from storage import audit
from storage.db import session_scope
from storage.models import Setting, User
from triage.context import AppContext
from triage.logging import get_logger

log = get_logger(__name__)

ROLES: tuple[str, ...] = ("radiologist", "admin")
PHI_ROLES: frozenset[str] = frozenset({"admin"})  # roles that see full patient name and ID
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECRET_SETTING_KEY = "web_session_secret"
MIN_PASSWORD_LENGTH = 10

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


# --------------------------------------------------------------------------- login / lock-out
@dataclass(frozen=True)
class LoginOutcome:
    user: CurrentUser | None
    error: str = ""


def _locked(user: User, now: dt.datetime) -> bool:
    return user.locked_until is not None and user.locked_until > now


def login(ctx: AppContext, username: str, password: str, ip: str) -> LoginOutcome:
    """Check a password, apply lock-out, and audit the attempt.

    After ``settings.lockout_attempts`` consecutive failures the account is locked for
    ``settings.lockout_minutes``; while locked, even the right password is refused. The
    message never says whether the user name exists.
    """
    s_ = ctx.settings
    now = utcnow()
    generic = "Invalid user name or password."
    username = "".join(c for c in username if c.isprintable()).strip()[:64]
    with session_scope(ctx.sessions) as s:
        user = s.scalars(select(User).where(User.username == username)).first()
        if user is None or not user.active or not user.password_hash:
            verify_password(_DUMMY_HASH, password)
            reason = "unknown user" if user is None else "inactive user"
            audit_record(s, EV_LOGIN_FAILED, actor=username or "(empty)", outcome="failure",
                         details={"reason": reason, "ip": ip})
            return LoginOutcome(None, generic)
        if _locked(user, now):
            audit_record(s, EV_LOGIN_FAILED, actor=username, outcome="failure",
                         details={"reason": "locked", "ip": ip})
            return LoginOutcome(None, "This account is temporarily locked. Try again later or ask an administrator.")
        if not verify_password(user.password_hash, password):
            user.failed_logins = (user.failed_logins or 0) + 1
            audit_record(s, EV_LOGIN_FAILED, actor=username, outcome="failure",
                         details={"reason": "bad password", "failures": user.failed_logins, "ip": ip})
            if user.failed_logins >= s_.lockout_attempts:
                user.locked_until = now + dt.timedelta(minutes=s_.lockout_minutes)
                user.failed_logins = 0
                audit_record(s, EV_LOCKOUT, actor=username, outcome="failure",
                             details={"minutes": s_.lockout_minutes, "ip": ip})
                log.warning("web.lockout", user_id=user.id)
                return LoginOutcome(None, "Too many failed attempts: this account is temporarily locked.")
            return LoginOutcome(None, generic)
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = hash_password(password)
        user.failed_logins = 0
        user.locked_until = None
        user.last_login_at = now
        audit_record(s, EV_LOGIN, actor=username, details={"ip": ip, "method": "password"})
        return LoginOutcome(CurrentUser(user.id, user.username, user.role, "session"))


def establish_session(request: Request, user: CurrentUser) -> None:
    """Start a fresh session for ``user`` (new CSRF token: no fixation across logins)."""
    request.session.clear()
    request.session["uid"] = user.id
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
    """The user behind a request (bearer token, trusted proxy header, or session), or None."""
    authz = request.headers.get("authorization", "")
    proxy_header = ctx.settings.trusted_proxy_header
    with session_scope(ctx.sessions) as s:
        if authz:
            scheme, _, token = authz.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            user = _load(s, api_token_hash=token_hash(token.strip()))
            return CurrentUser(user.id, user.username, user.role, "token") if user else None
        if proxy_header:
            name = request.headers.get(proxy_header, "").strip()
            if name:
                user = _load(s, username=name)
                if user is None:
                    return None
                if request.session.get("uid") != user.id:
                    establish_session(request, CurrentUser(user.id, user.username, user.role, "proxy"))
                    audit_record(s, EV_LOGIN, actor=user.username,
                                 details={"ip": client_ip(request), "method": f"proxy header {proxy_header}"})
                return CurrentUser(user.id, user.username, user.role, "proxy")
        uid = request.session.get("uid")
        if not isinstance(uid, int):
            return None
        user = _load(s, id=uid)
        if user is None:
            return None
        return CurrentUser(user.id, user.username, user.role, "session")


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")


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
