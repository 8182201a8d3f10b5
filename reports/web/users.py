"""Local users: create, list, disable/enable, reset password, change role, unlock, tokens, sessions.

The same functions serve the admin's web page (``/users``) and the CLI (``triage user ...``);
each runs in the caller's transaction and writes its audit event there (``user_created``,
``token_created``, ``role_change``, or ``user_updated`` with ``details.action``).

``user add`` creates the first admin on a fresh node. Passwords come from ``--password``,
the ``TRIAGE_NEW_PASSWORD`` environment variable, or an interactive prompt (in that order).

Changes that alter what a user may do end the user's open web sessions at once: disabling the
account, a new role, a new password. No change may leave the node without an active admin.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from reports.web.auth import (
    ROLES,
    active_sessions,
    audit_record,
    check_password_policy,
    hash_password,
    revoke_sessions,
    throttled_accounts,
    token_hash,
    unlock,
)
from storage import audit
from storage.db import session_scope
from storage.models import User
from triage.config import Settings
from triage.context import AppContext

PASSWORD_ENV = "TRIAGE_NEW_PASSWORD"
EV_USER_CREATED = audit.USER_CREATED
EV_TOKEN_ISSUED = audit.TOKEN_CREATED
EV_USER_UPDATED = audit.USER_UPDATED
EV_ROLE_CHANGE = audit.ROLE_CHANGE


class UserError(ValueError):
    """A user could not be created or changed; the message says why."""


def create_user(session: Session, username: str, password: str, role: str = "radiologist",
                *, actor: str = "cli") -> User:
    """Add a user (argon2 password hash) and audit it, in the caller's transaction."""
    username = username.strip()
    if not username or len(username) > 64 or any(c.isspace() for c in username):
        raise UserError("user name must be 1-64 characters without spaces")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    try:
        check_password_policy(password)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if session.scalars(select(User).where(User.username == username)).first() is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    session.add(user)
    session.flush()
    audit_record(session, EV_USER_CREATED, actor=actor, details={"username": username, "role": role})
    return user


def get_user(session: Session, username: str) -> User:
    user = session.scalars(select(User).where(User.username == username)).first()
    if user is None:
        raise UserError(f"no user {username!r}")
    return user


def _keeps_an_admin(session: Session, user: User, *, role: str, active: bool) -> None:
    """Refuse a change that would leave no active admin (the node could not be managed)."""
    if user.role != "admin" or not user.active or (role == "admin" and active):
        return
    others = session.scalar(select(func.count()).select_from(User).where(
        User.role == "admin", User.active.is_(True), User.id != user.id)) or 0
    if not others:
        raise UserError(f"{user.username!r} is the last active admin: add or enable another admin first")


def list_users(session: Session) -> list[dict[str, Any]]:
    """Every user with role, state, last login, token, open sessions and whether it is throttled."""
    sessions = active_sessions(session)
    waiting = throttled_accounts(session)
    return [
        {"id": u.id, "username": u.username, "role": u.role, "active": bool(u.active),
         "last_login_at": u.last_login_at, "created_at": u.created_at, "has_token": bool(u.api_token_hash),
         "sessions": sessions.get(u.id, 0), "throttled": u.username in waiting}
        for u in session.scalars(select(User).order_by(User.username))
    ]


def set_active(session: Session, username: str, active: bool, *, actor: str) -> User:
    """Enable or disable an account; disabling ends its sessions (its token stops working too)."""
    user = get_user(session, username)
    _keeps_an_admin(session, user, role=user.role, active=active)
    user.active = active
    ended = 0 if active else revoke_sessions(session, user.id)
    audit_record(session, EV_USER_UPDATED, actor=actor,
                 details={"username": username, "action": "enable" if active else "disable", "sessions_ended": ended})
    return user


def set_role(session: Session, username: str, role: str, *, actor: str) -> User:
    """Change a user's role; the user's open sessions end (log in again under the new role)."""
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    user = get_user(session, username)
    _keeps_an_admin(session, user, role=role, active=bool(user.active))
    old, user.role = user.role, role
    ended = revoke_sessions(session, user.id)
    audit_record(session, EV_ROLE_CHANGE, actor=actor,
                 details={"username": username, "from": old, "to": role, "sessions_ended": ended})
    return user


def reset_password(session: Session, username: str, password: str, *, actor: str) -> User:
    """Set a new password; ends the user's sessions and clears its login waits."""
    try:
        check_password_policy(password)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    user = get_user(session, username)
    user.password_hash = hash_password(password)
    ended = revoke_sessions(session, user.id)
    unlock(session, username)
    audit_record(session, EV_USER_UPDATED, actor=actor,
                 details={"username": username, "action": "reset_password", "sessions_ended": ended})
    return user


def unlock_user(session: Session, username: str, *, actor: str) -> int:
    """Clear the login waits of an account from every address; return how many there were."""
    get_user(session, username)
    cleared = unlock(session, username)
    audit_record(session, EV_USER_UPDATED, actor=actor,
                 details={"username": username, "action": "unlock", "cleared": cleared})
    return cleared


def revoke_tokens(session: Session, username: str, *, actor: str) -> bool:
    """Withdraw the user's API token; True when there was one."""
    user = get_user(session, username)
    had = bool(user.api_token_hash)
    user.api_token_hash = None
    audit_record(session, EV_USER_UPDATED, actor=actor,
                 details={"username": username, "action": "revoke_tokens", "had_token": had})
    return had


