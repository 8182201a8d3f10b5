"""Input-domain check (triage/models/domain.py): fit, threshold, bundle file, and the prediction.

Unit tests on the descriptor and on Gaussian descriptors, then a tiny bundle (trained on toy heads)
fitted on toy studies: its predictions carry the check, toy heads like the fit are inside, and a head
unlike them (another "scanner": partial-volumed bone along the inner table, more noise) is outside.
The shipped bundle on the real CT is tested in test_models_bundle.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tests.test_models_core import SMALL, tiny_bundle, toy_cache, toy_study, toy_volume  # noqa: F401 (fixtures)
from triage.models import domain
from triage.models.bundle import BundleError, read_manifest, sha256_file, write_manifest
from triage.models.data import Source, cached_studies
from triage.models.inference import load_bundle, prediction_summary
from triage.models.preprocess import PreprocessConfig, prepare

F = len(domain.FEATURES)
WINDOWS = ((40.0, 80.0), (80.0, 200.0), (40.0, 380.0))


def _gaussian(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(F, F)) / np.sqrt(F)
    return rng.normal(size=(n, F)) @ mix + shift


def _windows(hu: np.ndarray) -> np.ndarray:
    """(Z, 3, S, S) uint8 windows of an HU array, as preprocessing makes them."""
    return np.stack([np.clip((hu - (c - w / 2)) / w, 0, 1) * 255 for c, w in WINDOWS], axis=1).round().astype(np.uint8)


def test_descriptor_reads_the_intracranial_composition_in_hu() -> None:
    z, size = 6, 64
    hu = np.full((z, size, size), 30.0)
    hu[:, :, :16] = 140.0  # a quarter of the space dense (100-175 HU)
    hu[:, :8, 16:] = -50.0  # some fat
    brain = np.ones((z, size, size), bool)
    brain[0] = False  # a slice outside the skull does not count
    hu[0] = 1000.0
    d = domain.descriptor(_windows(hu), brain, WINDOWS)
    assert d.shape == (F,)
    inner = np.zeros((size, size), bool)
    inner[1:-1, 1:-1] = True  # the mask eroded by one pixel on a 64 px grid
    expect_dense = (hu[1][inner] == 140.0).mean()
    expect_fat = (hu[1][inner] == -50.0).mean()
    assert d[1] == pytest.approx(expect_dense, abs=1e-9) and d[0] == pytest.approx(expect_fat, abs=1e-9)
    assert d[2] == 0.0, "no bone inside"
    noisy = hu + np.random.default_rng(0).normal(0, 6, hu.shape)
    assert domain.descriptor(_windows(noisy), brain, WINDOWS)[8] > d[8] + 1, "noise raises the residual SD"
    with pytest.raises(ValueError, match="must match"):
        domain.descriptor(_windows(hu), brain[:, :10], WINDOWS)
    with pytest.raises(ValueError, match="window settings"):
        domain.descriptor(_windows(hu), brain, WINDOWS[:2])


def test_fit_sets_the_threshold_on_validation_and_flags_a_shifted_population() -> None:
    check, summary = domain.fit(_gaussian(400, 0), _gaussian(200, 1), WINDOWS)
    val = np.array([check.distance(r) for r in _gaussian(200, 1)])
    assert check.threshold == pytest.approx(np.quantile(val, domain.QUANTILE) * domain.MARGIN)
    assert summary["validation_distance"]["in_domain"] == pytest.approx((val <= check.threshold).mean())
    assert summary["fitted_on_studies"] == 400 and summary["features"] == list(domain.FEATURES)
    held = np.array([check.distance(r) for r in _gaussian(500, 2)])
    assert (held <= check.threshold).mean() >= 0.98, "new draws from the same population stay inside"
    shifted = np.array([check.distance(r) for r in _gaussian(100, 3, shift=3.0)])
    assert (shifted > check.threshold).all(), "a population shifted by 3 SD is outside"


def test_fit_refuses_too_few_studies_or_bad_settings() -> None:
    with pytest.raises(ValueError, match="at least 10"):
        domain.fit(_gaussian(5, 0), _gaussian(50, 1), WINDOWS)
    with pytest.raises(ValueError, match="one width"):
        domain.fit(_gaussian(50, 0), _gaussian(50, 1)[:, :5], WINDOWS)
    with pytest.raises(ValueError, match="margin"):
        domain.fit(_gaussian(50, 0), _gaussian(50, 1), WINDOWS, margin=0.5)


def test_the_statistics_file_round_trips_and_a_changed_file_is_refused(tmp_path: Path) -> None:
    check, summary = domain.fit(_gaussian(100, 0), _gaussian(50, 1), WINDOWS)
    section = domain.save(tmp_path, check, summary, "gaussian test data")
    manifest = {"input_domain": section, "preprocessing": {"windows": [list(w) for w in WINDOWS]}}
    back = domain.load(tmp_path, manifest)
    assert back is not None and back.threshold == pytest.approx(check.threshold, abs=1e-4)
    assert back.window_settings == WINDOWS
    probe = _gaussian(1, 5)[0]
    assert back.distance(probe) == pytest.approx(check.distance(probe))
    assert domain.load(tmp_path, {}) is None, "no section: no check"
    path = tmp_path / domain.DOMAIN_FILE
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BundleError, match="sha256"):
        domain.load(tmp_path, manifest)
    from safetensors.numpy import save_file

    save_file({"mean": np.zeros(3)}, str(path))
    with pytest.raises(BundleError, match="statistics of 10"):
        domain.load(tmp_path, {**manifest, "input_domain": {**section, "sha256": sha256_file(path)}})
    path.unlink()
    with pytest.raises(BundleError, match="missing"):
        domain.load(tmp_path, manifest)


def _other_scanner(seed: int):  # noqa: ANN202
    """A toy head from "another scanner": partial-volumed bone (130 HU) along the inner table and
    four times the noise."""
    s = toy_study(seed)
    hu = s.hu.copy()
    brain = (hu > 0) & (hu < 200)
    rim = brain & ~np.stack([ndimage.binary_erosion(b, iterations=3) for b in brain])
    hu[rim] = 130.0
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
    fit_desc = domain.study_descriptors(toy_cache, cfg.windows)
    check, summary = domain.fit(fit_desc, domain.study_descriptors(val, cfg.windows), cfg.windows)
    manifest["input_domain"] = domain.save(bundle, check, summary, "toy heads")
    write_manifest(bundle, manifest)

    b = load_bundle(bundle, device="cpu", runtime="torch")
    assert b.domain is not None
    # The prediction reads the same network input the fit read.
    study = toy_study(int(toy_cache[0].key))
    prep = prepare(study.hu, study.pixel_spacing, cfg)
    assert b.domain.distance(domain.descriptor(prep.windows, prep.brain_small, cfg.windows)) == pytest.approx(
        b.domain.distance(fit_desc[0]), rel=1e-6)
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


def test_training_fits_the_check_into_every_new_bundle(tmp_path: Path) -> None:
    from triage.cli import main

    bundle = tmp_path / "bundle"
    rc = main(["train", "phantom:0-10:size=128", "--val", "phantom:10-20:size=128", "--out", str(bundle),
               "--epochs", "1", "--steps-per-epoch", "1", "--size", "32", "--seq-epochs", "1",
               "--cache", str(tmp_path / "cache"), "--seed", "3"])
    assert rc == 0
    section = read_manifest(bundle)["input_domain"]
    assert section["fitted_on_studies"] == 10 and "seeds 10..19" in section["data"]
    b = load_bundle(bundle, device="cpu", runtime="torch")
    assert b.domain is not None and b.domain.threshold == pytest.approx(section["threshold"])
    # `triage evaluate` says how much of a dataset the check finds like the training studies.
    out = tmp_path / "eval"
    assert main(["evaluate", "phantom:20-23:size=128", "--bundle", str(bundle), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert report["input_domain"]["checked"] == 3 and len(rows) == 3
    assert report["input_domain"]["outside"] == sum(not r["input_domain"]["in_domain"] for r in rows)
    assert report["input_domain"]["distance_max"] == pytest.approx(max(r["input_domain"]["distance"] for r in rows),
                                                                  abs=1e-3)
