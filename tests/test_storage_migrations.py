"""Migrations: up from empty, down to base, up again; models match; `triage db upgrade` idempotent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from storage.db import normalise_url
from storage.migrate import current_revision, downgrade, head_revision, upgrade
from storage.models import Base

REPO = Path(__file__).resolve().parent.parent
TABLES = set(Base.metadata.tables)


def table_names(url: str) -> set[str]:
    engine = create_engine(normalise_url(url))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def schema_diffs(url: str) -> list:  # noqa: ANN001
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            mc = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
            return compare_metadata(mc, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_and_models_match(db_url: str) -> None:
    assert head_revision() is not None
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    assert table_names(db_url) >= TABLES
    assert schema_diffs(db_url) == []

    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    assert table_names(db_url) & TABLES == set()

    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    assert schema_diffs(db_url) == []

    # The comparison does see drift: drop an index the models declare.
    engine = create_engine(normalise_url(db_url))
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_jobs_claim"))
    finally:
        engine.dispose()
    diffs = schema_diffs(db_url)
    assert [d[0] for d in diffs] == ["add_index"] and diffs[0][1].name == "ix_jobs_claim"


def test_cli_db_upgrade_is_idempotent(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "TRIAGE_DATA_DIR": str(tmp_path / "data"), "TRIAGE_DATABASE_URL": db_url}
    triage = str(REPO / ".venv" / "bin" / "triage")
    first = subprocess.run([triage, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    assert f"database at revision {head_revision()}" in first.stdout
    engine = create_engine(normalise_url(db_url))
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO node_settings (key, value) VALUES ('probe', 'kept')"))
        second = subprocess.run([triage, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=180)
        assert second.returncode == 0, second.stderr
        assert f"database at revision {head_revision()}" in second.stdout
        with engine.connect() as conn:
            assert conn.execute(text("SELECT value FROM node_settings WHERE key = 'probe'")).scalar() == "kept"
            assert conn.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar() == 1
    finally:
        engine.dispose()
    assert schema_diffs(db_url) == []
