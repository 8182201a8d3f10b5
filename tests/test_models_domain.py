"""Input-domain check (triage/models/domain.py): fit, threshold, bundle file, and the prediction.

Unit tests on Gaussian descriptors, then a tiny bundle (trained on toy heads) fitted on toy studies:
its predictions carry the check, toy heads like the fit are inside, and a head unlike them (another
"scanner": noisier, brighter brain) is outside. The shipped bundle on the real CT is tested in
test_models_bundle.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_models_core import SMALL, tiny_bundle, toy_cache, toy_study, toy_volume  # noqa: F401 (fixtures)
from triage.models import domain
from triage.models.bundle import BundleError, read_manifest, write_manifest
from triage.models.data import Source, cached_studies
from triage.models.inference import load_bundle, prediction_summary, run_networks
from triage.models.preprocess import PreprocessConfig

F = 12


def _gaussian(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(F, F)) / np.sqrt(F)
    return rng.normal(size=(n, F)) @ mix + shift


def test_descriptor_averages_the_intracranial_slices_only() -> None:
    feats = np.array([[100.0, 100.0], [1.0, 2.0], [3.0, 4.0], [-50.0, 7.0]])
    frac = np.array([0.0, 0.5, 0.3, 0.05])
    assert domain.descriptor(feats, frac).tolist() == [2.0, 3.0]
    # No slice inside the skull: the slices with the most intracranial space stand in.
    assert domain.descriptor(feats, np.array([0.0, 0.02, 0.01, 0.02])).tolist() == [-24.5, 4.5]
    with pytest.raises(ValueError, match="must match"):
        domain.descriptor(feats, frac[:3])


def test_fit_sets_the_threshold_on_validation_and_flags_a_shifted_population() -> None:
    check, summary = domain.fit(_gaussian(400, 0), _gaussian(200, 1))
    val = np.array([check.distance(r) for r in _gaussian(200, 1)])
    assert check.threshold == pytest.approx(np.quantile(val, domain.QUANTILE) * domain.MARGIN)
    assert summary["validation_in_domain"] == pytest.approx((val <= check.threshold).mean())
    assert summary["fitted_on_studies"] == 400 and summary["features"] == F
    held = np.array([check.distance(r) for r in _gaussian(500, 2)])
    assert (held <= check.threshold).mean() >= 0.98, "new draws from the same population stay inside"
    shifted = np.array([check.distance(r) for r in _gaussian(100, 3, shift=3.0)])
    assert (shifted > check.threshold).all(), "a population shifted by 3 SD is outside"
    res = check.assess(np.repeat(_gaussian(1, 3, shift=3.0), 4, axis=0), np.ones(4))
    assert res["in_domain"] is False and res["distance"] > res["threshold"]


def test_fit_refuses_too_few_studies_or_bad_settings() -> None:
    with pytest.raises(ValueError, match="at least 10"):
        domain.fit(_gaussian(5, 0), _gaussian(50, 1))
    with pytest.raises(ValueError, match="one width"):
        domain.fit(_gaussian(50, 0), _gaussian(50, 1)[:, :5])
    with pytest.raises(ValueError, match="margin"):
        domain.fit(_gaussian(50, 0), _gaussian(50, 1), margin=0.5)


def test_the_statistics_file_round_trips_and_a_changed_file_is_refused(tmp_path: Path) -> None:
    check, summary = domain.fit(_gaussian(100, 0), _gaussian(50, 1))
    section = domain.save(tmp_path, check, summary, "gaussian test data")
    manifest = {"input_domain": section}
    back = domain.load(tmp_path, manifest, F)
    assert back is not None and back.threshold == pytest.approx(check.threshold, abs=1e-4)
    probe = _gaussian(1, 5)[0]
    assert back.distance(probe) == pytest.approx(check.distance(probe))
    assert domain.load(tmp_path, {}, F) is None, "no section: no check"
    with pytest.raises(BundleError, match="do not match"):
        domain.load(tmp_path, manifest, F + 1)
    (tmp_path / domain.DOMAIN_FILE).write_bytes((tmp_path / domain.DOMAIN_FILE).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="sha256"):
        domain.load(tmp_path, manifest, F)
    (tmp_path / domain.DOMAIN_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        domain.load(tmp_path, manifest, F)


def _other_scanner(seed: int):  # noqa: ANN202
    """A toy head from "another scanner": the brain 25 HU brighter and four times the noise."""
    s = toy_study(seed)
    brain = (s.hu > 0) & (s.hu < 200)
    hu = s.hu + np.where(brain, 25.0, 0.0).astype(np.float32)
    hu += np.random.default_rng(seed).normal(0, 12, hu.shape).astype(np.float32)
    return replace(s, hu=hu.astype(np.float32))


def test_a_fitted_tiny_bundle_flags_a_series_unlike_its_training_studies(
        tiny_bundle: Path, toy_cache: list, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = read_manifest(bundle)
    b = load_bundle(bundle, device="cpu", runtime="torch")
    assert b.domain is None and b.predict(toy_volume(toy_study(3)), gradcam=False).input_domain is None
    cfg = PreprocessConfig.from_dict(manifest["preprocessing"])
    val = cached_studies(Source("toy:100-116", [str(i) for i in range(100, 116)], toy_study, "toy"), cfg,
                         tmp_path / "cache", progress=False)
    with torch.no_grad():
        fit_desc = domain.study_descriptors(b.net, b.seq, toy_cache, cfg, flip=False)
        val_desc = domain.study_descriptors(b.net, b.seq, val, cfg, flip=False)
    check, summary = domain.fit(fit_desc, val_desc)
    manifest["input_domain"] = domain.save(bundle, check, summary, "toy heads")
    write_manifest(bundle, manifest)

    b = load_bundle(bundle, device="cpu", runtime="torch")
    assert b.domain is not None
    # The prediction's descriptor is the one the fit used (same network pass, same slices).
    study = toy_cache[0]
    res = run_networks(b.net, b.seq, study.windows, study.brain_small, cfg)
    frac = study.brain_small.reshape(len(study.brain_small), -1).mean(axis=1)
    assert b.domain.distance(domain.descriptor(res["feat"], frac)) == pytest.approx(
        b.domain.distance(fit_desc[0]), rel=1e-4)
    inside = [b.predict(toy_volume(toy_study(i)), gradcam=False).input_domain for i in range(200, 206)]
    assert all(d is not None and d["in_domain"] for d in inside), inside
    outside = [b.predict(toy_volume(_other_scanner(i)), gradcam=False) for i in range(200, 204)]
    assert all(p.out_of_domain for p in outside), [p.input_domain for p in outside]
    assert json.loads(json.dumps(prediction_summary(outside[0])))["input_domain"]["in_domain"] is False


def test_cli_fits_a_bundle_from_dataset_specs(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    from triage.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    spec = "phantom:{}-{}:size=128,kind=negative"
    rc = main(["domain", str(bundle), "--data", spec.format(0, 10), "--val", spec.format(10, 20),
               "--cache", str(tmp_path / "cache")])
    assert rc == 0
    section = read_manifest(bundle)["input_domain"]
    assert section["fitted_on_studies"] == 10 and section["validation_studies"] == 10
    assert "seeds 0..9" in section["data"] and "seeds 10..19" in section["data"]
    assert 0 < section["validation_distance"]["median"] < section["threshold"]
    assert load_bundle(bundle, device="cpu", runtime="torch").domain is not None