def revoke_user_sessions(session: Session, username: str, *, actor: str) -> int:
    """End every open web session of the user; return how many."""
    user = get_user(session, username)
    ended = revoke_sessions(session, user.id)
    audit_record(session, EV_USER_UPDATED, actor=actor,
                 details={"username": username, "action": "revoke_sessions", "sessions_ended": ended})
    return ended


def issue_token(session: Session, username: str, *, actor: str = "cli") -> str:
    """Give ``username`` a new API token (replacing any old one); return it. Only its hash is kept."""
    user = get_user(session, username)
    token = secrets.token_urlsafe(32)
    user.api_token_hash = token_hash(token)
    audit_record(session, EV_TOKEN_ISSUED, actor=actor, details={"username": username})
    return token


def _password(args: argparse.Namespace) -> str:
    if getattr(args, "password", None):
        return str(args.password)
    env = os.environ.get(PASSWORD_ENV)
    if env:
        return env
    if not sys.stdin.isatty():
        raise UserError(f"no password: give --password, set {PASSWORD_ENV}, or run in a terminal")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise UserError("passwords differ")
    return first


def _cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"cli:uid{os.getuid()}"


def _context(settings: Settings) -> AppContext:
    from storage.migrate import upgrade

    upgrade(settings.effective_database_url)  # idempotent: the first command on a fresh node
    return AppContext(settings, role="cli")


def cli_add(args: argparse.Namespace, settings: Settings) -> int:
    try:
        password = _password(args)
        ctx = _context(settings)
        try:
            with session_scope(ctx.sessions) as s:
                create_user(s, args.username, password, args.role, actor=_cli_actor())
        finally:
            ctx.close()
    except UserError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return 1
    print(f"user {args.username} created with role {args.role}")
    return 0


def cli_token(args: argparse.Namespace, settings: Settings) -> int:
    ctx = _context(settings)
    try:
        with session_scope(ctx.sessions) as s:
            token = issue_token(s, args.username, actor=_cli_actor())
    except UserError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.close()
    print(token)
    print("Keep this token secret; it is shown once. Use it as 'Authorization: Bearer <token>'.", file=sys.stderr)
    return 0


def _run(settings: Settings, action: Callable[[Session], Any]) -> tuple[int, Any]:
    """Run ``action(session)`` in one transaction; (exit code, its value), errors to stderr."""
    try:
        ctx = _context(settings)
    except UserError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return 1, None
    try:
        with session_scope(ctx.sessions) as s:
            return 0, action(s)
    except UserError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return 1, None
    finally:
        ctx.close()


def cli_list(args: argparse.Namespace, settings: Settings) -> int:
    code, users = _run(settings, list_users)
    if code:
        return code
    print(f"{'user':24} {'role':12} {'state':9} {'token':6} {'sessions':9} {'throttled':10} last login")
    for u in users:
        last = u["last_login_at"].strftime("%Y-%m-%d %H:%M UTC") if u["last_login_at"] else "never"
        print(f"{u['username']:24} {u['role']:12} {'active' if u['active'] else 'disabled':9} "
              f"{'yes' if u['has_token'] else 'no':6} {u['sessions']:<9} {'yes' if u['throttled'] else 'no':10} {last}")
    return 0


def cli_disable(args: argparse.Namespace, settings: Settings) -> int:
    code, _ = _run(settings, lambda s: set_active(s, args.username, False, actor=_cli_actor()))
    if not code:
        print(f"user {args.username} disabled; its sessions ended")
    return code


def cli_enable(args: argparse.Namespace, settings: Settings) -> int:
    code, _ = _run(settings, lambda s: set_active(s, args.username, True, actor=_cli_actor()))
    if not code:
        print(f"user {args.username} enabled")
    return code


def cli_role(args: argparse.Namespace, settings: Settings) -> int:
    code, _ = _run(settings, lambda s: set_role(s, args.username, args.role, actor=_cli_actor()))
    if not code:
        print(f"user {args.username} now has role {args.role}; its sessions ended")
    return code


def cli_password(args: argparse.Namespace, settings: Settings) -> int:
    try:
        password = _password(args)
    except UserError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return 1
    code, _ = _run(settings, lambda s: reset_password(s, args.username, password, actor=_cli_actor()))
    if not code:
        print(f"password of {args.username} reset; its sessions ended")
    return code


def cli_unlock(args: argparse.Namespace, settings: Settings) -> int:
    code, cleared = _run(settings, lambda s: unlock_user(s, args.username, actor=_cli_actor()))
    if not code:
        print(f"user {args.username} unlocked ({cleared} throttle entries cleared)")
    return code


def cli_revoke(args: argparse.Namespace, settings: Settings) -> int:
    both = not args.tokens and not args.sessions

    def revoke(s: Session) -> str:
        said = []
        if args.tokens or both:
            said.append("token revoked" if revoke_tokens(s, args.username, actor=_cli_actor()) else "no token")
        if args.sessions or both:
            said.append(f"{revoke_user_sessions(s, args.username, actor=_cli_actor())} sessions ended")
        return ", ".join(said)

    code, said = _run(settings, revoke)
    if not code:
        print(f"user {args.username}: {said}")
    return code
