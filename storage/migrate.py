"""Alembic migrations, applied by ``triage db upgrade`` and at every role's start."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from alembic import command
from storage.db import is_sqlite, make_engine, normalise_url

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "alembic"))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["url"] = normalise_url(url)
    return cfg


MIGRATION_LOCK_ID = 0x1C4_7A6E  # pg_advisory_lock key: one migrator at a time


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to ``revision``. Safe when several roles start at once on one database:
    PostgreSQL serializes them with an advisory lock; SQLite with its BEGIN IMMEDIATE writer lock."""
    cfg = alembic_config(url)
    if is_sqlite(cfg.attributes["url"]):
        command.upgrade(cfg, revision)
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
            conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
                conn.commit()
    finally:
        engine.dispose()


def downgrade(url: str, revision: str = "-1") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
