"""PostgreSQL stopped and restarted while studies flow (a private server, never the shared one).

A ``triage serve`` process on a PostgreSQL server of the test's own (initdb + pg_ctl on a free
port) processes study A. Study B is queued and being inferred (slowed by the test hook) when the
server is stopped; while it is down, study C's instances are refused (not acknowledged, so the
PACS keeps them and resends). After the restart the node reconnects by itself, the resend of C
is accepted, and every study ends processed with every instance recorded.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node_process import NodeProcess
from tests.peers import SeriesSpec, make_ct_series, storescu, wait_for
from tests.resilience_support import AckingSCU, PrivatePostgres, build_tiny_bundle, pg_bin, scalar, slow_hook_dir

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    if pg_bin() is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pg = PrivatePostgres().init().start()
    try:
        yield pg
    finally:
        pg.destroy()


def test_postgres_restart_loses_nothing_and_unrecorded_instances_are_not_acked(
        tmp_path: Path, private_pg: PrivatePostgres) -> None:
    url = private_pg.url
    bundle = build_tiny_bundle(tmp_path / "bundle")
    hook = slow_hook_dir(tmp_path / "hook")
    studies = {k: make_ct_series(tmp_path / k, SeriesSpec(slices=20, size=64, accession=f"ACC-{k}")) for k in "ABC"}
    node = NodeProcess(tmp_path / "node", "serve", env={
        "TRIAGE_DATABASE_URL": url, "TRIAGE_BUNDLE_PATH": str(bundle), "PYTHONPATH": str(hook),
        "TRIAGE_TEST_SLOW_PREDICT": "3", "TRIAGE_LEASE_SECONDS": "5", "TRIAGE_HEARTBEAT_SECONDS": "1"})
    node.start()
    try:
        assert storescu(node.dicom_port, studies["A"]).returncode == 0
        wait_for(lambda: scalar(url, "select count(*) from series where state = 'done'") == 1, timeout=120,
                 message="study A processed")
        assert storescu(node.dicom_port, studies["B"]).returncode == 0
        wait_for(lambda: scalar(url, "select count(*) from jobs where kind = 'infer'") == 2, timeout=60,
                 message="study B queued")
        private_pg.stop()  # B is queued or inside predict
        scu = AckingSCU(node.dicom_port)
        scu.send(studies["C"][:4])
        assert not scu.acked, "an instance was acknowledged while the database was down"
        assert scu.refused or scu.unanswered
        assert set(scu.refused.values()) <= {0x0110}, scu.refused
        time.sleep(3)  # down a little longer than a lease
        private_pg.start()
        r = storescu(node.dicom_port, studies["C"])  # the PACS resends
        assert r.returncode == 0, r.stderr
        wait_for(lambda: scalar(url, "select count(*) from series where state = 'done'") == 3, timeout=180,
                 message="every study processed after the restart")
        assert scalar(url, "select count(*) from instances") == 60
        assert scalar(url, "select count(*) from results where not superseded") == 3
        assert scalar(url, "select count(*) from jobs where kind = 'infer' and state = 'done'") == 3
        assert node.alive()
    finally:
        node.stop()
