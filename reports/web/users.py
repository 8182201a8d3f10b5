"""Local users: ``triage user add`` and ``triage user token``.

``user add`` creates the first admin on a fresh node. The password comes from ``--password``,
the ``TRIAGE_NEW_PASSWORD`` environment variable, or an interactive prompt (in that order).
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys

from sqlalchemy import select
from sqlalchemy.orm import Session

from reports.web.auth import ROLES, audit_record, check_password_policy, hash_password, token_hash
from storage import audit
from storage.db import session_scope
from storage.models import User
from triage.config import Settings
from triage.context import AppContext

PASSWORD_ENV = "TRIAGE_NEW_PASSWORD"
EV_USER_CREATED = audit.USER_CREATED
EV_TOKEN_ISSUED = audit.TOKEN_CREATED


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


def issue_token(session: Session, username: str, *, actor: str = "cli") -> str:
    """Give ``username`` a new API token (replacing any old one); return it. Only its hash is kept."""
    user = session.scalars(select(User).where(User.username == username)).first()
    if user is None:
        raise UserError(f"no user {username!r}")
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
