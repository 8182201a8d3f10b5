"""Worker resilience with real processes on one PostgreSQL schema: SIGKILL mid-inference.

A ``triage receiver`` and two ``triage worker`` processes share a schema and a file store. The
first worker is slowed inside ``Bundle.predict`` (test hook) and killed with SIGKILL while it holds
the ``infer`` job; after its lease expires (``TRIAGE_LEASE_SECONDS=4``) the second worker takes the
job over and finishes it, and the PACS (DCMTK ``storescp``) receives every result object exactly
once (counted by SOP Instance UID).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.node_process import NodeProcess
from tests.peers import SeriesSpec, StoreSCP, make_ct_series, storescu, wait_for
from tests.resilience_support import build_tiny_bundle, db_rows, scalar, slow_hook_dir

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.postgres]


def test_sigkill_worker_mid_inference_other_worker_finishes_once(tmp_path: Path, pg_url: str) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle")
    hook = slow_hook_dir(tmp_path / "hook")
    paths = make_ct_series(tmp_path / "src", SeriesSpec(slices=20, size=64))
    procs: list[NodeProcess] = []
    with StoreSCP(tmp_path / "pacs", "PACS") as pacs:
        common = {"TRIAGE_DATABASE_URL": pg_url, "TRIAGE_BUNDLE_PATH": str(bundle),
                  "TRIAGE_DESTINATIONS": f"PACS@127.0.0.1:{pacs.port}",
                  "TRIAGE_LEASE_SECONDS": "4", "TRIAGE_HEARTBEAT_SECONDS": "1"}
        work = tmp_path / "node"
        try:
            rx = NodeProcess(work, "receiver", env=common).start()
            procs.append(rx)
            slow = NodeProcess(work, "worker", name="worker-slow", env={
                **common, "TRIAGE_WORKER_ID": "w-slow", "PYTHONPATH": str(hook), "TRIAGE_TEST_SLOW_PREDICT": "600"})
            procs.append(slow.start())
            r = storescu(rx.dicom_port, paths)
            assert r.returncode == 0, r.stderr
            wait_for(lambda: scalar(pg_url, "select lease_owner from jobs where kind = 'infer' and state = 'running'")
                     == "w-slow:infer", timeout=120, message="the slow worker to hold the infer job")
            healthy = NodeProcess(work, "worker", name="worker-ok", env={**common, "TRIAGE_WORKER_ID": "w-ok"})
            procs.append(healthy.start())
            slow.kill()  # SIGKILL while it is inside predict with a live lease

            wait_for(lambda: scalar(pg_url, "select state from jobs where kind = 'infer'") in ("done", "dead"),
                     timeout=180, message="the job to be finished by the other worker")
            assert scalar(pg_url, "select state from series") == "done", healthy.tail()
            job = db_rows(pg_url, "select state, attempts, lease_owner, last_error from jobs where kind = 'infer'")
            assert len(job) == 1 and job[0][0] == "done" and job[0][1] == 2, job
            assert "w-slow:infer" in job[0][3] and "expired" in job[0][3]
            results = db_rows(pg_url, "select job_id from results")
            assert len(results) == 1
            objects = {u for (u,) in db_rows(pg_url, "select sop_instance_uid from result_objects")}
            assert objects
            wait_for(lambda: scalar(pg_url, "select count(*) from jobs where kind = 'deliver' and state = 'done'")
                     == len(objects), timeout=120, message="every result object delivered")
        finally:
            for p in reversed(procs):
                p.stop()
        received = Counter(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs.files())
    assert set(received) == objects
    assert all(n == 1 for n in received.values()), received
