"""The real GE head CT through a running node with the shipped bundle: what the node says about it.

The synthetic-only default bundle calls this normal CT positive (a known false positive,
test_models_bundle.py). Its input-domain check marks the series OUT OF DOMAIN, and that must reach
the database, the DICOM result objects, the audit trail and the log. The log carries ids only, never
patient data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import REAL_CT
from tests.node_process import NodeProcess
from tests.peers import storescu, wait_for
from tests.resilience_support import db_rows, scalar

pytestmark = [pytest.mark.network, pytest.mark.slow,
              pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"real CT not present at {REAL_CT}")]


def test_the_real_ct_is_marked_outside_the_models_input_domain(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", "serve")  # the shipped default bundle, embedded defaults
    url = f"sqlite:///{tmp_path / 'node' / 'data' / 'triage.sqlite3'}"
    files = sorted(REAL_CT.glob("*.dcm"))
    node.start()
    try:
        r = storescu(node.dicom_port, files)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: scalar(url, "select count(*) from results") == 1, timeout=240, message="the result")
        summary = json.loads(scalar(url, "select summary from results"))
        objects = db_rows(url, "select kind, path from result_objects")
        audit = [json.loads(d) for (d,) in db_rows(url, "select details from audit_events "
                                                        "where event_type = 'inferred'")]
    finally:
        node.stop()
    domain = summary["input_domain"]
    assert domain["in_domain"] is False and domain["distance"] > domain["threshold"], domain
    assert audit and audit[0]["input_domain"] == domain
    assert {kind for kind, _ in objects} >= {"sr", "sc"}, objects
    for kind, rel in objects:
        ds = dcmread(tmp_path / "node" / "data" / "store" / rel, stop_before_pixels=True)
        assert "(OUT OF DOMAIN)" in ds.SeriesDescription, (kind, ds.SeriesDescription)
    log = node.log_path.read_text()
    warnings = [json.loads(line) for line in log.splitlines()
                if line.startswith("{") and "outside the model's input domain" in line]
    assert len(warnings) == 1 and warnings[0]["distance"] == domain["distance"], warnings
    source = dcmread(files[0], stop_before_pixels=True)
    for value in (str(source.get("PatientID", "")), str(source.get("AccessionNumber", ""))):
        assert len(value) < 4 or value not in log, "no patient identifiers in the log"
