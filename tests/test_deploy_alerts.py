"""The Prometheus alerting rules (deploy/prometheus): valid, unit-tested, and about real metrics.

``promtool`` (Debian's ``prometheus`` package, installed by scripts/setup.sh) checks the rules and
runs their unit tests (deploy/prometheus/triage-alerts.test.yml: each alert fires on a made-up
series and stays quiet on a healthy one). Then every metric the rules name must be one that the
node's ``/metrics`` really exports, read from a node with a result, a worker and a delivery.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from reports.web.metrics import make_registry, render
from tests.web_support import heartbeat, seed_study
from triage.context import AppContext

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool (Debian prometheus) is not installed; scripts/setup.sh installs it")
        pytest.skip("promtool not installed")
    return subprocess.run([tool, *args], cwd=RULES, capture_output=True, text=True, timeout=120)


def test_rules_are_valid_and_their_unit_tests_pass() -> None:
    check = _promtool("check", "rules", "triage-alerts.yml")
    assert check.returncode == 0 and "SUCCESS: 7 rules found" in check.stdout, check.stdout + check.stderr
    test = _promtool("test", "rules", "triage-alerts.test.yml")
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_every_metric_the_rules_name_is_exported(sqlite_ctx: AppContext) -> None:
    seed_study(sqlite_ctx, accession="A1", flagged=True, probabilities={"any": 0.9},
               input_domain={"distance": 9.0, "threshold": 6.0, "in_domain": False})
    heartbeat(sqlite_ctx, "host:1:worker", role="worker")
    sqlite_ctx.queue.enqueue("infer", {"series_id": 1, "generation": 0})
    assert make_registry(sqlite_ctx).get_sample_value("triage_destinations_failing") == 0
    sqlite_ctx.queue.enqueue("deliver", {}, lane="dicom:PACS@10.0.0.9:104")  # the PACS is away
    job = sqlite_ctx.queue.claim("w", kinds=["deliver"])
    sqlite_ctx.queue.fail(job.id, "w", "could not connect", lane_down=True, spend_attempt=False)
    assert make_registry(sqlite_ctx).get_sample_value("triage_destinations_failing") == 1
    with sqlite_ctx.sessions.begin() as s:  # its last job given up (or the destination removed): nothing waits
        s.execute(text("update jobs set state = 'dead' where lane = 'dicom:PACS@10.0.0.9:104'"))
    assert make_registry(sqlite_ctx).get_sample_value("triage_destinations_failing") == 0
    exported = {m.group(1) for m in re.finditer(r"^([a-z_]+)(?:\{| )", render(make_registry(sqlite_ctx)).decode(),
                                                  re.MULTILINE)}
    rules = (RULES / "triage-alerts.yml").read_text()
    named = set(re.findall(r"\b(triage_[a-z_]+)", rules))
    assert len(named) >= 6, named
    assert named <= exported, f"rules name metrics the node does not export: {sorted(named - exported)}"
