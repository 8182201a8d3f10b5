"""Audit trail: hash chain, tamper detection through the real CLI, concurrent writers."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select, text

from storage import audit
from storage.db import make_engine, make_sessionmaker
from storage.models import AuditEvent
from triage.context import AppContext

REPO = Path(__file__).resolve().parent.parent
TRIAGE = str(REPO / ".venv" / "bin" / "triage")


def write_events(ctx: AppContext, n: int) -> None:
    for i in range(n):
        with ctx.sessions.begin() as s:
            audit.record(
                s,
                audit.RECEIVED if i % 2 else audit.DELIVERED,
                study_uid=f"1.2.826.0.1.{i % 3}",
                accession=f"ACC{i % 3}",
                details={"i": i, "when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "ratio": 0.1 * i, "name": "Müller"},
            )


def cli_verify(ctx: AppContext, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "TRIAGE_DATABASE_URL": ctx.engine.url.render_as_string(hide_password=False),
    }
    return subprocess.run([TRIAGE, "audit", "verify"], env=env, capture_output=True, text=True, timeout=120)


def test_chain_links_and_verifies(ctx: AppContext) -> None:
    write_events(ctx, 5)
    with ctx.sessions() as s:
        rows = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert [r.id for r in rows] == [1, 2, 3, 4, 5]
        assert rows[0].prev_hash == ""
        assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:], strict=False))
        assert len({r.hash for r in rows}) == 5
        assert rows[2].details == {"i": 2, "when": "2026-01-01 00:00:00+00:00", "ratio": 0.2, "name": "Müller"}
        assert rows[0].ts.tzinfo is not None
        report = audit.verify(s)
    assert report == audit.VerifyReport(True, 5)


def test_a_database_error_does_not_carry_the_identifiers_it_was_writing(ctx: AppContext) -> None:
    """An error while writing a study (here a duplicate key; in life the connection dropping) is
    logged with its message: the statement's bound values (accession, patient) are not in it."""
    from sqlalchemy.exc import IntegrityError

    from storage.models import Study

    with ctx.sessions.begin() as s:
        s.add(Study(study_uid="1.2.840.99.1", accession="ACC-SECRET-77"))
    with pytest.raises(IntegrityError) as err, ctx.sessions.begin() as s:
        s.add(Study(study_uid="1.2.840.99.1", accession="ACC-SECRET-78"))
    assert "ACC-SECRET" not in str(err.value)  # (PostgreSQL's own DETAIL names the duplicate key, the UID)
    assert "hidden" in str(err.value)  # SQLAlchemy says the parameters were left out


def test_bad_input_is_refused(ctx: AppContext) -> None:
    with ctx.sessions.begin() as s:
        with pytest.raises(ValueError, match="unknown audit event type"):
            audit.record(s, "made_up")
        with pytest.raises(ValueError, match="outcome"):
            audit.record(s, audit.LOGIN, outcome="maybe")


def test_rolled_back_event_leaves_no_gap(ctx: AppContext) -> None:
    write_events(ctx, 2)
    with pytest.raises(RuntimeError), ctx.sessions.begin() as s:
        audit.record(s, audit.LOGIN, actor="alice")
        raise RuntimeError("request failed")
    write_events(ctx, 1)
    with ctx.sessions() as s:
        assert [e.id for e in audit.events(s, newest_first=False)] == [1, 2, 3]
        assert audit.verify(s).ok


def test_several_events_in_one_transaction(ctx: AppContext) -> None:
    with ctx.sessions.begin() as s:
        for actor in ("a", "b", "c"):
            audit.record(s, audit.LOGIN, actor=actor)
    with ctx.sessions() as s:
        assert audit.verify(s) == audit.VerifyReport(True, 3)


