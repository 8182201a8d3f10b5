"""Web work per request against the size of the audit trail: the audit page and ``/metrics``.

    .venv/bin/python bench/web_scale.py [--rows 10000,1000000] [--views 15]

For each size a temporary SQLite database is migrated and filled with that many audit events in
bulk (a valid hash chain, computed here with ``storage.audit.compute_hash``, written with
multi-row INSERTs; most are ``received`` events with ``details.count``), plus a study with a
result and an admin. Then, through the real application (Starlette test client, logged in):

* the first audit views and the first scrape, which verify / count the backlog once and leave a
  checkpoint (the audit chain; at most 100,000 events per view, so a large backlog takes several
  views) and stored totals (the counters);
* ``--views`` further audit views and scrapes, each after 20 new audit events (logins and
  ``received`` events, as a running node adds): their median is the steady-state cost;
* for comparison, the full chain verification that every audit view used to run.

Prints a Markdown table (docs/benchmarks.md, "Web pages at scale").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for triage/storage/reports

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from sqlalchemy import insert, select  # noqa: E402

from storage import audit  # noqa: E402
from storage.db import session_scope  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import AuditEvent, Setting  # noqa: E402

BATCH = 5000  # rows per INSERT statement batch
PASSWORD = "bench password 123"


def bulk_events(ctx: Any, n: int) -> float:
    """Append ``n`` chained audit events in bulk; return the seconds it took."""
    t0 = time.perf_counter()
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with session_scope(ctx.sessions) as s:
        head = s.execute(select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).first()
    prev_id, prev_hash = (head[0], head[1]) if head else (0, audit.GENESIS)
    rows: list[dict[str, Any]] = []
    table = AuditEvent.__table__
    for i in range(n):
        kind = i % 10
        fields = {
            "id": prev_id + 1,
            "ts": base + dt.timedelta(milliseconds=i),
            "event_type": audit.RECEIVED if kind < 8 else (audit.DELIVERED if kind == 8 else audit.VIEWED),
            "actor": "CT_SCANNER" if kind < 8 else "worker",
            "study_uid": f"2.25.{1000 + i // 400}",
            "series_uid": f"2.25.9{1000 + i // 400}" if kind < 8 else "",
            "accession": f"ACC{i // 400:07d}",
            "outcome": audit.SUCCESS,
            "details": {"count": 32} if kind < 8 else {"n": i},
        }
        digest = audit.compute_hash(fields, prev_hash)
        rows.append({**fields, "prev_hash": prev_hash, "hash": digest})
        prev_id, prev_hash = fields["id"], digest
        if len(rows) == BATCH or i == n - 1:
            with ctx.engine.begin() as conn:
                conn.execute(insert(table), rows)
            rows = []
    with session_scope(ctx.sessions) as s:
        s.merge(Setting(key=audit.HEAD_KEY, value=f"{prev_id}:{prev_hash}"))
    return time.perf_counter() - t0


def run(n: int, views: int) -> dict[str, Any]:
    from starlette.testclient import TestClient

    from reports.web.app import create_app
    from tests.conftest import make_settings
    from tests.web_support import add_user, seed_study
    from triage.context import AppContext

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/triage.sqlite3"
        upgrade(url)
        ctx = AppContext(make_settings(Path(tmp), database_url=url), role="bench")
        try:
            add_user(ctx, "admin", "admin", PASSWORD)
            seed_study(ctx, accession="BENCH-1", flagged=True, probabilities={"any": 0.9})
            insert_s = bulk_events(ctx, n)
            with session_scope(ctx.sessions) as s:
                t0 = time.perf_counter()
                report = audit.verify(s)
                full_s = time.perf_counter() - t0
            assert report.ok, report
            with TestClient(create_app(ctx)) as c:
                token = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/login").text).group(1)
                r = c.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token},
                           follow_redirects=False)
                assert r.status_code == 303, r.text

                def timed(path: str) -> float:
                    t = time.perf_counter()
                    resp = c.get(path)
                    assert resp.status_code == 200, resp.status_code
                    return time.perf_counter() - t

                t_first = time.perf_counter()
                catch_up = 1
                while "verified up to event" in c.get("/audit").text:
                    catch_up += 1
                first_audit = time.perf_counter() - t_first
                first_metrics = timed("/metrics")
                page_s, metrics_s = [], []
                for _ in range(views):
                    with session_scope(ctx.sessions) as s:
                        for j in range(20):
                            audit.record(s, audit.RECEIVED if j % 2 else audit.LOGIN, actor="bench",
                                         details={"count": 1})
                    page_s.append(timed("/audit"))
                    metrics_s.append(timed("/metrics"))
                body = c.get("/metrics").text
                assert "verified" in c.get("/audit").text
            received = float(re.search(r"^triage_instances_received_total (\S+)$", body, re.M).group(1))
        finally:
            ctx.close()
    return {"rows": n, "insert_s": insert_s, "full_s": full_s, "first_audit_s": first_audit, "catch_up": catch_up,
            "first_metrics_s": first_metrics, "audit_ms": 1000 * statistics.median(page_s),
            "audit_max_ms": 1000 * max(page_s), "metrics_ms": 1000 * statistics.median(metrics_s),
            "metrics_max_ms": 1000 * max(metrics_s), "received": received}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10000,1000000", help="audit trail sizes, comma-separated")
    p.add_argument("--views", type=int, default=15, help="timed views and scrapes per size")
    args = p.parse_args()
    results = [run(int(n), args.views) for n in args.rows.split(",")]
    print("| audit events | bulk insert s | full chain verify s (each view before) | first views until verified: n, s "
          "| audit view median ms (max) | first scrape s | /metrics median ms (max) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['insert_s']:.1f} | {r['full_s']:.2f} | {r['catch_up']}, {r['first_audit_s']:.2f} "
              f"| {r['audit_ms']:.1f} ({r['audit_max_ms']:.1f}) | {r['first_metrics_s']:.2f} "
              f"| {r['metrics_ms']:.1f} ({r['metrics_max_ms']:.1f}) |")


if __name__ == "__main__":
    main()
