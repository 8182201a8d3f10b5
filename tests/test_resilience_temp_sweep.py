"""Half-written temporary files left in the file store by a crash are swept by the roles.

A real ``triage receiver`` process starts on a data directory holding a crash's leftovers: old
``.tmp-*`` files (removed at start, audited ``temp_swept``, logged) and a fresh one (kept: another
process may be writing it). The periodic pass is the scheduler's ``temp-sweep`` job of a role
started in this process; the web role, which does not write to the store, does not sweep.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from storage import audit
from tests.conftest import make_settings
from tests.node_process import NodeProcess
from tests.resilience_support import db_rows
from triage.roles import TEMP_SWEEP_AGE_S, Role

pytestmark = [pytest.mark.network]


def _leftover(store: Path, rel: str, age_s: float, size: int = 1000) -> Path:
    p = store / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\0" * size)
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_receiver_sweeps_crash_leftovers_at_start(tmp_path: Path) -> None:
    store = tmp_path / "node" / "data" / "store"
    old = [_leftover(store, "instances/1.2.3/1.2.3.4/.tmp-abc.part", 3600),
           _leftover(store, "results/1.2.3/1.2.3.4/.tmp-def.part", TEMP_SWEEP_AGE_S + 30, 500)]
    fresh = _leftover(store, "instances/1.2.3/1.2.3.4/.tmp-live.part", 1)
    kept = _leftover(store, "instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm", 3600)  # a stored instance, not temporary
    node = NodeProcess(tmp_path / "node", "receiver")
    node.start()
    try:
        assert not any(p.exists() for p in old)
        assert fresh.exists() and kept.exists()
        url = f"sqlite:///{tmp_path / 'node' / 'data' / 'triage.sqlite3'}"
        rows = db_rows(url, "select details from audit_events where event_type = 'temp_swept'")
        assert len(rows) == 1
        details = rows[0][0] if isinstance(rows[0][0], dict) else json.loads(rows[0][0])
        assert details["files"] == 2 and details["bytes"] == 1500 and details["at_start"] is True
        assert details["role"] == "receiver"
    finally:
        node.stop()
    logged = [json.loads(line) for line in node.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "temporary files swept" and e.get("files") == 2 for e in logged), node.tail()


def test_periodic_sweep_is_scheduled_and_web_does_not_sweep(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    role = Role(settings, "worker")
    role.start()
    try:
        job = role.scheduler.get_job("temp-sweep")
        assert job is not None and job.trigger.interval.total_seconds() > 0
        leftover = _leftover(settings.store_dir, "results/9.8/9.8.7/.tmp-x.part", 7200, 10)
        job.func()  # the scheduled pass, run now
        assert not leftover.exists()
        with role.ctx.sessions() as s:
            events = [e for e in audit.events(s, newest_first=False) if e.event_type == audit.TEMP_SWEPT]
            assert [e.details["files"] for e in events] == [1] and events[0].details["at_start"] is False
    finally:
        role.stop()

    web = Role(make_settings(tmp_path / "w"), "web")
    leftover = _leftover(web.ctx.settings.store_dir, "results/9.8/9.8.7/.tmp-y.part", 7200, 10)
    web.start()
    try:
        assert web.scheduler.get_job("temp-sweep") is None
        assert leftover.exists()
    finally:
        web.stop()
