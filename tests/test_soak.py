"""Reduced soak (the full one is ``bench/soak.py``): 12 small studies through a ``triage serve`` process.

After warm-up the process's RSS stays flat, its open file descriptors do not grow (beyond what
more pooled database connections hold), its database connections stay within the pool's bound and
its SQLite handles within its connections', and every study is accounted for in the audit trail
(each step, every instance, one delivery per result object) and reached the PACS stand-in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import run_soak

pytestmark = [pytest.mark.network, pytest.mark.slow]

STUDIES, WARMUP = 12, 4
POOL_SIZE = 5  # SQLAlchemy QueuePool's default


def test_soak_memory_handles_and_audit_flat(tmp_path: Path) -> None:
    rep = run_soak(tmp_path, STUDIES, log=lambda _msg: None)
    g = rep.growth(WARMUP)
    assert not rep.missing_audit, rep.missing_audit
    assert not rep.undelivered
    assert g["rss_growth_mib"] < 40, (g, [r // 1024 for r in rep.rss_kib])
    # SQLite connections are pooled (SQLAlchemy's QueuePool, which storage.db uses for a database
    # file, keeps up to POOL_SIZE idle): how many are open depends on how many threads met at the
    # database, which a busy host changes (seen: 2 through warm-up, 4 later). A leak is beyond the
    # pool's bound, or descriptors beyond the connections' own.
    conns = rep.per_process["serve"]["db_conns"]
    assert max(conns) <= max(POOL_SIZE, max(conns[:WARMUP + 1])), conns  # no connection leak
    # each connection holds the database and its -wal file; the -shm is mapped once
    assert all(f <= 2 * c + 1 for f, c in zip(rep.db_files, conns, strict=True)), (rep.db_files, conns)
    pooled = 2 * (conns[-1] - conns[min(WARMUP, len(conns) - 1)])  # descriptors of connections opened since
    assert g["fds_end"] <= g["fds_after_warmup"] + 4 + pooled, (g, rep.fds, conns)
    # Per-study accounting: every instance received, one delivered event per result object, none dead.
    assert [a.study_uid for a in rep.accounts if not a.complete] == [], [a for a in rep.accounts if not a.complete]
    assert rep.audit_chain_ok is True
