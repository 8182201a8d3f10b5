"""Shared fixtures: databases (SQLite and PostgreSQL), a migrated AppContext, settings.

PostgreSQL tests use a throw-away schema in the database named by ``TRIAGE_TEST_POSTGRES_URL``
(default: the local server's ``test`` database), so runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from storage.db import normalise_url
from triage.config import Settings, load_settings
from triage.context import AppContext

PG_URL = os.environ.get("TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REAL_CT = SHARED / "real-ct" / "ge-head-tilted"


def _pg_available() -> bool:
    try:
        eng = create_engine(normalise_url(PG_URL))
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
        return True
    except Exception:
        return False


PG_AVAILABLE = _pg_available()


def make_pg_schema_url() -> tuple[str, str]:
    """Create a fresh schema; return (url with search_path, schema name)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    eng = create_engine(normalise_url(PG_URL), isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    eng.dispose()
    sep = "&" if "?" in PG_URL else "?"
    return f"{normalise_url(PG_URL)}{sep}options=-csearch_path%3D{schema}", schema


def drop_pg_schema(schema: str) -> None:
    eng = create_engine(normalise_url(PG_URL), isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    eng.dispose()


def _pg_schema_url() -> Iterator[str]:
    """A throw-away PostgreSQL schema's URL; fails under CI when the server is not reachable."""
    if not PG_AVAILABLE:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL not reachable at {PG_URL} (CI must start it)")
        pytest.skip("PostgreSQL not reachable")
    url, schema = make_pg_schema_url()
    try:
        yield url
    finally:
        drop_pg_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'triage.sqlite3'}"
        return
    yield from _pg_schema_url()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """An empty PostgreSQL database URL (a throw-away schema), for PostgreSQL-only tests."""
    yield from _pg_schema_url()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for a test: data dir under tmp_path, no disk floor, quick timings."""
    env = {
        "TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "TRIAGE_DISK_FLOOR_MB": "0",
        "TRIAGE_STABLE_SECONDS": "1",
        "TRIAGE_RETRY_BASE_SECONDS": "0.2",
        "TRIAGE_POLL_SECONDS": "0.1",
    }
    for key, value in overrides.items():
        env[f"TRIAGE_{key.upper()}"] = value if isinstance(value, str) else str(value)
    return load_settings(None, env=env)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def ctx(db_url: str, tmp_path: Path) -> Iterator[AppContext]:
    """A migrated AppContext on each database back-end."""
    from storage.migrate import upgrade

    upgrade(db_url)
    context = AppContext(make_settings(tmp_path, database_url=db_url), role="test")
    yield context
    context.close()


@pytest.fixture
def sqlite_ctx(tmp_path: Path) -> Iterator[AppContext]:
    """A migrated AppContext on SQLite only (for tests that are not about the database)."""
    from storage.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'triage.sqlite3'}"
    upgrade(url)
    context = AppContext(make_settings(tmp_path, database_url=url), role="test")
    yield context
    context.close()
