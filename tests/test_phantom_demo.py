"""``triage demo`` sends synthetic studies to a DICOM listener: a real DCMTK storescp here
(the node itself is tested elsewhere)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from tests.peers import StoreSCP, free_port
from triage.cli import main as triage_main
from triage.phantom.generator import PhantomOptions

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(shutil.which("storescp") is None, reason="DCMTK not installed"),
]


def test_demo_sends_positive_and_negative_studies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TRIAGE_WEB_PORT", "18080")
    with StoreSCP(tmp_path / "received", aet="ICHTRIAGE") as scp:
        rc = triage_main(["demo", "--studies", "2", "--seed", "11", "--host", "127.0.0.1", "--port", str(scp.port)])
        out = capsys.readouterr().out
        assert rc == 0, out
        files = scp.files()
    assert "http://localhost:18080/" in out and "intraparenchymal" in out
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    by_study: dict[str, list] = {}
    for h in headers:
        by_study.setdefault(str(h.PatientName), []).append(h)
    assert set(by_study) == {"SYNTH^9001", "SYNTH^9002"}
    first = by_study["SYNTH^9001"]
    assert any("LOCALIZER" in h.ImageType for h in first)  # a series for selection to skip
    axial = [h for h in first if "AXIAL" in h.ImageType]
    assert len(axial) >= 16 and len({h.SOPInstanceUID for h in headers}) == len(headers)
    second = by_study["SYNTH^9002"]
    assert {str(h.ConvolutionKernel) for h in second} == {"H30s", "H70h"}  # head and bone kernels
    # the printed counts agree with what arrived
    assert f"{len(first)}/{len(first)} instances stored" in out
    assert f"{len(second)}/{len(second)} instances stored" in out


def test_demo_without_a_listener_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    from triage.phantom import demo

    small = {"options": PhantomOptions(size=128, kind="negative"), "series": ("head",), "syntax": "explicit"}
    monkeypatch.setattr(demo, "plan", lambda n: [small] * n)
    rc = triage_main(["demo", "--studies", "2", "--port", str(free_port())])
    assert rc == 2
    assert "cannot reach the node" in capsys.readouterr().out
