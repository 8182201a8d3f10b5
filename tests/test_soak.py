"""Reduced soak (the full one is ``bench/soak.py``): 12 small studies through a ``triage serve`` process.

After warm-up the process's RSS stays flat, its open file descriptors and SQLite handles do not
grow, nor do its database connections, and every study is accounted for in the audit trail (each
step, every instance, one delivery per result object) and reached the PACS stand-in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import run_soak

pytestmark = [pytest.mark.network, pytest.mark.slow]

STUDIES, WARMUP = 12, 4


def test_soak_memory_handles_and_audit_flat(tmp_path: Path) -> None:
    rep = run_soak(tmp_path, STUDIES, log=lambda _msg: None)
    g = rep.growth(WARMUP)
    assert not rep.missing_audit, rep.missing_audit
    assert not rep.undelivered
    assert g["rss_growth_mib"] < 40, (g, [r // 1024 for r in rep.rss_kib])
    assert g["fds_end"] <= g["fds_after_warmup"] + 4, (g, rep.fds)
    assert g["db_files_max"] <= max(rep.db_files[:WARMUP + 1]) + 2, rep.db_files
    conns = rep.per_process["serve"]["db_conns"]
    assert max(conns[WARMUP:]) <= max(conns[:WARMUP + 1]) + 1, conns  # no connection leak
    # Per-study accounting: every instance received, one delivered event per result object, none dead.
    assert [a.study_uid for a in rep.accounts if not a.complete] == [], [a for a in rep.accounts if not a.complete]
    assert rep.audit_chain_ok is True