def test_edited_row_fails_cli_verify_naming_it(ctx: AppContext, tmp_path: Path) -> None:
    write_events(ctx, 6)
    ok = cli_verify(ctx, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK") and "6 events" in ok.stdout
    with ctx.sessions() as s:  # a clean full run is the audit page's checkpoint: it verifies nothing again
        assert s.scalar(text(f"SELECT value FROM node_settings WHERE key = '{audit.CHECKPOINT_KEY}'")
                        ).startswith("6:")
        assert audit.verify_incremental(s).checked == 0
    with ctx.sessions.begin() as s:
        s.execute(text("UPDATE audit_events SET outcome = 'failure' WHERE id = 4"))
    bad = cli_verify(ctx, tmp_path)
    assert bad.returncode == 1
    assert "event 4" in bad.stdout and "edited" in bad.stdout


def test_edited_row_with_recomputed_hash_is_caught_at_the_next_link(ctx: AppContext) -> None:
    write_events(ctx, 4)
    with ctx.sessions.begin() as s:
        ev = s.get(AuditEvent, 2)
        ev.actor = "mallory"
        fields = {name: getattr(ev, name) for name in audit.HASHED_FIELDS}
        ev.hash = audit.compute_hash(fields, ev.prev_hash)
    with ctx.sessions() as s:
        report = audit.verify(s)
    assert not report.ok and report.bad_id == 3 and "prev_hash" in report.problem


def test_deleted_rows_fail_cli_verify_naming_them(ctx: AppContext, tmp_path: Path) -> None:
    write_events(ctx, 6)
    with ctx.sessions.begin() as s:
        s.execute(text("DELETE FROM audit_events WHERE id = 3"))
    bad = cli_verify(ctx, tmp_path)
    assert bad.returncode == 1
    assert "event 3" in bad.stdout and "missing" in bad.stdout


def test_deleted_newest_row_is_detected(ctx: AppContext) -> None:
    write_events(ctx, 3)
    with ctx.sessions.begin() as s:
        s.execute(text("DELETE FROM audit_events WHERE id = 3"))
    with ctx.sessions() as s:
        report = audit.verify(s)
    assert not report.ok and report.bad_id == 3 and "missing" in report.problem


def test_events_query_filters(ctx: AppContext) -> None:
    write_events(ctx, 6)
    with ctx.sessions.begin() as s:
        audit.record(s, audit.LOGIN_FAILED, actor="bob", outcome=audit.FAILURE)
    with ctx.sessions() as s:
        assert [e.id for e in audit.events(s, event_type=audit.RECEIVED)] == [6, 4, 2]
        assert [e.id for e in audit.events(s, study_uid="1.2.826.0.1.0", newest_first=False)] == [1, 4]
        assert [e.id for e in audit.events(s, accession="ACC2", event_type=[audit.DELIVERED])] == [3]
        assert [e.actor for e in audit.events(s, outcome=audit.FAILURE)] == ["bob"]
        assert [e.id for e in audit.events(s, before_id=3)] == [2, 1]
        assert [e.id for e in audit.events(s, limit=2)] == [7, 6]
        future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        assert audit.events(s, since=future) == []
        assert len(audit.events(s, until=future)) == 7
        assert audit.count(s) == 7


def _writer(url: str, name: str, n: int, go: mp.Event) -> None:  # type: ignore[type-arg]
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    go.wait(60)
    for i in range(n):
        with sessions.begin() as s:
            audit.record(s, audit.RECEIVED, actor=name, details={"i": i})
    engine.dispose()


def test_concurrent_writer_processes_keep_one_linear_chain(ctx: AppContext) -> None:
    url = ctx.engine.url.render_as_string(hide_password=False)
    spawn = mp.get_context("spawn")
    go = spawn.Event()
    procs = [spawn.Process(target=_writer, args=(url, f"p{i}", 25, go)) for i in range(4)]
    for p in procs:
        p.start()
    go.set()
    try:
        for p in procs:
            p.join(180)
        assert [p.exitcode for p in procs] == [0] * 4
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    with ctx.sessions() as s:
        report = audit.verify(s)
        actors = {e.actor for e in audit.events(s, limit=1000)}
    assert report == audit.VerifyReport(True, 100)
    assert actors == {"p0", "p1", "p2", "p3"}


def test_incremental_verification_reads_only_new_events(ctx: AppContext) -> None:
    write_events(ctx, 6)
    with ctx.sessions.begin() as s:
        assert audit.verify_incremental(s) == audit.VerifyReport(True, 6)  # no checkpoint yet: all of them
    write_events(ctx, 2)
    with ctx.sessions.begin() as s:
        assert audit.verify_incremental(s) == audit.VerifyReport(True, 2)  # only the two new ones
    with ctx.sessions.begin() as s:
        assert audit.verify_incremental(s) == audit.VerifyReport(True, 0)
    # Bounded work per call: a backlog is verified over several calls.
    write_events(ctx, 5)
    with ctx.sessions.begin() as s:
        part = audit.verify_incremental(s, max_events=3)
    assert part.ok and part.checked == 3 and "up to event 11 of 13" in part.problem
    with ctx.sessions.begin() as s:
        assert audit.verify_incremental(s, max_events=3) == audit.VerifyReport(True, 2)
    # A new event edited before it is verified: caught.
    write_events(ctx, 2)
    with ctx.sessions.begin() as s:
        s.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE id = 14"))
    with ctx.sessions.begin() as s:
        report = audit.verify_incremental(s)
    assert not report.ok and report.bad_id == 14
    with ctx.sessions.begin() as s:
        s.execute(text("UPDATE audit_events SET actor = 'system' WHERE id = 14"))
        assert audit.verify_incremental(s).ok
    # The checkpoint event itself edited: caught. Older events: left to the full verification.
    with ctx.sessions.begin() as s:
        s.execute(text("UPDATE audit_events SET outcome = 'failure' WHERE id = 15"))
        s.execute(text("UPDATE audit_events SET outcome = 'failure' WHERE id = 3"))
    with ctx.sessions.begin() as s:
        report = audit.verify_incremental(s)
        assert not report.ok and report.bad_id == 15 and "after it was verified" in report.problem
        assert audit.verify(s).bad_id == 3
