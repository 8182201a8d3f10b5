"""Models: preprocessing, networks, tiny training, bundle round trip, thresholds, Grad-CAM, metrics.

Uses a tiny network (32x32 grid) and small toy head volumes built here (a skull ellipse with
a brain, ventricles and, for positives, a hyperdense blob) so the whole file runs in seconds. The
shipped bundle and the real CT are tested in test_models_bundle.py.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from triage.imaging.volume import Volume
from triage.labels import LABELS, SUBTYPES
from triage.models import metrics
from triage.models.bundle import BundleError, read_manifest, save_bundle
from triage.models.data import Source, Study, cached_studies
from triage.models.gradcam import gradcam_maps
from triage.models.inference import abc2_ml, decide, exam_scores, load_bundle, run_networks, slice_scores
from triage.models.network import ICHNet, SequenceHead
from triage.models.preprocess import (
    PreprocessConfig,
    intracranial_mask,
    network_input,
    prepare,
    seg_probs_on_input_grid,
)
from triage.models.train import choose_rule_and_thresholds, pick_threshold, train_cnn, train_sequence

N, Z, PX = 96, 12, 2.0
SMALL = PreprocessConfig(size=32)
WIDTHS = (4, 8, 16, 16, 24)


def toy_study(seed: int | str) -> Study:
    """A toy head: skull ring (1000 HU), brain (32 HU), ventricles (8 HU), optional IPH blob (70 HU)."""
    seed = int(seed)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:N, 0:N].astype(np.float32)
    cy, cx = N / 2 + rng.uniform(-4, 4), N / 2 + rng.uniform(-4, 4)
    hu = np.full((Z, N, N), -1000.0, np.float32)
    masks = {s: np.zeros((Z, N, N), bool) for s in SUBTYPES}
    positive = seed % 2 == 1
    bz, by, bx = rng.integers(4, Z - 4), cy + rng.uniform(-10, 10), cx + rng.uniform(-12, 0)
    for z in range(Z):
        r = 1.0 - abs(z - Z / 2) / Z
        e = ((yy - cy) / (38 * r)) ** 2 + ((xx - cx) / (32 * r)) ** 2
        hu[z][e < 1.15] = 1000.0
        hu[z][e < 1.0] = 32.0
        hu[z][(((yy - cy) / 8) ** 2 + ((xx - cx - 6) / 3) ** 2) < 1] = 8.0
        if positive and abs(z - bz) <= 2:
            blob = ((yy - by) ** 2 + (xx - bx) ** 2) < (5 - abs(z - bz)) ** 2
            hu[z][blob] = 70.0
            masks["intraparenchymal"][z] = blob
    hu += rng.normal(0, 3, hu.shape).astype(np.float32)
    sl = np.zeros((Z, 6), np.float32)
    sl[:, 0] = sl[:, 2] = masks["intraparenchymal"].any(axis=(1, 2))
    return Study(str(seed), hu, (PX, PX), 5.0, masks, sl, sl.max(axis=0), "iph" if positive else "normal")


def toy_volume(study: Study) -> Volume:
    z = study.hu.shape[0]
    return Volume(hu=study.hu, pixel_spacing=study.pixel_spacing, slice_spacing=study.slice_spacing,
                  positions=np.stack([np.zeros(z), np.zeros(z), np.arange(z) * 5.0], axis=1))


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory: pytest.TempPathFactory) -> list:
    src = Source("toy:0-16", [str(i) for i in range(16)], toy_study, "toy")
    return cached_studies(src, SMALL, tmp_path_factory.mktemp("cache"), workers=1, progress=False)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, toy_cache: list) -> Path:
    """A tiny model trained briefly on toy studies, saved as a bundle."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    net = ICHNet(SMALL.channels, WIDTHS)
    hist = train_cnn(net, toy_cache, 4, out, torch.device("cpu"), np.random.default_rng(0), False,
                     batch_size=8, lr=5e-3, steps_per_epoch=12, progress=False)
    seq = SequenceHead(net.feat_dim, seg_inputs=len(SUBTYPES))
    from triage.models.train import slice_features

    feats = slice_features(net, toy_cache, torch.device("cpu"), progress=False)
    train_sequence(seq, feats, 2, np.random.default_rng(0), progress=False)
    assert seq.seg_proj is not None and seq.seg_proj.weight.abs().sum() > 0, "it learned from the segmentation"
    manifest = {"name": "tiny", "version": "0", "preprocessing": SMALL.to_dict(),
                "architecture": {"gru_hidden": 48}, "exam_score": "sequence_max",
                "thresholds": dict.fromkeys(LABELS, 0.5), "training": {"history": hist}}
    save_bundle(out, net.eval(), seq.eval(), manifest)
    return out


def test_intracranial_mask_inside_skull() -> None:
    s = toy_study(1)
    m = intracranial_mask(s.hu, s.pixel_spacing)
    assert m.shape == s.hu.shape
    assert m.any()
    assert not (m & (s.hu > 500)).any(), "bone must be outside the intracranial mask"
    assert m[s.masks["intraparenchymal"]].all(), "the bleed lies inside the intracranial mask"
    assert not m[:, 0, :].any() and not m[:, :, 0].any()


def test_intracranial_mask_seals_a_skull_base_ring_with_wide_gaps() -> None:
    """A skull-base slice whose bone ring has two 8 mm gaps (foramina, mastoid air) keeps its
    intracranial space; slices with a closed ring are unchanged by the wider seals."""
    n, ps = 128, 1.0
    yy, xx = np.mgrid[0:n, 0:n] - n / 2
    r = np.hypot(yy, xx)
    brain = np.where(r < 50, 30.0, -1000.0).astype(np.float32)
    slice_ = np.where((r >= 50) & (r < 56), 1000.0, brain).astype(np.float32)
    vol = np.stack([slice_] * 6)
    ang = np.degrees(np.arctan2(yy, xx))
    for a0 in (60.0, -120.0):  # 8 mm of arc at r = 53 mm is ~8.6 degrees
        gap = (r >= 49) & (r < 57) & (np.abs(ang - a0) < 4.5)
        vol[2][gap] = -1000.0
    m = intracranial_mask(vol, (ps, ps))
    areas = m.sum(axis=(1, 2))
    assert areas[2] > 0.9 * areas[0] > 0, "the open ring's slice keeps its intracranial space"
    assert areas[0] == areas[1] == areas[3], "closed rings are unchanged"
    assert not m[:, 0, :].any() and not (m & (vol > 250)).any()


