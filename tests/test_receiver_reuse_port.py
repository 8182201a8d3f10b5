"""Several receiver processes on one port (``dicom_reuse_port``, SO_REUSEPORT).

Two real ``triage receiver`` processes share one DICOM port, one file store and one database
(SQLite, and PostgreSQL); twelve DCMTK ``storescu`` associations send one 48-slice series at once.
The kernel spreads the associations over both processes; every instance is recorded exactly once,
the study and the series each have one row (the processes' races on the new rows are settled),
the series counts all 48, it completes and is queued once, and the audit chain verifies.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from storage import audit
from tests.node_process import NodeProcess
from tests.peers import SeriesSpec, dcmtk_env, free_port, make_ct_series, wait_for
from tests.resilience_support import db_rows, engine, scalar

pytestmark = [pytest.mark.network, pytest.mark.slow]

ASSOCIATIONS = 12


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_receivers_share_one_port_and_record_every_instance_once(tmp_path: Path, backend: str,
                                                                      request: pytest.FixtureRequest) -> None:
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=48, size=64))
    port = free_port()
    env = {"TRIAGE_DICOM_REUSE_PORT": "true", "TRIAGE_DICOM_PORT": str(port), "TRIAGE_STABLE_SECONDS": "2",
           "TRIAGE_DATA_DIR": str(tmp_path / "shared-data")}
    if backend == "postgres":
        env["TRIAGE_DATABASE_URL"] = request.getfixturevalue("pg_url")
    url = env.get("TRIAGE_DATABASE_URL") or f"sqlite:///{tmp_path / 'shared-data' / 'triage.sqlite3'}"
    receivers = [NodeProcess(tmp_path / f"rx{i}", "receiver", env=env, name=f"rx{i}") for i in range(2)]
    for rx in receivers:
        rx.dicom_port = port  # one port for both (NodeProcess picks its own otherwise)
    try:
        for rx in receivers:
            rx.start()  # returns once the port answers: for the second, the first already does
            wait_for(lambda rx=rx: "dicom node listening" in rx.tail(200), timeout=60,
                     message=f"{rx.name} listening")
        parts = [paths[i::ASSOCIATIONS] for i in range(ASSOCIATIONS)]
        procs = [subprocess.Popen(["storescu", "-aet", f"MOD{i}", "-aec", "ICHTRIAGE", "127.0.0.1", str(port),
                                   *map(str, part)], env=dcmtk_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for i, part in enumerate(parts)]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out.decode(errors="replace")[-2000:]

        assert scalar(url, "select count(*) from instances") == 48
        assert scalar(url, "select count(distinct sop_instance_uid) from instances") == 48
        assert scalar(url, "select count(*) from studies") == 1
        assert scalar(url, "select count(*) from series") == 1
        assert scalar(url, "select instance_count from series") == 48
        wait_for(lambda: scalar(url, "select count(*) from jobs where kind = 'infer'") == 1, timeout=60,
                 message="the series completed and was queued once")
        # both processes took associations (12 spread by the kernel: all on one has odds 2**-11)
        took: set[str] = set()
        for (details,) in db_rows(url, "select details from audit_events where event_type = 'received'"):
            took.update(_json(details).get("receivers", []))
        assert len(took) == 2, took
        assert all(rx.alive() for rx in receivers)
    finally:
        for rx in receivers:
            rx.stop()
    eng = engine(url)
    try:
        with Session(eng) as s:
            assert audit.verify(s).ok, "one hash chain, written by two processes"
    finally:
        eng.dispose()


def _json(value: object) -> dict:
    import json

    return value if isinstance(value, dict) else json.loads(str(value))
