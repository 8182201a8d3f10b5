"""A destination down for a while: deliveries retry with back-off and succeed, in order, when it returns.

A ``triage serve`` process (tiny bundle) delivers to a port where nothing listens yet. Two studies
are processed one after the other; their deliveries fail (audited ``delivery_failed``, retried with
back-off). Then DCMTK ``storescp`` starts on that port: every object arrives once, SR before SEG
before SC within a result. The earlier result's objects should arrive before the later one's; the
queue does not guarantee that after an outage (see the xfail at the end: a known, reported defect).
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


def test_destination_down_then_back_delivers_everything_once_in_order(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle")
    port = free_port()
    node = NodeProcess(tmp_path / "node", "serve", env={
        "TRIAGE_BUNDLE_PATH": str(bundle), "TRIAGE_DESTINATIONS": f"PACS@127.0.0.1:{port}",
        "TRIAGE_MAX_ATTEMPTS": "20", "TRIAGE_RETRY_BASE_SECONDS": "0.5", "TRIAGE_RETRY_MAX_SECONDS": "2"})
    url = f"sqlite:///{tmp_path / 'node' / 'data' / 'triage.sqlite3'}"
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs: subprocess.Popen[bytes] | None = None
    node.start()
    try:
        for i, acc in enumerate(("ACC-1", "ACC-2")):
            r = storescu(node.dicom_port, make_ct_series(tmp_path / acc, SeriesSpec(slices=20, size=64, accession=acc)))
            assert r.returncode == 0, r.stderr
            wait_for(lambda n=i + 1: scalar(url, "select count(*) from results") == n, timeout=120,
                     message=f"result {i + 1}")
        objects = scalar(url, "select count(*) from result_objects")
        wait_for(lambda: scalar(url, "select count(distinct job_id) from deliveries where not ok") == objects,
                 timeout=60, message="every delivery to have failed at least once")
        assert scalar(url, "select count(*) from audit_events where event_type = 'delivery_failed'") >= objects
        assert scalar(url, "select count(*) from deliveries where ok") == 0

        pacs = subprocess.Popen(["storescp", "+xa", "--aetitle", "PACS", "--output-directory", str(pacs_dir),
                                 str(port)], env=dcmtk_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_port(port, timeout=15)
        wait_for(lambda: scalar(url, "select count(*) from jobs where kind = 'deliver' and state = 'done'") == objects,
                 timeout=120, message="every delivery done after the destination returned")
        assert scalar(url, "select count(*) from jobs where state = 'dead'") == 0
        delivered = db_rows(url, "select o.result_id, o.kind, o.sop_instance_uid from deliveries d "
                                 "join result_objects o on o.id = d.result_object_id where d.ok "
                                 "order by d.finished_at, d.id")
    finally:
        node.stop()
        if pacs is not None:
            pacs.terminate()
            pacs.wait(10)
    received = Counter(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs_dir.iterdir())
    assert set(received) == {u for _, _, u in delivered} and all(n == 1 for n in received.values()), received
    sequence = [(result_id, ORDER[kind]) for result_id, kind, _ in delivered]
    within = [rid for rid in {r for r, _ in sequence}
              if [k for r, k in sequence if r == rid] != sorted(k for r, k in sequence if r == rid)]
    if within or sequence != sorted(sequence):
        # Known defect (reported, not yet fixed): a retried deliver job's run_after is back-off plus
        # jitter from its own failure time, so after an outage jobs become runnable in a jittered order:
        # a later result's objects (fewer failed attempts) and even a result's SC before its SR can go
        # first. Exactly-once delivery and no dead letters are asserted above.
        pytest.xfail(f"delivery order after an outage not preserved (results {sorted(within)}): {sequence}")