def _craniectomy_head(n: int = 256, ps: float = 0.8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One slice: scalp (40 HU), skull (1000 HU), brain (32 HU) with a 70 HU bleed under a missing
    110-degree bone flap (the brain bulges into the defect under the scalp), and a 12 mm temporalis
    (50 HU) outside the intact skull on the far side. Returns (hu, brain, bleed, muscle)."""
    yy, xx = (np.mgrid[0:n, 0:n] - n / 2) * ps
    r, ang = np.hypot(yy, xx), np.degrees(np.arctan2(yy, xx))
    flap = np.abs(ang) < 55  # the missing flap, on the +x side
    hu = np.full((n, n), -1000.0, np.float32)
    hu[r < 86] = 40.0  # scalp
    muscle = (r >= 80) & (r < 92) & (np.abs(ang) > 120)
    hu[muscle | ((r >= 86) & (r < 95) & (np.abs(ang) > 115))] = 40.0  # the scalp over it
    hu[muscle] = 50.0
    hu[(r >= 72) & (r < 80) & ~flap] = 1000.0
    brain = (r < 72) | (flap & (r < 79))
    hu[brain] = 32.0
    bleed = (np.hypot(yy, xx - 60) < 12) & brain
    hu[bleed] = 70.0
    return hu, brain, bleed, muscle


def test_intracranial_mask_takes_the_skull_hull_where_a_flap_is_missing() -> None:
    """A craniectomy opens the bone ring over more than any closing seals: the slice's cavity came
    out empty (13 of 72 real masked post-operative slices), the slice counted as a cap and its bleed
    was never read. The open-skull fallback keeps the brain and the bleed under the defect, and
    nothing outside the intact skull (a thick temporalis)."""
    hu, brain, bleed, muscle = _craniectomy_head()
    vol = np.stack([hu] * 3)
    m = intracranial_mask(vol, (0.8, 0.8))
    assert m[1][bleed].mean() > 0.95, "the bleed under the missing flap is inside"
    assert m[1][brain].mean() > 0.85
    assert not (m & (vol > 250)).any() and not m[:, 0, :].any()
    assert not m[1][muscle].any(), "the temporalis outside the intact skull stays out"


def test_open_skull_fallback_refuses_skull_base_and_neck_slices() -> None:
    """A slice whose skull hull is mostly air, bone and soft tissue of the face (a skull base), or
    muscle around a mandible and a vertebra (a neck), is not opened."""
    from triage.models.preprocess import open_skull_cavity

    n, ps = 256, 0.8
    yy, xx = (np.mgrid[0:n, 0:n] - n / 2) * ps
    r, ang = np.hypot(yy, xx), np.degrees(np.arctan2(yy, xx))
    hu = np.full((n, n), -1000.0, np.float32)
    hu[r < 80] = 40.0
    rng = np.random.default_rng(0)
    hu[(r < 76) & (rng.random((n, n)) < 0.35)] = 1000.0  # petrous bone and sinus walls everywhere
    hu[(r < 76) & (rng.random((n, n)) < 0.35)] = -800.0  # air cells
    hu[(r >= 72) & (r < 78) & (ang > 0)] = 1000.0
    assert open_skull_cavity(hu, ps) is None
    neck = np.full((n, n), -1000.0, np.float32)
    neck[r < 90] = (52.0 + rng.normal(0, 6, (n, n)))[r < 90]  # muscle
    neck[(r >= 75) & (r < 82) & (ang < -30) & (ang > -150)] = 1000.0  # the mandible's arc
    neck[np.hypot(yy - 60, xx) < 12] = 1000.0  # a vertebra
    assert open_skull_cavity(neck, ps) is None  # (its hull is large and bone-poor: its density refuses it)
    craniectomy = _craniectomy_head()[0]
    assert open_skull_cavity(craniectomy, ps) is not None


def test_prepare_shapes_and_channels() -> None:
    s = toy_study(3)
    p = prepare(s.hu, s.pixel_spacing, SMALL)
    assert p.windows.shape == (Z, 3, 32, 32) and p.windows.dtype == np.uint8
    assert p.brain_small.shape == (Z, 32, 32)
    y0, y1, x0, x1 = p.box
    assert 0 <= y0 < y1 <= N and 0 <= x0 < x1 <= N
    x = network_input(p.windows, SMALL.context)
    assert x.shape == (Z, SMALL.channels, 32, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # neighbour channels: the brain window of slice z-1 and z+1, edges repeated
    assert torch.equal(x[1:, 3], x[:-1, 0]) and torch.equal(x[0, 3], x[0, 0])
    assert torch.equal(x[:-1, 4], x[1:, 0])
    # skull stripped: nothing outside the intracranial mask (grown by one pixel for the area resampling)
    from scipy import ndimage

    grown = ndimage.binary_dilation(p.brain_small, structure=np.ones((1, 3, 3), bool))
    assert not (p.windows[:, 0][~grown] > 0).any()


def test_network_shapes_and_label_order() -> None:
    net = ICHNet(5, WIDTHS).eval()
    with torch.no_grad():
        out = net(torch.rand(3, 5, 32, 32))
    assert out["seg"].shape == (3, len(SUBTYPES), 32, 32)
    assert out["slice"].shape == (3, len(LABELS))
    seq = SequenceHead(net.feat_dim).eval()
    with torch.no_grad():
        y = seq(out["feat"][None], out["slice"][None])
    assert y.shape == (1, 3, 6)
    # the untrained sequence head starts from the slice network's answer (zero-initialised residual)
    assert torch.allclose(y[0], out["slice"])
    assert LABELS[0] == "any" and LABELS[1:] == SUBTYPES


def test_tiny_training_lowers_loss(tiny_bundle: Path) -> None:
    hist = read_manifest(tiny_bundle)["training"]["history"]
    assert len(hist) == 4
    assert hist[-1]["loss"] < hist[0]["loss"] * 0.8, hist
    assert (tiny_bundle / "checkpoints" / "cnn.pt").exists()


def test_resume_continues_from_checkpoint(tmp_path: Path, toy_cache: list) -> None:
    out = tmp_path / "b"
    net = ICHNet(SMALL.channels, WIDTHS)
    train_cnn(net, toy_cache, 1, out, torch.device("cpu"), np.random.default_rng(1), False,
              batch_size=4, steps_per_epoch=2, progress=False)
    net2 = ICHNet(SMALL.channels, WIDTHS)
    hist = train_cnn(net2, toy_cache, 2, out, torch.device("cpu"), np.random.default_rng(1), True,
                     batch_size=4, steps_per_epoch=2, progress=False)
    assert [h["epoch"] for h in hist] == [1, 2]


def test_bundle_round_trip_and_sha256(tiny_bundle: Path, tmp_path: Path) -> None:
    b = load_bundle(tiny_bundle, device="cpu")
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert b.identity.sha256 == manifest["weights"]["sha256"]
    assert b.identity.name == "tiny" and manifest["labels"] == list(LABELS)
    vol = toy_volume(toy_study(5))
    p1 = b.predict(vol)
    p2 = load_bundle(tiny_bundle, device="cpu").predict(vol)
    assert p1.exam_probs == p2.exam_probs, "loading twice must give identical outputs"
    assert np.array_equal(p1.slice_probs, p2.slice_probs)
    # a tampered weights file is refused
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bad)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "nowhere")
    odd = tmp_path / "odd-rule"
    shutil.copytree(tiny_bundle, odd)
    (odd / "manifest.json").write_text(json.dumps({**manifest, "exam_score": {"any": "median"}}))
    with pytest.raises(BundleError, match="exam_score"):
        load_bundle(odd)


def test_predict_fills_every_field_in_volume_geometry(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle, device="cpu", thresholds_override=dict.fromkeys(LABELS, 0.0))
    study = toy_study(7)
    pred = b.predict(toy_volume(study))
    assert set(pred.exam_probs) == set(LABELS) and set(pred.present) == set(LABELS)
    assert all(0.0 <= v <= 1.0 for v in pred.exam_probs.values())
    assert pred.slice_probs.shape == (Z, 6) and pred.slice_probs.dtype == np.float32
    assert pred.positive
    for sub, m in pred.masks.items():
        assert sub in SUBTYPES and m.shape == study.hu.shape and m.dtype == bool  # every subtype called: no "any" rest
        assert not (m & ~pred.brain_mask).any()
    assert set(pred.volumes_ml) == set(SUBTYPES) | {"any"} and set(pred.abc2_ml) == set(SUBTYPES) | {"any"}
    vox = toy_volume(study).voxel_volume_ml
    union = np.zeros(study.hu.shape, bool)
    for m in pred.masks.values():
        union |= m
    assert pred.volumes_ml["any"] == pytest.approx(union.sum() * vox)
    assert set(pred.timings) == {"preprocess", "detection", "segmentation", "gradcam"}
    assert pred.bundle == b.identity
    for lab, zs in pred.key_slices.items():
        assert pred.present[lab] and zs and all(0 <= z < Z for z in zs)


def test_a_brain_window_bundle_finds_the_intracranial_space_beside_the_network() -> None:
    """The default bundle computes the HU intracranial mask on a second thread while its network
    reads the series: the prediction holds the same mask and per-slice areas as preprocessing that
    computes it in line, and the network input does not depend on it."""
    from triage.models.bundle import DEFAULT_BUNDLE

    b = load_bundle(DEFAULT_BUNDLE, device="cpu")
    vol = toy_volume(toy_study(7))
    keep: dict = {}
    pred = b.predict(vol, keep=keep)
    in_line = prepare(vol.hu, vol.pixel_spacing, b.cfg)
    assert in_line.brain_mask.any() and np.array_equal(pred.brain_mask, in_line.brain_mask)
    assert np.array_equal(keep["prep"].extra["intracranial_cm2"], in_line.extra["intracranial_cm2"])
    assert not np.isnan(in_line.extra["intracranial_cm2"]).any()
    deferred = prepare(vol.hu, vol.pixel_spacing, b.cfg, intracranial=False)
    assert np.isnan(deferred.extra["intracranial_cm2"]).all(), "left to the caller"
    assert np.array_equal(deferred.windows, in_line.windows) and deferred.box == in_line.box
    assert set(pred.timings) == {"preprocess", "detection", "segmentation", "gradcam"}


def test_blood_under_an_uncalled_subtype_is_kept_as_any(tiny_bundle: Path) -> None:
    """A positive exam's blood that the network segments under a subtype that is not called is
    ``masks["any"]`` (the total counts it, the SEG gets an "Intracranial hemorrhage" segment); it
    was dropped before, so a called haematoma could report a fraction of the blood seen."""
    b = load_bundle(tiny_bundle, device="cpu")
    study = toy_study(7)
    keep: dict = {}
    b.predict(toy_volume(study), gradcam=False, keep=keep)
    prep, logits = keep["prep"], np.full_like(keep["outputs"]["seg_logits"], -10.0)
    z, h = Z // 2, logits.shape[-1]
    iph, ivh = SUBTYPES.index("intraparenchymal"), SUBTYPES.index("intraventricular")
    logits[z, iph, h // 2 - 4 : h // 2, h // 2 - 4 : h // 2 + 4] = 10.0
    logits[z, ivh, h // 2 : h // 2 + 4, h // 2 - 4 : h // 2 + 4] = 10.0
    called = dict.fromkeys(LABELS, False) | {"any": True, "intraparenchymal": True}
    masks = b.build_masks(study.hu, prep, logits, called, refine_hu=False)
    assert set(masks) == {"intraparenchymal", "any"}
    assert masks["intraparenchymal"][z].any() and masks["any"][z].any()
    assert not (masks["any"] & masks["intraparenchymal"]).any()
    assert not masks["any"][np.arange(Z) != z].any()
    every = dict.fromkeys(LABELS, True)
    assert "any" not in b.build_masks(study.hu, prep, logits, every, refine_hu=False)
    assert b.build_masks(study.hu, prep, logits, dict.fromkeys(LABELS, False), refine_hu=False) == {}


def test_grow_into_blood_fills_the_bleed_and_stops_at_its_reach() -> None:
    """A seed inside a 70 HU bleed grows to the whole bleed (not into 32 HU brain); dense tissue
    beyond the reach (a dural sinus 20 mm away) and outside the brain stays out."""
    from triage.models.inference import grow_into_blood

    n, px = 128, 0.5
    yy, xx = np.mgrid[0:n, 0:n]
    hu = np.full((1, n, n), 32.0, np.float32)
    bleed = np.hypot(yy - 64, xx - 50) < 10
    sinus = np.hypot(yy - 64, xx - 100) < 6  # 40 px = 20 mm from the bleed's edge... and dense
    hu[0][bleed | sinus] = 70.0
    brain = np.ones((1, n, n), bool)
    seed = np.zeros((1, n, n), bool)
    seed[0, 62:67, 48:53] = True
    out = grow_into_blood(hu, brain, seed, px, 8.0, (44.0, 100.0))
    assert out[0][bleed].mean() > 0.95 and not out[0][~bleed].any()
    outside = brain.copy()
    outside[0, :, :50] = False  # half the bleed lies outside the intracranial space
    part = grow_into_blood(hu, outside, seed, px, 8.0, (44.0, 100.0))
    assert not part[0][:, :48].any() and part[0][bleed & outside[0]].mean() > 0.9
    assert (grow_into_blood(hu, brain, seed, px, 1.0, (44.0, 100.0)).sum() < out.sum()), "the reach limits"


def test_a_bundle_that_asks_for_growth_grows_its_masks_apart_and_only_on_hu(tiny_bundle: Path,
                                                                           tmp_path: Path) -> None:
    """``mask_refinement.grow`` in the manifest: a mask seeded on part of a 70 HU bleed takes in the
    rest of it; two subtypes seeded side by side in one bleed stay disjoint; nothing grows where the
    values are not HU (``grow=False``) or for a bundle that does not ask."""
    grown_bundle = tmp_path / "grow"
    shutil.copytree(tiny_bundle, grown_bundle)
    manifest = json.loads((grown_bundle / "manifest.json").read_text())
    manifest["mask_refinement"] = {**manifest.get("mask_refinement", {}), "hu_range": True,
                                   "grow": {"mm": 8.0, "hu": [44.0, 100.0]}}
    (grown_bundle / "manifest.json").write_text(json.dumps(manifest))
    plain, grows = load_bundle(tiny_bundle, device="cpu"), load_bundle(grown_bundle, device="cpu")
    study = toy_study(7)
    bleed = study.masks["intraparenchymal"]
    z = int(np.argmax(bleed.sum(axis=(1, 2))))
    keep: dict = {}
    plain.predict(toy_volume(study), gradcam=False, keep=keep)
    prep = keep["prep"]
    logits = np.full_like(keep["outputs"]["seg_logits"], -10.0)
    ys, xs = np.nonzero(bleed[z])
    cy, cx = int(ys.mean()), int(xs.mean())
    iph, ivh = SUBTYPES.index("intraparenchymal"), SUBTYPES.index("intraventricular")
    gy, gx = int((cy - prep.box[0]) * logits.shape[-1] / (prep.box[1] - prep.box[0])), \
        int((cx - prep.box[2]) * logits.shape[-1] / (prep.box[3] - prep.box[2]))
    logits[z, iph, gy - 1 : gy + 1, gx - 1 : gx] = 10.0
    logits[z, ivh, gy - 1 : gy + 1, gx : gx + 1] = 10.0
    called = dict.fromkeys(LABELS, False) | {"any": True, "intraparenchymal": True, "intraventricular": True}
    before = plain.build_masks(study.hu, prep, logits, called, refine_hu=True, grow=True)
    after = grows.build_masks(study.hu, prep, logits, called, refine_hu=True, grow=True)
    not_hu = grows.build_masks(study.hu, prep, logits, called, refine_hu=True, grow=False)
    seeded = before["intraparenchymal"][z] | before["intraventricular"][z]
    assert seeded.any() and seeded.sum() < 0.6 * bleed[z].sum()
    union = after["intraparenchymal"][z] | after["intraventricular"][z]
    assert union[bleed[z]].mean() > 0.85 and not union[~bleed[z]].any()
    assert not (after["intraparenchymal"] & after["intraventricular"]).any(), "grown masks stay disjoint"
    for label in before:
        assert np.array_equal(before[label], not_hu[label])


def test_thresholds_applied_and_overridden(tiny_bundle: Path) -> None:
    vol = toy_volume(toy_study(9))
    hi = load_bundle(tiny_bundle, device="cpu", thresholds_override=dict.fromkeys(LABELS, 1.0)).predict(vol)
    assert not hi.positive and not any(hi.present.values()) and hi.masks == {} and hi.heatmaps == {}
    assert hi.volumes_ml["any"] == 0.0 and hi.thresholds["any"] == 1.0
    lo = load_bundle(tiny_bundle, device="cpu", thresholds_override={"any": 0.0}).predict(vol)
    assert lo.positive and lo.thresholds["any"] == 0.0 and lo.thresholds["subdural"] == 0.5
    assert any(lo.present[s] for s in SUBTYPES), "a positive exam names at least one subtype"
    with pytest.raises(ValueError, match="unknown label"):
        load_bundle(tiny_bundle, thresholds_override={"bleed": 0.2})
    with pytest.raises(ValueError, match="within"):
        load_bundle(tiny_bundle, thresholds_override={"any": 1.5})


def test_gradcam_non_empty_inside_intracranial_space(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle, device="cpu", thresholds_override=dict.fromkeys(LABELS, 0.0))
    pred = b.predict(toy_volume(toy_study(11)))
    assert pred.heatmaps, "positive labels get heatmaps"
    for lab, hm in pred.heatmaps.items():
        assert hm.shape == (Z, N, N) and hm.dtype == np.float32
        assert float(hm.max()) == pytest.approx(1.0) and float(hm.min()) >= 0.0
        assert not (hm[~pred.brain_mask] > 0).any(), "maps are zero outside the intracranial space"
        assert (hm > 0).any(axis=(1, 2))[pred.key_slices[lab]].any()


def test_decide_hierarchy() -> None:
    thr = dict.fromkeys(LABELS, 0.5)
    exam = {"any": 0.4, "epidural": 0.9, "intraparenchymal": 0.1, "intraventricular": 0.1,
            "subarachnoid": 0.1, "subdural": 0.1}
    assert not any(decide(exam, thr).values())
    exam["any"] = 0.6
    exam["epidural"] = 0.3
    p = decide(exam, thr)
    assert p["any"] and p["epidural"] and sum(p.values()) == 2


def test_exam_score_rules() -> None:
    sp = np.array([[0.1, 0.2, 0.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.6, 0.0, 0.0, 0.0]], np.float32)
    sm = np.array([[0.0, 0.9, 0.0, 0.0, 0.0], [0.2, 0.1, 0.0, 0.0, 0.0]], np.float32)
    assert exam_scores(sp, sm, "sequence_max").tolist() == pytest.approx([0.7, 0.2, 0.6, 0, 0, 0])
    assert exam_scores(sp, sm, "segmentation_max").tolist() == pytest.approx([0.9, 0.2, 0.9, 0, 0, 0])
    assert exam_scores(sp, sm, "mean")[0] == pytest.approx(0.8)
    assert exam_scores(sp, sm, "max").tolist() == pytest.approx([0.9, 0.2, 0.9, 0, 0, 0])
    # a rule per label; a label left out keeps sequence_max
    per = exam_scores(sp, sm, {"any": "mean", "intraparenchymal": "max"})
    assert per.tolist() == pytest.approx([0.8, 0.2, 0.9, 0, 0, 0])
    assert exam_scores(sp, sm, {"intraparenchymal": "sequence_max"})[2] == pytest.approx(0.6)
    # per-slice scores under each rule: their maximum is the exam score (one threshold for both)
    for rule in ("sequence_max", "segmentation_max", "max", {"any": "segmentation_max"}):
        assert slice_scores(sp, sm, rule).max(axis=0).tolist() == pytest.approx(exam_scores(sp, sm, rule).tolist())
    assert slice_scores(sp, sm, "segmentation_max")[:, 0].tolist() == pytest.approx([0.9, 0.2])
    with pytest.raises(ValueError):
        exam_scores(sp, sm, "median")
    with pytest.raises(ValueError, match="unknown labels"):
        exam_scores(sp, sm, {"bleed": "mean"})


def test_abc2_of_an_ellipsoid() -> None:
    # ellipsoid with semi-axes 20, 10 mm in-plane and 15 mm along z: V = 4/3 pi abc = 12.57 mL
    z, y, x = np.mgrid[-20:21, -40:41, -40:41].astype(float)
    m = (x * 0.5 / 20) ** 2 + (y * 0.5 / 10) ** 2 + (z * 1.0 / 15) ** 2 <= 1
    est = abc2_ml(m, (0.5, 0.5), 1.0)
    exact = 4 / 3 * math.pi * 20 * 10 * 15 / 1000
    assert est == pytest.approx(exact, rel=0.1)  # ABC/2 = pi/6 abc ~ the true ellipsoid volume
    assert abc2_ml(np.zeros((3, 4, 4), bool), (1, 1), 1) == 0.0


def test_metrics_known_values() -> None:
    y = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert metrics.roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert math.isnan(metrics.roc_auc(np.zeros(3), np.ones(3)))
    fpr, tpr, _ = metrics.roc_curve(y, np.array([0.1, 0.4, 0.35, 0.8]))
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    assert metrics.sens_spec(y, np.array([0.1, 0.4, 0.35, 0.8]), 0.3) == (1.0, 0.5)
    ll = metrics.weighted_log_loss(np.array([[1, 0, 0, 0, 0, 0]]), np.full((1, 6), 0.5))
    assert ll == pytest.approx(math.log(2))
    assert metrics.dice(np.ones(4, bool), np.array([1, 1, 0, 0], bool)) == pytest.approx(2 / 3)


def test_cluster_bootstrap_draws_patients_not_slices() -> None:
    """The interval resamples whole patients: 30 patients of 30 identical slices give the interval of 30
    observations, much wider than 900 independent slices would, and it holds the point estimate."""
    rng = np.random.default_rng(0)
    per_patient = rng.random(30) < 0.6  # each patient's slices all called, or all missed
    called = np.repeat(per_patient, 30)
    patients = np.repeat(np.arange(30), 30)
    lo, hi = metrics.cluster_bootstrap(patients, lambda i: float(called[i].mean()))
    slo, shi = metrics.cluster_bootstrap(np.arange(900), lambda i: float(called[i].mean()))
    assert lo <= called.mean() <= hi and slo <= called.mean() <= shi
    assert (hi - lo) > 3 * (shi - slo), "correlated slices do not count as independent evidence"
    assert metrics.cluster_bootstrap(patients, lambda i: float(called[i].mean()), seed=0) == (lo, hi), "seeded"
    # undefined (AUC needs both classes; no patient bleeds): no interval rather than a made-up one
    y = np.zeros(900, bool)
    assert metrics.cluster_bootstrap(patients, lambda i: metrics.roc_auc(y[i], rng.random(i.size))) is None


def test_the_study_report_gives_each_auc_an_interval() -> None:
    """``triage evaluate`` on studies: each label's AUC comes with a bootstrap interval over the studies
    that holds it; a label without both classes has neither."""
    from triage.models import evaluate

    rows = [{"truth": [t, 0, 0, 0, 0, 0], "probs": [p] + [0.1] * 5, "present": [p > 0.5] + [False] * 5,
             "volume_true": None, "kind": "plain", "timings": {}}
            for t, p in [(1, 0.9), (0, 0.2), (1, 0.6), (0, 0.7), (1, 0.8), (0, 0.1)]]
    report = evaluate.summarise(rows, dict.fromkeys(LABELS, 0.5))
    a = report["per_label"]["any"]
    assert a["auc"] == pytest.approx(8 / 9, abs=1e-4) and a["auc_ci95"][0] <= a["auc"] <= a["auc_ci95"][1] == 1.0
    assert a["auc_ci95"][0] < 0.8, "six studies: a wide interval"
    assert report["per_label"]["subdural"]["auc"] is None and report["per_label"]["subdural"]["auc_ci95"] is None


def test_threshold_selection_for_full_sensitivity() -> None:
    scores = np.array([0.05, 0.2, 0.3, 0.6, 0.9])
    truth = np.array([0, 0, 1, 1, 1])
    t = pick_threshold(scores, truth, 1.0)
    assert t == pytest.approx(0.3) and metrics.sens_spec(truth, scores, t)[0] == 1.0
    sc = np.tile(scores[:, None], (1, 6))
    tr = np.tile(truth[:, None], (1, 6))
    sel = choose_rule_and_thresholds({"sequence_max": sc, "mean": sc * 0.5}, tr)
    assert sel["rule"] == "sequence_max" and sel["operating_points"]["any"]["sensitivity"] == 1.0


def test_a_rule_per_label_is_chosen_on_each_labels_own_auc() -> None:
    rng = np.random.default_rng(0)
    truth = (rng.random((40, 6)) < 0.4).astype(int)
    noise = rng.random((40, 6))
    good, poor = truth * 0.5 + noise * 0.6, noise  # "good" ranks well; "poor" is chance
    seq, seg = good.copy(), poor.copy()
    seq[:, 1], seg[:, 1] = poor[:, 1], good[:, 1]  # the segmentation is better for epidural only
    scores = {"sequence_max": seq, "segmentation_max": seg}
    one = choose_rule_and_thresholds(scores, truth, 0.95)
    assert one["rule"] == "sequence_max"
    per = choose_rule_and_thresholds(scores, truth, 0.95, per_label=True)
    assert per["rule"] == {lab: "segmentation_max" if lab == "epidural" else "sequence_max" for lab in LABELS}
    # each threshold is picked on the score of the label's own rule
    assert per["thresholds"]["epidural"] == pytest.approx(pick_threshold(seg[:, 1], truth[:, 1], 0.95), abs=1e-6)
    assert per["thresholds"]["epidural"] != one["thresholds"]["epidural"]


def test_intensity_augment_stays_inside_and_rim_hugs_the_edge() -> None:
    from triage.models.train import _intensity_augment, _rim_field

    yy, xx = np.mgrid[0:64, 0:64]
    inside = torch.from_numpy((((yy - 32) ** 2 + (xx - 32) ** 2) < 26**2).astype(np.float32))[None, None]
    inside = inside.repeat(8, 1, 1, 1)
    rim = _rim_field(inside, np.random.default_rng(3))
    assert rim.min() >= 0 and float(rim.max()) <= 70.0
    assert float((rim * (1 - inside)).abs().max()) == 0.0, "the rim never leaves the intracranial space"
    centre = ((yy - 32) ** 2 + (xx - 32) ** 2) < 18**2  # deeper than RIM_DEPTH pixels from the edge
    assert float(rim[:, :, torch.from_numpy(centre)].abs().max()) == 0.0
    assert all(float(r.max()) > 10.0 for r in rim), "every sample gets an arc of bright rim"
    x = torch.rand(8, 5, 64, 64) * 0.6 * inside
    y = _intensity_augment(x.clone(), np.random.default_rng(4))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert float((y * (1 - inside)).abs().max()) == 0.0, "outside the skull stays black"
    assert float((y - x).abs().max()) > 0.05


def test_cupping_field_is_smooth_brightest_at_the_edge_and_stays_inside() -> None:
    from triage.models.train import _cupping_field, _depth_map

    yy, xx = np.mgrid[0:64, 0:64]
    inside = torch.from_numpy((((yy - 32) ** 2 + (xx - 32) ** 2) < 26**2).astype(np.float32))[None, None]
    inside = inside.repeat(16, 1, 1, 1)
    depth = _depth_map(inside, 16)
    assert float(depth.max()) == 16 and float(depth[0, 0, 32, 7]) == 1.0  # (32, 7) is on the edge
    field = _cupping_field(inside, np.random.default_rng(7))
    assert float((field * (1 - inside)).abs().max()) == 0.0, "nothing is added outside the skull"
    assert float(field.min()) >= 0 and float(field.max()) <= 45 * 1.8 + 1e-3
    for f, d in zip(field, depth, strict=True):
        edge, deep = f[d == 1], f[d == 16]
        if float(edge.max()) > 5:  # amplitude drawn from 0-45 HU
            assert float(edge.mean()) > 2 * float(deep.mean()), "the rise is toward the inner table"
    # along one radius the field falls with depth (a smooth gradient, not a crescent with an edge)
    ray = field[:, 0, 32, 7:32]
    assert bool((ray[:, 0] >= ray[:, 4]).all() and (ray[:, 4] >= ray[:, 12]).all())


def test_csf_layer_fill_takes_brain_values_and_spares_blood(monkeypatch) -> None:
    from triage.models import train

    monkeypatch.setattr(train, "CSF_FILL_PROBABILITY", 1.0)
    yy, xx = np.mgrid[0:64, 0:64]
    r = np.hypot(yy - 32, xx - 32)
    inside = torch.from_numpy((r < 26).astype(np.float32))[None, None].repeat(4, 1, 1, 1)
    brain = np.where(r < 25, 0.5, np.where(r < 26, 0.1, 0.0)).astype(np.float32)  # dark 1 px CSF layer
    x = torch.from_numpy(brain)[None, None].repeat(4, 5, 1, 1)
    y = torch.zeros(4, 5, 64, 64)
    y[3, 4] = torch.from_numpy(((r >= 22) & (r < 26) & (xx < 20)).astype(np.float32))  # a crescent
    out = train._fill_csf_layer(x.clone(), y, inside, np.random.default_rng(0))
    edge = torch.from_numpy((r >= 25) & (r < 26))
    assert float((out * (1 - inside)).abs().max()) == 0.0, "outside stays black"
    for i in range(3):
        assert float(out[i, 0][edge].mean()) > 0.4, "the outermost pixels take the brain's value"
    crescent = y[3, 4] > 0.5
    assert torch.equal(out[3, :, crescent], x[3, :, crescent]), "blood is never overwritten"
    far = torch.from_numpy((r >= 25) & (r < 26) & (xx > 44))
    assert float(out[3, 0][far].mean()) > 0.4


def test_augmentation_keeps_its_size_in_mm_on_a_finer_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a stem network's 256 px input the rim, cupping, CSF-fill and bone-speck sizes double in
    pixels, so they cover the same millimetres as on the 128 px grid they were tuned on."""
    from triage.models import train

    def disk(n: int) -> torch.Tensor:
        yy, xx = np.mgrid[0:n, 0:n] / n
        return torch.from_numpy(((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.4**2).astype(np.float32))[None, None]

    rims = {}
    for n in (128, 256):
        inside = disk(n).repeat(4, 1, 1, 1)
        field = train._on_reference_grid(train._rim_field, inside, np.random.default_rng(0))
        assert float((field * (1 - inside)).abs().max()) == 0.0
        rims[n] = float((field > 1.0).float().sum())
    assert 3.2 < rims[256] / rims[128] < 4.8, rims  # same band in mm: four times the pixels
    monkeypatch.setattr(train, "CSF_FILL_PROBABILITY", 1.0)
    monkeypatch.setattr(train, "CSF_FILL_MAX", 1)  # fill exactly one 128 px-grid pixel: two at 256 px
    filled = {}
    for n in (128, 256):
        inside = disk(n)
        yy, xx = np.mgrid[0:n, 0:n] / n
        rr = torch.from_numpy(np.hypot(yy - 0.5, xx - 0.5).astype(np.float32))
        x = torch.where(rr < 0.4 - 1.0 / 128, 0.5, 0.1)[None, None].repeat(1, 5, 1, 1) * inside  # dark CSF
        out = train._fill_csf_layer(x.clone(), torch.zeros(1, 5, n, n), inside, np.random.default_rng(3))
        filled[n] = float(((out[0, 0] > 0.3) & (x[0, 0] < 0.3)).sum())
    assert filled[128] > 0 and 3.2 < filled[256] / filled[128] < 4.8, filled


def test_init_from_bundle_loads_its_weights(tiny_bundle: Path) -> None:
    from triage.models.train import init_from_bundle

    net, seq = init_from_bundle(tiny_bundle, SMALL)
    assert net.training and seq.training
    ref = load_bundle(tiny_bundle, device="cpu")
    for (k, a), (_, b) in zip(net.state_dict().items(), ref.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # another network grid is fine (fully convolutional); other inputs are not
    bigger, _ = init_from_bundle(tiny_bundle, replace(SMALL, size=48))
    assert bigger(torch.zeros(1, SMALL.channels, 48, 48))["seg"].shape[-1] == 48
    with pytest.raises(SystemExit, match="preprocessing"):
        init_from_bundle(tiny_bundle, replace(SMALL, context=2))
    assert seq.seg_inputs == len(SUBTYPES) and read_manifest(tiny_bundle)["architecture"]["sequence_seg_inputs"] == 5
    for a, b in zip(seq.state_dict().values(), ref.seq.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_an_older_sequence_head_gains_the_segmentation_evidence_unchanged(tiny_bundle: Path, tmp_path: Path) -> None:
    """A bundle whose sequence head reads only the slice network's features and logits (every bundle
    before 2026.11.24.6) starts a fine-tune with a head that also reads the per-slice segmentation
    maxima, through a zero projection: at first it answers exactly as the old head did."""
    from triage.models.train import init_from_bundle

    ref = load_bundle(tiny_bundle, device="cpu")
    torch.manual_seed(3)
    old = SequenceHead(ref.net.feat_dim).eval()
    torch.nn.init.normal_(old.out.weight, std=0.1)  # a trained head's residual is not zero
    manifest = read_manifest(tiny_bundle)
    manifest["architecture"] = {k: v for k, v in manifest["architecture"].items() if k != "sequence_seg_inputs"}
    save_bundle(tmp_path / "old", ref.net, old, manifest)
    assert read_manifest(tmp_path / "old")["architecture"]["sequence_seg_inputs"] == 0
    assert load_bundle(tmp_path / "old", device="cpu").seq.seg_proj is None
    _, seq = init_from_bundle(tmp_path / "old", SMALL)
    assert seq.seg_inputs == len(SUBTYPES)
    seq.eval()
    feat, logits, evidence = torch.rand(1, 7, ref.net.feat_dim), torch.randn(1, 7, 6), torch.rand(1, 7, 5)
    with torch.no_grad():
        assert torch.allclose(seq(feat, logits, evidence), old(feat, logits), atol=1e-6)
        with pytest.raises(ValueError, match="seg_evidence"):
            seq(feat, logits)


def test_stem_network_sees_the_finer_grid_and_widening_keeps_the_function(tiny_bundle: Path) -> None:
    """A stem-2 network takes a 2x input grid and answers on it; widened from a stem-1 bundle it
    starts out computing the stem-1 answer on the block-averaged input, while sub-pixel detail the
    averaging would erase now changes its output."""
    from triage.models.network import widen_stem
    from triage.models.train import init_from_bundle

    ref = load_bundle(tiny_bundle, device="cpu").net
    wide, _ = init_from_bundle(tiny_bundle, replace(SMALL, size=64, base_size=128), stem=2)
    assert wide.stem == 2
    wide.eval()
    torch.manual_seed(0)
    fine = torch.rand(2, SMALL.channels, 64, 64)
    coarse = torch.nn.functional.avg_pool2d(fine, 2)
    with torch.no_grad():
        a, b = ref(coarse), wide(fine)
    assert b["seg"].shape == (2, len(SUBTYPES), 64, 64)
    assert torch.allclose(a["slice"], b["slice"], atol=1e-4)
    assert torch.allclose(a["feat"], b["feat"], atol=1e-4)
    # a checkerboard averages to grey: invisible to the stem-1 network, not to a trained stem
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2).float().expand(1, SMALL.channels, 64, 64)
    with torch.no_grad():
        same_for_ref = ref(torch.nn.functional.avg_pool2d(checker, 2))["slice"]
        grey = ref(torch.full((1, SMALL.channels, 32, 32), 0.5))["slice"]
    assert torch.allclose(same_for_ref, grey)
    state = widen_stem(ref.state_dict(), 2)
    state["enc.0.0.weight"][:, 0::4] *= 2.0  # weigh one sub-pixel phase more, as training may learn
    trained = ICHNet(SMALL.channels, WIDTHS, stem=2).eval()
    trained.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(trained(checker)["slice"], trained(torch.full_like(checker, 0.5))["slice"])
    # the stem is part of the bundle: it round-trips and a stem-2 bundle cannot be widened again
    out = tiny_bundle.parent / "stem2"
    manifest = read_manifest(tiny_bundle) | {"preprocessing": replace(SMALL, size=64, base_size=128).to_dict()}
    save_bundle(out, trained, load_bundle(tiny_bundle, device="cpu").seq, manifest)
    assert read_manifest(out)["architecture"]["stem"] == 2
    again = load_bundle(out, device="cpu")
    with torch.no_grad():
        assert torch.equal(again.net(checker)["slice"], trained(checker)["slice"])
    with pytest.raises(SystemExit, match="stem"):
        init_from_bundle(out, replace(SMALL, size=96, base_size=128), stem=3)


def test_cached_studies_memory_mapped(tmp_path: Path) -> None:
    """With ``mmap`` the network-grid arrays are memory-mapped .npy files beside the cache, equal to
    the in-memory arrays; a second load reuses them, and a sampler batch reads from them."""
    from triage.models.train import SliceSampler

    src = Source("toy:0-4", [str(i) for i in range(4)], toy_study, "toy")
    plain = cached_studies(src, SMALL, tmp_path, progress=False, target_size=SMALL.size // 2)
    mapped = cached_studies(src, SMALL, tmp_path, progress=False, target_size=SMALL.size // 2, mmap=True)
    grid = sorted((tmp_path / "grid").glob("*.npy"))
    assert len(grid) == 3 * len(plain)
    for a, b in zip(plain, mapped, strict=True):
        for name in ("windows", "brain_small", "target"):
            assert isinstance(getattr(b, name), np.memmap) and not isinstance(getattr(a, name), np.memmap)
            assert np.array_equal(getattr(a, name), getattr(b, name))
        assert np.array_equal(a.slice_labels, b.slice_labels) and a.meta == b.meta
    stamps = [f.stat().st_mtime_ns for f in grid]
    again = cached_studies(src, SMALL, tmp_path, progress=False, target_size=SMALL.size // 2, mmap=True)
    assert [f.stat().st_mtime_ns for f in grid] == stamps, "the grid files are reused"
    assert np.array_equal(again[0].windows, plain[0].windows)
    x, y, *_ = SliceSampler(again, np.random.default_rng(0)).batch(4)
    assert x.shape[0] == 4 and torch.isfinite(x).all() and y.shape[1] == len(SUBTYPES)
    again[0].windows[0, 0, 0, 0] = 7  # copy-on-write: the file on disk is not changed
    assert np.array_equal(cached_studies(src, SMALL, tmp_path, progress=False, target_size=SMALL.size // 2,
                                         mmap=True)[0].windows, plain[0].windows)


def test_release_heap_where_glibc() -> None:
    """Training and tuning give freed heap pages back between studies: malloc_trim on glibc (CI's
    Debian), a no-op that says so elsewhere."""
    import platform

    from triage.models.memory import release_heap

    assert release_heap() is (platform.libc_ver()[0] == "glibc")


def test_sampler_over_samples_hard_negatives(toy_cache: list) -> None:
    """Negative slices with calcium-bright voxels, or from a hard-negative study, make up about
    HARD_FRACTION of each batch although they are rare in the data."""
    from triage.models.train import HARD_FRACTION, SliceSampler

    studies = [replace(c, meta=dict(c.meta), windows=c.windows.copy()) for c in toy_cache]
    negatives = [c for c in studies if not c.exam_labels[0]]
    negatives[0].windows[3, 2, 16, 16] = 255  # one bright (calcified) voxel on one negative slice
    negatives[1].meta["kind"] = "hard_negative_calcification"
    sampler = SliceSampler(studies, np.random.default_rng(0))
    hard = {(int(i), int(z)) for i, z in sampler.hard}
    i0, i1 = studies.index(negatives[0]), studies.index(negatives[1])
    assert (i0, 3) in hard and (i0, 4) not in hard
    assert {(i1, z) for z in range(negatives[1].windows.shape[0])} <= hard
    share = len(hard) / len(sampler)
    picked = 0
    for _ in range(200):
        x, *_ = sampler.batch(16)
        picked += sum(any(torch.equal(x[k], sampler.slice_input(i, z)) for i, z in sampler.hard)
                      for k in range(len(x)))
    assert share < 0.1 and abs(picked / (200 * 16) - HARD_FRACTION) < 0.1


def test_sampler_hard_fraction_is_a_setting(toy_cache: list) -> None:
    """`--hard-fraction` sets the share of blood-mimic negatives drawn on purpose per batch; the
    plain negatives still bring their natural share of them. A share that leaves no room is refused."""
    from triage.models.train import POS_FRACTION, SliceSampler

    studies = [replace(c, meta=dict(c.meta)) for c in toy_cache]
    next(c for c in studies if not c.exam_labels[0]).meta["kind"] = "hard_negative_calcification"

    def hard_share(fraction: float) -> tuple[float, float]:
        sampler = SliceSampler(studies, np.random.default_rng(1), hard_fraction=fraction)
        hard = {(int(i), int(z)) for i, z in sampler.hard}
        natural = len(hard) / len(sampler.neg)
        drawn = 0
        for _ in range(100):
            x, *_ = sampler.batch(16)
            drawn += sum(any(torch.equal(x[k], sampler.slice_input(i, z)) for i, z in hard) for k in range(len(x)))
        expected = fraction + (1 - POS_FRACTION - fraction) * natural
        return drawn / (100 * 16), expected

    low, high = hard_share(0.0), hard_share(0.5)
    assert abs(low[0] - low[1]) < 0.08 and abs(high[0] - high[1]) < 0.08
    assert high[0] > low[0] + 0.25
    with pytest.raises(ValueError, match="hard fraction"):
        SliceSampler(studies, np.random.default_rng(1), hard_fraction=0.7)


def test_sampler_favours_positive_studies_with_few_positive_slices(toy_cache: list) -> None:
    """A study's positive slices together are drawn in proportion to sqrt(their number), not to
    their number: a one-slice bleed is not drowned by bleeds spanning many slices."""
    from triage.models.train import SliceSampler

    studies = [replace(c, slice_labels=c.slice_labels.copy()) for c in toy_cache]
    first = next(c for c in studies if c.exam_labels[0])
    first.slice_labels[np.flatnonzero(first.slice_labels[:, 0])[1:]] = 0  # a one-slice bleed
    sampler = SliceSampler(studies, np.random.default_rng(0))
    study_of = sampler.pos[:, 0]
    counts = np.bincount(study_of)
    ids = np.flatnonzero(counts)
    assert counts[ids].min() == 1 and counts[ids].max() > 1
    share = np.array([sampler.pos_p[study_of == i].sum() for i in ids])
    assert np.allclose(share, np.sqrt(counts[ids]) / np.sqrt(counts[ids]).sum())
    small, large = ids[np.argmin(counts[ids])], ids[np.argmax(counts[ids])]
    uniform = counts / counts.sum()
    assert share[ids == small][0] > uniform[small] and share[ids == large][0] < uniform[large]


def test_small_intracranial_caps_are_left_out_and_not_trained_on() -> None:
    """A vertex cap (13 cm2 of bright partial volume inside a small skull ring) is cleared from the
    mask, so the network never reads it; blood drawn there is not a slice target."""
    from triage.models.data import preprocess_study

    s = toy_study(1)
    yy, xx = np.mgrid[0:N, 0:N]
    ring = ((yy - N / 2) ** 2 + (xx - N / 2) ** 2)
    s.hu[0] = -1000.0
    s.hu[0][ring < 12**2] = 1000.0
    s.hu[0][ring < 10**2] = 85.0  # pi * (10 px * 2 mm)^2 = 12.6 cm2
    s.masks["subdural"] = np.zeros_like(s.hu, bool)
    s.masks["subdural"][0] = ring < 4**2
    s.slice_labels[0, 0] = s.slice_labels[0, 5] = 1.0
    assert prepare(s.hu, s.pixel_spacing, replace(SMALL, min_area_cm2=0.0)).brain_mask[0].any()
    prep = prepare(s.hu, s.pixel_spacing, SMALL)
    assert not prep.brain_mask[0].any() and not prep.windows[0].any()
    assert prep.brain_mask[Z // 2].any(), "full-size slices keep their mask"
    cached = preprocess_study(s, SMALL)
    assert cached.label_known is not None and cached.seg_known is not None
    assert not cached.label_known[0] and not cached.seg_known[0] and cached.label_known[1:].all()
    # an older bundle's manifest (no floor) keeps every slice
    assert PreprocessConfig.from_dict({"size": 32}).min_area_cm2 == 0.0


def test_bone_specks_sit_inside_the_edge_band_and_never_on_blood(monkeypatch: pytest.MonkeyPatch) -> None:
    from triage.models import train

    monkeypatch.setattr(train, "BONE_SPECK_PROBABILITY", 1.0)
    yy, xx = np.mgrid[0:64, 0:64]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    inside = torch.from_numpy((r2 < 26**2).astype(np.float32))[None, None].repeat(6, 1, 1, 1)
    x = 0.4 * inside.repeat(1, 5, 1, 1)
    y = torch.zeros(6, 5, 64, 64)
    blood = torch.from_numpy(((yy - 32) ** 2 + (xx - 9) ** 2 < 5**2).astype(np.float32))  # at the left edge
    y[:, 4] = blood
    out = train._bone_specks(x.clone(), y, inside, np.random.default_rng(0))
    changed = (out - x).abs().amax(dim=1) > 1e-6
    assert all(bool(c.any()) for c in changed), "every sample got specks"
    assert not bool((changed & (blood[None] > 0)).any()), "never over blood"
    assert not bool((changed & (inside[:, 0] == 0)).any()), "never outside the skull"
    deep = torch.from_numpy(r2 < (26 - train.BONE_SPECK_BAND - 4) ** 2)  # blobs reach 1.5 x 2.5 px
    assert not bool((changed & deep[None]).any()), "only near the edge"
    # calcium-bright: the soft-tissue window (40/380) reads at least 150 HU at each speck's centre
    assert all(float(out[i, 2].max()) >= (150 + 150) / 380 - 1e-3 for i in range(6))


def test_phantom_source_options_are_checked_when_opened() -> None:
    """``subtypes`` takes several names joined by '/', since ',' separates the options; a bad option
    fails when the source is opened, not in a cache worker minutes later."""
    from triage.models.data import open_source

    src = open_source("phantom:5-7:subtypes=epidural/subdural,size_class=small")
    assert src.keys == ["5", "6"]
    assert src.load.options == {"subtypes": ("epidural", "subdural"), "size_class": "small"}
    assert open_source("phantom:0-1:subtypes=subdural").load.options["subtypes"] == ("subdural",)
    with pytest.raises(ValueError, match="unknown subtype 'subdurall'"):
        open_source("phantom:0-1:subtypes=subdurall")
    with pytest.raises(ValueError, match="colour"):
        open_source("phantom:0-1:colour=red")


def test_sampler_brings_coarse_targets_to_the_input_grid(toy_cache: list) -> None:
    """Targets kept on a stem network's U-Net grid (half the input) come out of the sampler on the
    input grid, with the blood where the full-size targets have it."""
    from triage.models.preprocess import resize_u8
    from triage.models.train import SliceSampler

    coarse = [replace(c, target=resize_u8(c.target, c.target.shape[-1] // 2)) for c in toy_cache]
    a = SliceSampler(toy_cache, np.random.default_rng(5)).batch(16)
    b = SliceSampler(coarse, np.random.default_rng(5)).batch(16)
    assert torch.equal(a[0], b[0]) and b[1].shape == a[1].shape == (16, len(SUBTYPES), 32, 32)
    blood = a[1] > 0.5
    assert blood.any() and float((b[1][blood] > 0.25).float().mean()) > 0.9
    assert float(b[1][a[1] == 0].mean()) < 0.05


def test_gradcam_split_at_the_cam_layer_equals_plain_gradcam() -> None:
    """Grad-CAM runs the layers below the CAM once without gradients and the rest per label on its
    own rows; the maps must equal the textbook computation (one forward with gradients over all
    rows, one backward per label)."""
    torch.manual_seed(3)
    net = ICHNet(5, WIDTHS, stem=2).eval()
    for m in net.modules():  # non-trivial batch-norm statistics, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(4, 5, 64, 64)
    rows = {0: [0, 2, 3], 3: [1], 5: [3, 0]}
    got = gradcam_maps(net, x, rows)
    skips, cam = net.lower(x)  # one graph from the input through the CAM to the logits
    out = net.upper(skips, cam)
    for label, r in rows.items():
        (g,) = torch.autograd.grad(out["slice"][r, label].sum(), cam, retain_graph=True)
        maps = torch.relu((g[r].mean(dim=(2, 3), keepdim=True) * cam[r]).sum(dim=1, keepdim=True))
        want = torch.nn.functional.interpolate(maps, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        assert got[label].shape == (len(r), 64, 64)
        assert torch.allclose(got[label], want.detach(), atol=1e-6), label
    assert any(float(m.max()) > 0 for m in got.values())


def test_stem_segmentation_from_the_unet_grid_equals_the_full_grid_output() -> None:
    """Inference keeps a stem network's segmentation logits on the U-Net grid and up-samples only
    the slices it needs: the probabilities must equal the network's own full-grid output."""
    torch.manual_seed(4)
    net = ICHNet(5, WIDTHS, stem=2).eval()
    x = torch.rand(3, 5, 64, 64)
    brain = np.zeros((3, 64, 64), bool)
    brain[:, 8:56, 10:50] = True
    with torch.no_grad():
        full = torch.sigmoid(net(x)["seg"]) * torch.from_numpy(brain)[:, None]
        coarse = net(x, full_seg=False)["seg"]
    assert coarse.shape == (3, len(SUBTYPES), 32, 32)
    for k in range(len(SUBTYPES)):
        got = seg_probs_on_input_grid(coarse[:, k].numpy(), brain)
        assert torch.allclose(got, full[:, k], atol=1e-6)
    # the per-slice maximum on the U-Net grid bounds the full-grid one from above (the mask filter)
    seg = run_networks(net, SequenceHead(net.feat_dim).eval(), (x[:, :3] * 255).byte().numpy(), brain,
                       PreprocessConfig(size=64, context=1), torch.device("cpu"))
    assert seg["seg_logits"].shape == (3, len(SUBTYPES), 32, 32)
    assert (seg["seg_max"] >= full.flatten(2).amax(dim=2).numpy() - 1e-6).all()


def test_flip_augmentation_averages_the_mirrored_pass_and_is_mirror_invariant() -> None:
    """``flip``: the mean of the plain pass and the mirrored one (masks mirrored back), so a series
    and its mirror image get the same scores and mirrored masks."""
    torch.manual_seed(5)
    net = ICHNet(5, WIDTHS, stem=2).eval()
    seq = SequenceHead(net.feat_dim).eval()
    cfg = PreprocessConfig(size=64, context=1)
    win = (torch.rand(4, 3, 64, 64) * 255).byte().numpy()
    brain = np.zeros((4, 64, 64), bool)
    brain[:, 8:56, 6:50] = True  # not symmetric: the mirrored pass sees another mask
    mirror = (np.ascontiguousarray(win[..., ::-1]), np.ascontiguousarray(brain[..., ::-1]))
    plain = run_networks(net, seq, win, brain, cfg)
    plain_m = run_networks(net, seq, *mirror, cfg)
    tta = run_networks(net, seq, win, brain, cfg, flip=True)
    tta_m = run_networks(net, seq, *mirror, cfg, flip=True)
    assert not np.allclose(plain["slice_probs"], plain_m["slice_probs"]), "the network is not mirror-symmetric"
    for k in ("slice_probs", "cnn_slice_probs", "seg_max"):
        assert tta[k].shape == plain[k].shape
        assert np.allclose(tta[k], (plain[k] + plain_m[k]) / 2, atol=1e-6)
        assert np.allclose(tta[k], tta_m[k], atol=1e-5)
    assert np.allclose(tta["seg_logits"], (plain["seg_logits"] + plain_m["seg_logits"][..., ::-1]) / 2, atol=1e-5)
    assert np.allclose(tta["seg_logits"], tta_m["seg_logits"][..., ::-1], atol=1e-5)


def test_cli_choices_match_the_inference_modes() -> None:
    """The CLI keeps its own copy (it starts without torch); it must not drift from inference's."""
    from triage.cli import TTA_CHOICES
    from triage.models.inference import TTA_MODES

    assert tuple(TTA_CHOICES) == TTA_MODES


def test_onnx_export_runs_in_onnxruntime_with_the_same_results(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from triage.models.export import ONNX_FILE, export_onnx

    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    entry = export_onnx(bundle)
    assert (bundle / ONNX_FILE).is_file() and entry["max_abs_diff"] <= 1e-3
    assert read_manifest(bundle)["exports"]["onnx"]["sha256"] == entry["sha256"]

    vol = toy_volume(toy_study(11))
    ort_b = load_bundle(bundle, device="cpu", thresholds_override=dict.fromkeys(LABELS, 0.3))
    torch_b = load_bundle(bundle, device="cpu", thresholds_override=dict.fromkeys(LABELS, 0.3), runtime="torch")
    assert ort_b.runtime == "onnxruntime" and torch_b.runtime == "torch"
    a, b = ort_b.predict(vol), torch_b.predict(vol)
    assert a.device == "cpu+onnxruntime" and b.device == "cpu"
    for lab in LABELS:
        assert a.exam_probs[lab] == pytest.approx(b.exam_probs[lab], abs=1e-4)
    assert np.allclose(a.slice_probs, b.slice_probs, atol=1e-4)
    assert a.present == b.present and a.masks.keys() == b.masks.keys()
    for sub, m in a.masks.items():  # a voxel may flip where the probability sits at 0.5
        assert (m != b.masks[sub]).sum() <= max(2, m.sum() // 100), sub


def test_onnx_export_that_is_changed_or_stale_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from triage.models.export import ONNX_FILE, export_onnx

    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(BundleError, match="no ONNX export"):
        load_bundle(bundle, device="cpu", runtime="onnx")
    assert load_bundle(bundle, device="cpu").runtime == "torch", "no export: PyTorch"
    export_onnx(bundle)
    data = (bundle / ONNX_FILE).read_bytes()
    (bundle / ONNX_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(bundle, device="cpu")
    export_onnx(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["exports"]["onnx"]["weights_sha256"] = "0" * 64  # made from other weights
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="other weights"):
        load_bundle(bundle, device="cpu")
    assert load_bundle(bundle, device="cpu", runtime="torch").runtime == "torch"
    with pytest.raises(ValueError, match="runtime"):
        load_bundle(bundle, device="cpu", runtime="tensorrt")
