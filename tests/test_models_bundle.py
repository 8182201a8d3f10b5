"""The shipped default bundle: manifest, integrity, and the real GE head CT (tilted, uneven spacing)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from triage.labels import LABELS
from triage.models.bundle import PHANTOM_BUNDLE, default_bundle_path, read_manifest, sha256_file
from triage.models.inference import cli_infer, load_bundle, load_dicom_folder

from .conftest import REAL_CT, make_settings

needs_real_ct = pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"real CT not present at {REAL_CT}")


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
    assert m["preprocessing"]["input"] == "brain_window", "the input real windowed slices and DICOM both give"
    assert "phe-sich" in m["training"]["data"] and "real head CT" in m["trained_on"]
    assert "NOT for clinical use" in m["intended_use"]
    # the "any" operating point: sensitivity 0.95 or more on real validation slices (held-out patients),
    # on the scores the node computes (with its HU check)
    op = m["validation"]["operating_points"]["any"]
    assert op["level"] == "slice" and op["sensitivity"] >= 0.95 and m["thresholds"]["any"] == op["threshold"]
    assert m["hu_confirmation"]["hu"] == [44.0, 100.0], "the blood-dense floor of the masks' growth too"
    card = (path / "MODEL_CARD.md").read_text()
    assert "NOT for clinical use" in card and "phe-sich" in card and "synthetic" in card


def test_the_synthetic_bundle_stays_available_for_the_demo() -> None:
    m = read_manifest(PHANTOM_BUNDLE)
    assert "synthetic" in m["trained_on"] and m["preprocessing"].get("input", "hu") == "hu"
    assert load_bundle(PHANTOM_BUNDLE, device="cpu").identity.name == "ich-phantom-unet-gru"


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
    assert "phe-sich" in section["data"] and "phantom" in section["data"]
    assert section["validation_distance"]["in_domain"] >= 0.95
    assert shipped.domain is not None and shipped.domain.threshold == pytest.approx(section["threshold"])


def test_synthetic_test_studies_are_inside_the_input_domain(shipped) -> None:
    """Held-out synthetic studies (test seeds, never used for the fit or its threshold) are inside:
    the model was trained on phantoms too."""
    from triage.imaging.volume import Volume
    from triage.models.data import open_source

    src = open_source("phantom:200000-200002")
    for key in src.keys:
        st = src.load(key)
        z = st.hu.shape[0]
        volume = Volume(hu=st.hu, pixel_spacing=st.pixel_spacing, slice_spacing=st.slice_spacing,
                        positions=np.stack([np.zeros(z), np.zeros(z), np.arange(z) * st.slice_spacing], axis=1))
        d = shipped.predict(volume, gradcam=False).input_domain
        assert d is not None and d["in_domain"], (key, d)


@needs_real_ct
def test_real_ct_is_inside_the_input_domain(shipped) -> None:
    """The real normal CT was never used for the fit or its threshold (real phe-sich and phantom
    studies were); a model trained on real head CT must find a real head CT familiar."""
    pred = shipped.predict(load_dicom_folder(REAL_CT), gradcam=False)
    assert pred.input_domain is not None and not pred.out_of_domain, pred.input_domain


@needs_real_ct
def test_real_ct_deterministic(shipped) -> None:
    volume = load_dicom_folder(REAL_CT)
    a = shipped.predict(volume, gradcam=False)
    b = shipped.predict(volume, gradcam=False)
    assert a.exam_probs == b.exam_probs and np.array_equal(a.slice_probs, b.slice_probs)


@needs_real_ct
def test_cli_infer_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from triage.logging import configure_logging

    configure_logging(make_settings(tmp_path))  # as `triage` does: log lines to stderr, JSON alone on stdout
    rc = cli_infer(argparse.Namespace(path=str(REAL_CT), bundle=""), make_settings(tmp_path))
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slices"] == 28 and out["positive"] is False and set(out["exam_probs"]) == set(LABELS)


def test_cli_infer_bad_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.txt").write_text("not dicom")
    rc = cli_infer(argparse.Namespace(path=str(tmp_path), bundle=""), make_settings(tmp_path))
    assert rc == 2
    assert "error" in json.loads(capsys.readouterr().out)
