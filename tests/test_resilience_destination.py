"""A destination down for a while: deliveries retry with back-off and succeed, in order, when it returns.

A ``triage serve`` process (tiny bundle) delivers to two destinations: ``UP`` (DCMTK ``storescp``
from the start) and ``DOWN`` (nothing listens on its port yet). Two studies are processed one after
the other while ``DOWN`` is away: inference and the deliveries to ``UP`` are not held up. Deliveries
to ``DOWN`` form one lane (storage/queue.py): only its head is attempted, failing (audited
``delivery_failed``) with a destination-level back-off, and the later ones wait behind it without
being attempted; each job has only 2 attempts, and failing to connect spends none, so however many
times the head fails it never dies. Then ``storescp`` starts on ``DOWN``'s port: every object arrives exactly once, in
queue order: priority (positive/STAT first), then oldest first, i.e. SR before SEG before SC within
a result and the earlier result before the later one at equal priority.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.node_process import NodeProcess
from tests.peers import SeriesSpec, dcmtk_env, free_port, make_ct_series, storescu, wait_for, wait_port
from tests.resilience_support import build_tiny_bundle, db_rows, scalar

pytestmark = [pytest.mark.network, pytest.mark.slow]

ORDER = {"sr": 0, "seg": 1, "sc": 2}


def _storescp(port: int, out: Path) -> subprocess.Popen[bytes]:
    out.mkdir(exist_ok=True)
    return subprocess.Popen(["storescp", "+xa", "--output-directory", str(out), str(port)], env=dcmtk_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_destination_down_then_back_delivers_everything_once_in_order(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle")
    down_port, up_port = free_port(), free_port()
    down, up = f"DOWN@127.0.0.1:{down_port}", f"UP@127.0.0.1:{up_port}"
    node = NodeProcess(tmp_path / "node", "serve", env={
        "TRIAGE_BUNDLE_PATH": str(bundle), "TRIAGE_DESTINATIONS": f"{down},{up}",
        "TRIAGE_MAX_ATTEMPTS": "2", "TRIAGE_RETRY_BASE_SECONDS": "0.5",
        "TRIAGE_RETRY_MAX_SECONDS": "2"})
    url = f"sqlite:///{tmp_path / 'node' / 'data' / 'triage.sqlite3'}"
    up_dir, down_dir = tmp_path / "pacs-up", tmp_path / "pacs-down"
    procs = [_storescp(up_port, up_dir)]
    wait_port(up_port, timeout=15)
    node.start()
    try:
        for i, acc in enumerate(("ACC-1", "ACC-2")):
            r = storescu(node.dicom_port, make_ct_series(tmp_path / acc, SeriesSpec(slices=20, size=64, accession=acc)))
            assert r.returncode == 0, r.stderr
            wait_for(lambda n=i + 1: scalar(url, "select count(*) from results") == n, timeout=120,
                     message=f"result {i + 1} (inference is not held up by the down destination)")
        objects = scalar(url, "select count(*) from result_objects")
        # The destination that is up gets everything while the other is down.
        wait_for(lambda: scalar(url, "select count(*) from jobs where kind = 'deliver' and state = 'done' "
                                     "and lane = :l", l=f"dicom:{up}") == objects,
                 timeout=60, message="deliveries to the destination that is up")
        wait_for(lambda: scalar(url, "select count(*) from deliveries where not ok") >= 3,
                 timeout=60, message="the down destination to have failed a few times")
        assert scalar(url, "select count(*) from audit_events where event_type = 'delivery_failed'") >= 3
        # More failures than the 2 attempts a job has: nothing could connect, so no attempt was spent
        # and the head of the lane waits for its destination however long it is away.
        assert scalar(url, "select count(*) from audit_events where event_type = 'delivery_dead'") == 0
        assert scalar(url, "select count(*) from jobs where state = 'dead'") == 0
        assert scalar(url, "select count(*) from deliveries where ok and destination = :d", d=down) == 0
        # Only the head of the lane was attempted; the later deliveries wait without attempts.
        attempted = scalar(url, "select count(distinct job_id) from deliveries where destination = :d", d=down)
        assert attempted == 1, attempted
        assert scalar(url, "select count(*) from jobs where lane = :l and attempts = 0", l=f"dicom:{down}") \
            >= objects - 1  # all of them, or all but the head while it is being tried
        assert scalar(url, "select max(attempts) from jobs where lane = :l", l=f"dicom:{down}") <= 1
        # The lane's back-off is written by the queue just after the delivery row (its own
        # transaction), so it is waited for rather than read at once.
        lane_sql = "select failures, blocked_until from job_lanes where key = :k"
        wait_for(lambda: (row := db_rows(url, lane_sql, k=f"dicom:{down}")) != [] and row[0][0] >= 3
                 and row[0][1] is not None, timeout=30, message="the down lane to back off after 3 failures")

        procs.append(_storescp(down_port, down_dir))
        wait_port(down_port, timeout=15)
        wait_for(lambda: scalar(url, "select count(*) from jobs where kind = 'deliver' and state = 'done'")
                 == 2 * objects, timeout=120, message="every delivery done after the destination returned")
        assert scalar(url, "select count(*) from jobs where state = 'dead'") == 0
        assert db_rows(url, "select failures, blocked_until from job_lanes where key = :k",
                       k=f"dicom:{down}")[0] == (0, None)
        delivered = db_rows(url, "select o.result_id, o.kind, o.sop_instance_uid, j.priority, j.id from deliveries d "
                                 "join result_objects o on o.id = d.result_object_id join jobs j on j.id = d.job_id "
                                 "where d.ok and d.destination = :d order by d.finished_at, d.id", d=down)
    finally:
        node.stop()
        for p in procs:
            p.terminate()
            p.wait(10)
    received = Counter(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in down_dir.iterdir())
    assert set(received) == {row[2] for row in delivered} and all(n == 1 for n in received.values()), received
    assert len(delivered) == objects
    # Queue order: priority first, then oldest (job id) first; the job ids follow result and SR/SEG/SC.
    assert [row[4] for row in delivered] == [row[4] for row in sorted(delivered, key=lambda r: (-r[3], r[4]))]
    for rid in {row[0] for row in delivered}:
        kinds = [ORDER[row[1]] for row in delivered if row[0] == rid]
        assert kinds == sorted(kinds), (rid, kinds)
    if len({row[3] for row in delivered}) == 1:  # equal priority: the earlier result entirely first
        results = [row[0] for row in delivered]
        assert results == sorted(results), results
