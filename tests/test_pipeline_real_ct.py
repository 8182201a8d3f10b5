"""The real GE head CT (normal, gantry-tilted, uneven spacing) through a running node with the
shipped bundle, trained on real head CT slices: the node calls it negative and inside the model's
input domain, in the database, the DICOM result objects, the audit trail and the log (no SEG, no
flag, no out-of-domain warning). The log carries ids only, never patient data.
(The synthetic-only bundle called this CT positive and OUT OF DOMAIN.)
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


def test_the_real_ct_is_negative_and_inside_the_models_input_domain(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", "serve")  # the shipped default bundle, embedded defaults
    url = f"sqlite:///{tmp_path / 'node' / 'data' / 'triage.sqlite3'}"
    files = sorted(REAL_CT.glob("*.dcm"))
    node.start()
    try:
        r = storescu(node.dicom_port, files)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: scalar(url, "select count(*) from results") == 1, timeout=240, message="the result")
        summary = json.loads(scalar(url, "select summary from results"))
        positive = bool(scalar(url, "select positive from results"))
        objects = db_rows(url, "select kind, path from result_objects")
        audit = [json.loads(d) for (d,) in db_rows(url, "select details from audit_events "
                                                        "where event_type = 'inferred'")]
    finally:
        node.stop()
    domain = summary["input_domain"]
    assert domain["in_domain"] is True and domain["distance"] <= domain["threshold"], domain
    assert positive is False, summary["exam_probs"]
    assert audit and audit[0]["input_domain"] == domain
    kinds = {kind for kind, _ in objects}
    assert "sr" in kinds and "seg" not in kinds, objects
    for kind, rel in objects:
        ds = dcmread(tmp_path / "node" / "data" / "store" / rel, stop_before_pixels=True)
        assert "OUT OF DOMAIN" not in ds.SeriesDescription, (kind, ds.SeriesDescription)
    log = node.log_path.read_text()
    assert "outside the model's input domain" not in log
    source = dcmread(files[0], stop_before_pixels=True)
    for value in (str(source.get("PatientID", "")), str(source.get("AccessionNumber", ""))):
        assert len(value) < 4 or value not in log, "no patient identifiers in the log"
