"""Slice sets (labelled, windowed 8-bit PNG slices) and the ``brain_window`` model built on them:
the reader (splits by study, unknown labels, masks, boxes), the input transform (the same tensor
from HU and from the equivalent PNG), a tiny mixed training run, and ``evaluate slices:``. The sets
are written from synthetic studies at test time; no real data is committed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from triage.cli import main as triage_main
from triage.datasets import detect_format, open_dataset
from triage.datasets.base import DatasetError
from triage.datasets.slices import SliceSet, split_studies
from triage.labels import LABELS
from triage.models.bundle import read_manifest
from triage.models.mixed import (
    MixedSampler,
    add_box_pseudo_masks,
    box_pseudo_mask,
    erase_blood,
    grid_exam_from_slices,
    grid_exam_from_study,
    mixed_loss,
    paste_crescent,
    paste_csf,
    paste_sinus,
    peripheral_rise,
    robust_augment,
    scanner_look,
    sharpen_and_grain,
    transplant_blood,
)
from triage.models.network import ICHNet
from triage.models.preprocess import BRAIN_WINDOW, PreprocessConfig, prepare
from triage.phantom.generator import PhantomOptions, SyntheticStudy, generate_study

from .dataset_fixtures import write_slice_set

CFG = PreprocessConfig(size=64, base_size=64, windows=BRAIN_WINDOW, context=1, input="brain_window")


def _study(seed: int, **kw: object) -> SyntheticStudy:
    return generate_study(seed, PhantomOptions(size=128, tilt_deg=0.0, **kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def studies() -> list[SyntheticStudy]:
    return [_study(31, subtypes=("intraparenchymal",), size_class="medium"), _study(32, kind="negative"),
            _study(33, subtypes=("subdural",), size_class="medium"), _study(34, kind="negative")]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory, studies: list[SyntheticStudy]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slices")
    return {
        "masks": write_slice_set(root / "masks", studies),
        "boxes": write_slice_set(root / "boxes", studies, subtypes_known=False, boxes=True, window=None),
        "unordered": write_slice_set(root / "unordered", studies[:2], ordered=False, window=(127.5, 255.0)),
    }


def test_reader_splits_by_study_with_a_seed(sets: dict[str, Path], studies: list[SyntheticStudy]) -> None:
    assert detect_format(sets["masks"]) == "slices"
    full = SliceSet(sets["masks"])
    assert full.studies() == ["s00", "s01", "s02", "s03"]
    assert len(full.exam_ids()) == 4, "ordered studies: one exam (a series) each"
    train, val = SliceSet(sets["masks"], "train", 0.5, seed=1), SliceSet(sets["masks"], "val", 0.5, seed=1)
    assert len(val.studies()) == 2 and set(train.studies()).isdisjoint(val.studies())
    assert sorted(train.studies() + val.studies()) == full.studies()
    assert {r.study for r in val.rows} == set(val.studies()), "every slice of a study goes with it"
    assert SliceSet(sets["masks"], "val", 0.5, seed=1).studies() == val.studies(), "the seed fixes the split"
    names = [f"p{i}" for i in range(40)]
    splits = {tuple(split_studies(names, "val", 0.25, s)) for s in range(5)}
    assert len(splits) > 1 and all(len(v) == 10 for v in splits), "another seed, another split of the same size"
    ex = full.load(full.exam_ids()[0])
    assert ex.pixels.shape[0] == studies[0].hu.shape[0] and ex.window_known
    # the CLI spelling of a split
    ds = open_dataset(sets["masks"])
    assert len(ds) == 4
    with pytest.raises(DatasetError, match="unknown option"):
        from triage.models.data import open_source
        open_source(f"slices:{sets['masks']}:splt=val")


def test_reader_keeps_unknown_labels_unknown_and_reads_masks_and_boxes(sets: dict[str, Path],
                                                                       studies: list[SyntheticStudy]) -> None:
    boxed = SliceSet(sets["boxes"])
    ex = boxed.load("s00")
    blood = studies[0].slice_labels[:, 0] > 0
    assert np.isnan(ex.labels[blood, 1:]).all(), "empty subtype cells are unknown, not 0"
    assert (ex.labels[blood, 0] == 1).all() and (ex.labels[~blood, 0] == 0).all()
    assert not ex.window_known and ex.window == (40.0, 80.0), "an unknown window is read as the brain window"
    assert all(len(b) == 1 for b, is_b in zip(ex.boxes, blood, strict=True) if is_b)
    g = grid_exam_from_slices(ex, CFG)
    pos = [s for s in g.slices if s.labels[0] > 0]
    assert pos and all(not s.label_known[1:].any() and s.label_known[0] for s in pos), "subtypes stay out of the loss"
    assert all(s.boxes and s.unknown is not None and s.unknown.any() for s in pos), "boxes on the grid"
    neg = [s for s in g.slices if s.label_known[0] and s.labels[0] == 0]
    assert all(s.label_known.all() and s.seg_known for s in neg), "no blood: every subtype is known absent"

    masked = SliceSet(sets["masks"]).load("s02")  # subdural
    gm = grid_exam_from_slices(masked, CFG)
    sdh = LABELS.index("subdural") - 1
    with_blood = [s for s in gm.slices if s.labels[0] > 0]
    assert with_blood and all(s.target is not None and s.target[sdh].max() > 128 for s in with_blood)
    unordered = SliceSet(sets["unordered"])
    assert len(unordered.exam_ids()) == sum(s.hu.shape[0] for s in studies[:2]), "no order: a slice per exam"
    assert unordered.load(unordered.exam_ids()[0]).window == (127.5, 255.0)


@pytest.mark.parametrize("window", [(40.0, 80.0), (127.5, 255.0)])
def test_the_input_is_the_same_from_hu_and_from_the_windowed_png(tmp_path: Path, studies: list[SyntheticStudy],
                                                                 window: tuple[float, float]) -> None:
    st = studies[0]
    hu = np.round(st.hu).astype(np.float32)  # DICOM HU are integers
    root = write_slice_set(tmp_path / "set", [st], window=window)
    ex = SliceSet(root).load("s00")
    a = prepare(hu, st.pixel_spacing, CFG)
    b = prepare(ex.hu, st.pixel_spacing, CFG)
    assert a.box == b.box
    assert np.array_equal(a.windows, b.windows), "one tensor, whether the node reads HU or a publisher's PNG"
    assert np.array_equal(a.brain_small, b.brain_small)
    assert a.windows.shape == (hu.shape[0], 1, CFG.size, CFG.size) and a.windows.max() > 200


def test_robust_augment_moves_targets_with_the_image() -> None:
    rng = np.random.default_rng(0)
    x = torch.zeros(8, 3, 32, 32)
    x[:, :, 4:10, 20:26] = 0.9
    maps = (x[:, :1] > 0.5).float()
    xa, ma = robust_augment(x.clone(), maps.clone(), rng)
    assert xa.shape == x.shape and ma.shape == maps.shape
    for i in range(8):  # the bright square and its target stay together whatever the geometry did
        inside = xa[i, 0][ma[i, 0] > 0.5]
        outside = xa[i, 0][ma[i, 0] < 0.05]
        assert inside.mean() > outside.mean() + 0.2


def test_peripheral_rise_is_densest_at_the_inner_table() -> None:
    """The beam-hardening augmentation (``--aug-rim``) adds density inside the skull only, most at the
    bone and fading inward; a slice without a closed skull gets none."""
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 48, xx - 48)
    img = np.where(r < 40, 110.0, 0.0)  # brain
    img[(r >= 40) & (r < 45)] = 255.0  # a closed skull
    rise = peripheral_rise(img, np.random.default_rng(0), 1.0)
    assert rise[r >= 40].max() == 0 and rise[r < 40].min() >= 0, "inside the skull only"
    edge, middle = rise[(r > 37) & (r < 39)].mean(), rise[r < 10].mean()
    assert 3.0 < edge <= 20.0 and middle < 0.1 * edge, "densest at the inner table, fading inward"
    assert not peripheral_rise(np.full((96, 96), 110.0), np.random.default_rng(0), 1.0).any()


def test_another_scanners_look_is_smooth_shading_and_a_sharper_grainier_image() -> None:
    """``--aug-scanner``: the shading is a smooth field of a few HU (no edges of its own: it cannot draw
    a bleed), and the kernel sharpens an edge and adds grain, leaving the labels' maps alone."""
    shade, amount, blur, grain = scanner_look(np.zeros((128, 128)), np.random.default_rng(0))
    assert 3.0 <= float(np.abs(shade).max()) <= 10.0 + 1e-4 and 0.6 <= blur <= 1.5 and amount > 0
    assert float(np.abs(np.diff(shade, axis=0)).max()) < 0.5, "smooth: under 0.5 HU from one pixel to the next"
    x = np.zeros((3, 64, 64), np.float32)
    x[:, :, 32:] = 0.6  # an edge
    y = sharpen_and_grain(x, 1.0, 1.0, grain, np.random.default_rng(1))
    assert y[:, :, 32].mean() > 0.65 and y[:, :, 31].mean() < -0.05, "over- and undershoot at the edge"
    flat = y[:, 10:50, 5:20]
    assert 0.005 < float(flat.std()) < 0.05 and not np.allclose(y[0], y[1]), "each channel its own grain"
    maps = torch.zeros(2, 2, 64, 64)
    maps[:, 0, 20:30, 20:30] = 1
    xt = torch.from_numpy(np.stack([x, x]))
    _, m0 = robust_augment(xt.clone(), maps.clone(), np.random.default_rng(5), scanner=0.0)
    _, m1 = robust_augment(xt.clone(), maps.clone(), np.random.default_rng(5), scanner=1.0)
    assert torch.equal(m0, m1), "the look changes no label: the maps move as without it"


def test_a_narrower_augmentation_window_gives_more_contrast() -> None:
    """The window augmentation's width range is a knob (``--aug-window-width``): with the same draws
    otherwise, a narrower window spreads brain (30 HU) and blood (60 HU) further apart."""
    x = torch.full((6, 3, 32, 32), 30 / 80)
    x[:, :, 8:24, 8:24] = 60 / 80
    inner = torch.zeros(32, 32, dtype=torch.bool)
    inner[12:20, 12:20] = True

    def contrast(widths: tuple[float, float]) -> torch.Tensor:
        xa, _ = robust_augment(x.clone(), torch.zeros(6, 1, 32, 32), np.random.default_rng(4), widths)
        return xa[:, 0, inner].mean(dim=1) - xa[:, 0, 0:3, 0:3].flatten(1).mean(dim=1)

    narrow, wide = contrast((40.0, 41.0)), contrast((129.0, 130.0))
    changed = narrow != wide  # samples that keep the exact 40/80 window are the same in both
    assert changed.any() and (narrow[changed] > wide[changed] + 0.05).all()


def test_a_tiny_mixed_run_lowers_the_loss(sets: dict[str, Path], studies: list[SyntheticStudy]) -> None:
    torch.manual_seed(0)
    real = [grid_exam_from_slices(SliceSet(sets["boxes"]).load(e), CFG) for e in ("s00", "s01")]
    from triage.models.data import open_source

    src = open_source("phantom:40-41:size=128,subtypes=epidural")
    exams = real + [grid_exam_from_study(src.load(k), CFG) for k in src.keys]
    shape = np.zeros((12, 9), bool)
    shape[2:10, 1:8] = True
    sampler = MixedSampler(exams, [("intraparenchymal", shape)], np.random.default_rng(0), grid_px_mm=3.5)
    counts = sampler.counts()
    assert counts["real_pos"] and counts["real_neg"] and counts["phantom_pos"] and counts["clean"]
    batch = sampler.batch(12)
    assert batch["boxes"].sum() > 0, "box targets reach the batch"
    for _ in range(3):
        sampler.batch(12)
    assert sampler.pasted > 0, "real bleed shapes are pasted into blood-free slices"
    assert (batch["label_known"][:, 1:] == 0).any(), "unknown subtypes reach the loss as unknown"
    for shares, flag in (({"phantom": 1.0}, 1.0), ({"real_neg": 1.0}, 0.0)):
        only = MixedSampler(exams, [], np.random.default_rng(0), shares=shares, grid_px_mm=3.5).batch(4)
        assert only["free"].tolist() == [flag] * 4, "each sample says whether distillation leaves it free"
    pasted = MixedSampler(exams, [], np.random.default_rng(0), shares={"paste": 1.0}, grid_px_mm=3.5, csf=1.0)
    b = pasted.batch(6)
    assert pasted.pasted > 0
    assert (b["free"][b["labels"][:, 0] > 0] == 1.0).all(), "a pasted bleed is free too"
    net = ICHNet(3, (8, 12, 16, 24, 32), stem=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = net(batch["x"])
        loss = mixed_loss(out, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_erased_bleeds_become_negatives_of_the_same_slice(sets: dict[str, Path]) -> None:
    """Counterfactual negatives: a drawn bleed is replaced by the tissue around it, the rest of the
    slice is untouched, and the sampler labels the result blood-free with a known-empty mask."""
    g = grid_exam_from_slices(SliceSet(sets["masks"]).load("s02"), CFG)  # subdural, drawn masks
    z = next(i for i, s in enumerate(g.slices) if s.target is not None and s.target.max() > 128)
    blood = g.slices[z].target.max(axis=0) > 25
    out = erase_blood(g.windows, z, blood, np.random.default_rng(0))
    assert out is not None and out.shape == g.windows[z].shape
    before, after = g.windows[z, 0].astype(float), out[0].astype(float)
    ring = ndimage.binary_dilation(blood, iterations=8) & ~ndimage.binary_dilation(blood, iterations=4)
    tissue = ring & (before > 30) & (before < 200)
    assert after[blood].mean() < before[blood].mean() - 20, "the bleed is gone"
    assert abs(after[blood].mean() - np.median(before[tissue])) < 15, "filled at the surrounding tissue's level"
    far = ~ndimage.binary_dilation(blood, iterations=6)
    assert np.array_equal(after[far], before[far]), "nothing else changes"

    sampler = MixedSampler([g], [], np.random.default_rng(1), shares={"erase": 1.0}, grid_px_mm=3.5)
    assert sampler.counts()["real_masked"] > 0
    b = sampler.batch(6)
    assert sampler.erased == 6
    assert (b["labels"] == 0).all() and (b["label_known"] == 1).all() and (b["seg_known"] == 1).all()
    assert b["target"].sum() == 0, "an erased slice is known empty"
    assert (b["free"] == 1.0).all(), "distillation leaves erased slices free"
    drawn = MixedSampler([g], [], np.random.default_rng(1), shares={"real_masked": 1.0}, grid_px_mm=3.5).batch(4)
    assert (drawn["free"] == 1.0).all(), "and slices with drawn masks: they teach new blood"


def test_pasted_crescents_lie_along_the_inner_table(sets: dict[str, Path]) -> None:
    """A thin extra-axial collection is painted on a real-anatomy slice: inside the skull, touching the
    bone, thin, at the requested blood density; the sampler labels it subdural with its mask."""
    g = grid_exam_from_slices(SliceSet(sets["masks"]).load("s01"), CFG)  # a negative study
    z = len(g.slices) // 2
    img = g.windows[z, 0].astype(float)
    out = None
    for seed in range(10):
        out = paste_crescent(g.windows, z, 3.5, np.random.default_rng(seed), hu_range=(60.0, 60.0))
        if out is not None:
            break
    assert out is not None, "a closed skull takes a crescent"
    new, mask = out
    m = mask > 0.5
    assert m.sum() >= 6
    bone = img >= 250
    assert not (m & bone).any(), "inside the skull, not on the bone"
    near_bone = ndimage.binary_dilation(bone, iterations=3)
    assert (m & near_bone).sum() / m.sum() > 0.5, "along the inner table"
    assert abs(np.median(new[0][m].astype(float)) - (60 - 0) / 80 * 255) < 25, "at the requested density"
    assert np.array_equal(new[0][~ndimage.binary_dilation(m, iterations=3)],
                          g.windows[z, 0][~ndimage.binary_dilation(m, iterations=3)]), "nothing else changes"

    sampler = MixedSampler([g], [], np.random.default_rng(2), shares={"paste": 1.0}, grid_px_mm=3.5,
                           crescents=1.0)
    b = sampler.batch(4)
    assert sampler.pasted > 0
    k = 1 + list(LABELS[1:]).index("subdural")
    got = b["labels"][:, 0] > 0
    assert got.any() and (b["labels"][got, k] == 1).all() and b["target"][got].sum() > 0


def test_sinus_mimics_lie_on_the_table_and_stay_blood_free(sets: dict[str, Path]) -> None:
    """A conspicuous dural venous sinus (a normal mimic of blood) is painted against the inner table,
    denser than the slice's brain by the requested margin, and nothing else changes; the sampler
    keeps such slices labelled blood-free with a known-empty mask."""
    g = grid_exam_from_slices(SliceSet(sets["masks"]).load("s01"), CFG)  # a negative study
    z = len(g.slices) // 2
    img = g.windows[z, 0].astype(float)
    bone = img >= 250
    brain = np.median(img[(img > 8) & (img < 235)])
    kinds = set()
    for seed in range(12):
        # 1.5 mm pixels: the toy head's 64-pixel grid at 3.5 mm leaves a sinus a pixel or two
        out = paste_sinus(g.windows, z, 1.5, np.random.default_rng(seed), above=(20.0, 20.0))
        assert out is not None, "a closed skull takes a sinus"
        new, mask = out
        m = mask > 0.5
        assert m.sum() >= 6 and not (m & bone).any(), "inside the skull, not on the bone"
        assert (m & ndimage.binary_dilation(bone, iterations=2)).any(), "against the inner table"
        assert 40 < np.median(new[0][m].astype(float)) - brain < 90, "about 20 HU (64 levels) over the brain"
        far = ~ndimage.binary_dilation(m, iterations=3)
        assert np.array_equal(new[0][far], g.windows[z, 0][far]), "nothing else changes"
        kinds.add(int(m.sum()))
    assert len(kinds) > 3, "sizes and places vary"

    sampler = MixedSampler([g], [], np.random.default_rng(6), shares={"real_neg": 1.0}, grid_px_mm=1.5, sinus=1.0)
    b = sampler.batch(6)
    assert sampler.sinuses > 0
    assert (b["labels"] == 0).all() and b["target"].sum() == 0, "a sinus is not blood"
    assert int(b["free"].sum()) == sampler.sinuses, "distillation leaves the mimics free, and only them"


def test_blood_pasted_into_the_slices_own_csf_spaces(sets: dict[str, Path]) -> None:
    """Subarachnoid and intraventricular blood take the shape of the slice's own CSF: the mask lies
    inside the skull on pixels darker than its brain, the paint is at the requested density and
    nothing else changes; the sampler labels each paste with its subtype and mask."""
    g = grid_exam_from_slices(SliceSet(sets["masks"]).load("s01"), CFG)  # a negative study
    for sub in ("subarachnoid", "intraventricular"):
        out = None
        for seed in range(40):
            z = 3 + seed % (len(g.slices) - 6)
            out = paste_csf(g.windows, z, 3.5, np.random.default_rng(seed), sub, hu_range=(60.0, 60.0))
            if out is not None:
                break
        assert out is not None, f"{sub}: the phantom's CSF takes blood"
        new, mask = out
        img = g.windows[z, 0].astype(float)
        m = mask > 0.5
        brain = np.median(img[(img > 8) & (img < 235)])
        assert not (m & (img >= 250)).any(), "not on the bone"
        assert np.median(img[m]) < brain - 20, "on CSF, darker than the brain"
        painted = new[0][m].astype(float)
        assert np.median(painted) > brain + 15, "denser than the brain, as blood reads (thin edges: partial volume)"
        denser = paste_csf(g.windows, z, 3.5, np.random.default_rng(seed), sub, hu_range=(90.0, 90.0))
        assert denser is not None and np.array_equal(denser[1], mask), "the same seed, the same place"
        assert np.median(denser[0][0][m].astype(float) - painted) > 20, "at the requested density"
        far = ~ndimage.binary_dilation(m, iterations=3)
        assert np.array_equal(new[0][far], g.windows[z, 0][far]), "nothing else changes"

    sampler = MixedSampler([g], [], np.random.default_rng(3), shares={"paste": 1.0}, grid_px_mm=3.5, csf=1.0)
    b = sampler.batch(8)
    assert sampler.pasted > 0
    got = b["labels"][:, 0] > 0
    subs = [LABELS.index(s) for s in ("subarachnoid", "intraventricular")]
    assert got.any() and (b["labels"][got][:, subs].sum(1) == 1).all(), "one CSF subtype per paste"
    assert b["target"][got].sum() > 0


def test_transplanted_blood_moves_into_another_slice_with_its_labels(sets: dict[str, Path]) -> None:
    """A donor slice's drawn blood is moved into a blood-free slice of another exam: inside its skull,
    denser than its brain, with the donor's subtype as target and label; elsewhere the slice is
    untouched; the sampler never shows the donor slice itself."""
    donor = grid_exam_from_slices(SliceSet(sets["masks"]).load("s02"), CFG)  # subdural
    g = grid_exam_from_slices(SliceSet(sets["masks"]).load("s01"), CFG)  # a negative study
    dz = max(range(len(donor.slices)), key=lambda k: 0 if donor.slices[k].target is None
             else int(donor.slices[k].target.sum()))
    z = len(g.slices) // 2
    out = None
    for seed in range(10):
        out = transplant_blood(g.windows, z, donor, dz, np.random.default_rng(seed))
        if out is not None:
            break
    assert out is not None, "a large subdural moves into a closed skull"
    new, target, _, _ = out
    sd = list(LABELS[1:]).index("subdural")
    m = target[sd] > 0.5
    assert m.sum() >= 6 and target.sum() - target[sd].sum() < 1e-6, "the donor's subtype only"
    img = g.windows[z, 0].astype(float)
    assert not (m & (img >= 250)).any(), "inside the recipient's skull, not on its bone"
    brain = np.median(img[(img > 8) & (img < 235)])
    assert np.median(new[0][m].astype(float)) > brain + 15, "denser than the recipient's brain, as the donor's blood"
    far = ~ndimage.binary_dilation(target.max(axis=0) > 0, iterations=2)  # the soft edge included
    assert far.sum() > 0.5 * far.size and np.array_equal(new[0][far], g.windows[z, 0][far]), "nothing else changes"

    sampler = MixedSampler([g], [], np.random.default_rng(4), shares={"paste": 1.0}, grid_px_mm=3.5,
                           transplant=1.0, donors=[donor])
    assert sampler.counts()["donor_slices"] > 0 and sampler.counts()["real_pos"] == 0, "donors are not sampled"
    b = sampler.batch(8)
    assert sampler.pasted > 0
    got = b["labels"][:, 0] > 0
    assert got.any() and (b["labels"][got, 1 + sd] == 1).all() and b["target"][got][:, sd].sum() > 0
    assert (b["free"][got] == 1.0).all(), "distillation leaves transplants free"

    # erased, the donors are the real negatives of another source: shown only without their blood
    erasing = MixedSampler([g], [], np.random.default_rng(5), shares={"erase": 1.0}, grid_px_mm=3.5,
                           donors=[donor])
    assert erasing.counts()["real_masked"] == 0
    b = erasing.batch(6)
    assert erasing.erased == 6, "erase samples come from the donors when the exams have no drawn masks"
    assert (b["labels"] == 0).all() and b["target"].sum() == 0 and (b["seg_known"] == 1).all()
    alone = MixedSampler([g], [], np.random.default_rng(5), shares={"erase": 1.0}, grid_px_mm=3.5)
    alone.batch(2)
    assert alone.erased == 0, "without drawn masks or donors there is nothing to erase: plain negatives"


def test_box_pseudo_masks_find_the_blood_inside_the_boxes(sets: dict[str, Path]) -> None:
    """A slice labelled by a loose box gets the bright blood inside it as its pixel target (measured
    against the phantom's own mask), the rest of the box far from it known blood-free; a box over
    plain brain gives none."""
    from triage.models import metrics

    boxed = grid_exam_from_slices(SliceSet(sets["boxes"]).load("s00"), CFG)  # intraparenchymal
    drawn = grid_exam_from_slices(SliceSet(sets["masks"]).load("s00"), CFG)
    assert add_box_pseudo_masks([boxed]) > 0
    scores = []
    for s, t in zip(boxed.slices, drawn.slices, strict=True):
        if s.any_blood is None:
            continue
        truth = t.target.max(axis=0) > 127
        scores.append(metrics.dice(s.any_blood, truth))
        inside = np.zeros_like(s.any_blood)
        for y0, y1, x0, x1 in s.boxes:
            inside[y0:y1, x0:x1] = True
        assert not (s.any_blood & ~inside).any()
        far = inside & ~ndimage.binary_dilation(s.any_blood, iterations=3)
        assert s.unknown[s.any_blood].all() and not s.unknown[far].any()
    assert scores and np.mean(scores) > 0.8, scores
    z = next(i for i, s in enumerate(boxed.slices) if s.any_blood is not None)
    head = boxed.head[z]
    ys, xs = np.nonzero(head)
    cy, cx = int(ys.mean()), int(xs.mean())
    plain = np.where(head, 100, 0).astype(np.uint8)  # brain only: nothing brighter inside the box
    assert box_pseudo_mask(plain, head, (cy - 6, cy + 6, cx - 6, cx + 6)) is None


def test_train_then_evaluate_on_a_slice_set(sets: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    spec = f"slices:{sets['masks']}"
    rc = triage_main(["train", f"{spec}:split=train,fraction=0.5,seed=3+phantom:50-52:size=128",
                      "--val", f"{spec}:split=val,fraction=0.5,seed=3", "--input", "brain_window",
                      "--out", str(bundle), "--epochs", "2", "--steps-per-epoch", "2", "--batch", "4",
                      "--size", "64", "--cache", str(tmp_path / "cache"), "--seed", "1"])
    assert rc == 0
    m = read_manifest(bundle)
    assert m["preprocessing"]["input"] == "brain_window" and m["preprocessing"]["windows"] == [[40.0, 80.0]]
    assert len(m["training"]["history"]) == 2 and (bundle / "checkpoints" / "mixed.pt").exists()
    assert m["validation"]["operating_points"]["any"]["level"] == "slice"
    # the operating point again, without retraining, on the same split, with mirror test-time augmentation,
    # on the scores the node computes (slices the HU check does not back count as 0)
    from triage.models.bundle import write_manifest

    write_manifest(bundle, m | {"hu_confirmation": {"hu": [50, 100], "min_area_mm2": 8}})
    assert triage_main(["tune", str(bundle), "--val", f"{spec}:split=val,fraction=0.5,seed=3", "--tta", "flip",
                        "--sensitivity", "0.9", "--cache", str(tmp_path / "cache")]) == 0
    tuned = read_manifest(bundle)
    assert tuned["test_time_augmentation"] == "flip" and "--sensitivity 0.9" in tuned["tuned"]["command"]
    assert tuned["thresholds"]["any"] == tuned["validation"]["operating_points"]["any"]["threshold"]
    with pytest.raises(SystemExit, match="brain_window"):
        triage_main(["train", spec, "--out", str(tmp_path / "hu"), "--cache", str(tmp_path / "cache")])

    capsys.readouterr()
    out = tmp_path / "eval"
    assert triage_main(["evaluate", f"slices:{sets['boxes']}", "--bundle", str(bundle), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("boxes: ") and "AUC any" in line and "sensitivity" in line
    report = json.loads((out / "report.json").read_text())
    n_slices = sum(1 for _ in (sets["boxes"] / "images").iterdir())
    assert report["slices"] == n_slices and report["studies"] == 4
    a = report["any"]
    assert a["positives"] + a["negatives"] == n_slices and a["auc"] is not None
    lo, hi = a["ci95"]["auc"]  # four patients resampled: an interval around the estimate, in the one line too
    assert lo <= a["auc"] <= hi and f"AUC any {a['auc']:.3f} [{lo:.3f}-{hi:.3f}]" in line
    assert a["ci95"]["sensitivity"][0] <= a["sensitivity"] <= a["ci95"]["sensitivity"][1]
    assert report["per_label"]["subdural"]["known"] == a["negatives"], "unknown subtypes are not counted"
    assert report["dice_any"]["n"] == 0, "boxes are not masks: no Dice is made up"
    assert "roc.png" in report["plots"] and (out / "roc.png").exists()

    out2 = tmp_path / "eval-masks"
    assert triage_main(["evaluate", str(sets["masks"]), "--bundle", str(bundle), "--out", str(out2)]) == 0
    r2 = json.loads((out2 / "report.json").read_text())
    assert r2["dice_any"]["n"] == r2["any"]["positives"] > 0, "every slice with a drawn mask gets a Dice"
    rows = [json.loads(x) for x in (out2 / "rows.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["dice_any"] <= 1.0 for r in rows if "dice_any" in r)
    assert r2["dice_any"]["mean_ci95"][0] <= r2["dice_any"]["mean"] <= r2["dice_any"]["mean_ci95"][1]

    # fine-tune the segmentation from it: pseudo-masks in the boxes, the encoder frozen, the slice
    # logits distilled from the bundle it starts from
    from triage.models.bundle import load_weights

    tuned_bundle = tmp_path / "kd"
    boxes = f"slices:{sets['boxes']}"
    args = ["train", f"{boxes}:split=train,fraction=0.5,seed=3", "--input", "brain_window", "--out",
            str(tuned_bundle), "--epochs", "1", "--steps-per-epoch", "2", "--batch", "4", "--size", "80",
            "--cache", str(tmp_path / "cache"), "--seed", "2", "--box-pseudo", "--freeze-encoder",
            "--paste-crescents", "0.5", "--paste-csf", "0.3", "--paste-hu", "45,80", "--distill-on", "real",
            "--distill-seg", "0.5", "--aug-window-width", "40,130", "--transplant", "0.2",
            "--aug-rim", "0.3", "--aug-scanner", "0.3", "--transplant-from", f"slices:{sets['masks']}"]
    with pytest.raises(SystemExit, match="--init"):
        triage_main([*args, "--distill", "1"])
    with pytest.raises(SystemExit, match="--transplant-from"):
        triage_main([*args[:-2], "--distill", "1", "--init", str(bundle)])  # --transplant-from left out
    assert triage_main([*args, "--distill", "1", "--init", str(bundle)]) == 0
    # fine-tuned on a finer grid than the bundle's (the network is convolutional): the manifest says so
    assert read_manifest(tuned_bundle)["preprocessing"]["size"] == 80 != read_manifest(bundle)["preprocessing"]["size"]
    before = load_weights(bundle, read_manifest(bundle))[0]
    after = load_weights(tuned_bundle, read_manifest(tuned_bundle))[0]
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items(), strict=True):
        if name.startswith("enc."):
            assert torch.equal(a, b), f"{name} is frozen"
    assert any(not torch.equal(a, b) for (name, a), (_, b) in zip(before.state_dict().items(),
                                                                  after.state_dict().items(), strict=True)
               if name.startswith(("dec.", "seg.")))
    command = read_manifest(tuned_bundle)["training"]["command"]
    assert "--box-pseudo" in command and "--distill 1" in command and "--freeze-encoder" in command
    assert "--paste-crescents 0.5" in command and "--paste-hu 45,80" in command and "--distill-on real" in command
    assert "--paste-csf 0.3" in command and "--distill-seg 0.5" in command and "--aug-window-width 40,130" in command
    assert f"--transplant 0.2 --transplant-from 'slices:{sets['masks']}'" in command and "--aug-rim 0.3" in command
    assert "--aug-scanner 0.3" in command
    assert "moved into blood-free ones" in read_manifest(tuned_bundle)["trained_on"]


def test_distillation_on_real_slices_only_leaves_the_phantoms_free() -> None:
    from triage.models.train_mixed import distill_loss

    student = torch.zeros(4, 6, requires_grad=True)
    teacher = torch.ones(4, 6)
    phantom = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert float(distill_loss(student, teacher).detach()) == 1.0
    loss = distill_loss(student, teacher, phantom)
    loss.backward()
    grad = student.grad.abs().sum(dim=1)
    assert grad[0] > 0 and grad[2] > 0, "the real slices are held"
    assert grad[1] == 0 and grad[3] == 0, "the phantom slices are not"
    assert float(distill_loss(student, teacher, torch.ones(4)).detach()) == 0.0


def test_segmentation_distillation_is_zero_where_the_teacher_agrees_and_holds_only_plain_slices() -> None:
    from triage.models.train_mixed import distill_seg_loss

    teacher = torch.randn(3, 5, 8, 8) * 4
    assert abs(float(distill_seg_loss(teacher.clone(), teacher))) < 1e-6, "no pull where they agree"
    student = torch.zeros(3, 5, 8, 8, requires_grad=True)
    free = torch.tensor([0.0, 1.0, 0.0])
    loss = distill_seg_loss(student, teacher, free)
    assert float(loss.detach()) > 0
    loss.backward()
    grad = student.grad.abs().flatten(1).sum(dim=1)
    assert grad[0] > 0 and grad[2] > 0 and grad[1] == 0, "the free sample is not pulled"
    assert float(distill_seg_loss(student, teacher, torch.ones(3)).detach()) == 0.0


def _toy_head(z: int = 3, n: int = 160, px: float = 1.0) -> np.ndarray:
    """(Z, n, n) HU: a skull ring (800 HU) around brain (35 HU, noise 3 HU), air outside."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2, xx - n / 2) * px
    hu = np.full((z, n, n), -1000.0, np.float32)
    hu[:, r < 70] = 800.0
    hu[:, r < 64] = 35.0 + rng.normal(0, 3.0, (z, int((r < 64).sum())))
    return hu


def test_hu_confirmation_keeps_blood_and_drops_brain_and_calcification(tmp_path: Path) -> None:
    from triage.models.bundle import save_bundle
    from triage.models.inference import load_bundle
    from triage.models.network import SequenceHead

    cfg = PreprocessConfig(size=64, base_size=64, windows=BRAIN_WINDOW, context=1, input="brain_window",
                           min_area_cm2=0.0)
    net = ICHNet(3, (8, 12, 16, 24, 32), stem=2)
    manifest = {"name": "toy", "version": "1", "preprocessing": cfg.to_dict(),
                "architecture": {"network": "ICHNet", "widths": [8, 12, 16, 24, 32], "stem": 2, "gru_hidden": 48},
                "thresholds": dict.fromkeys(LABELS, 0.5), "hu_confirmation": {"hu": [50, 100], "min_area_mm2": 8}}
    save_bundle(tmp_path / "b", net, SequenceHead(net.feat_dim, seg_inputs=5), manifest)
    bundle = load_bundle(tmp_path / "b", device="cpu", runtime="torch")
    hu = _toy_head()
    yy, xx = np.mgrid[:160, :160]
    hu[0][np.hypot(yy - 60, xx - 90) < 4] = 70.0  # a 5 mm acute bleed
    rim = np.hypot(yy - 80, xx - 95)
    hu[2][rim < 3.5] = 70.0  # a calcification: dense core, blood-like partial-volume rim
    hu[2][rim < 1.5] = 300.0
    prep = prepare(hu, (1.0, 1.0), cfg)
    g = 64 // 2
    out = {"slice_probs": np.ones((3, 6), np.float32), "seg_max": np.ones((3, 5), np.float32),
           "seg_logits": np.full((3, 5, g, g), 5.0, np.float32)}  # the network says "blood" everywhere
    unread = bundle.unreadable_slices(hu, prep, out, (1.0, 1.0))
    assert unread.tolist() == [False, True, True], "only the hyperdense blob backs the network's call"
    out["seg_logits"][:] = -5.0  # the network's mask misses the blob: nothing confirms it either
    assert bundle.unreadable_slices(hu, prep, out, (1.0, 1.0)).all()
    # called or not: a slice under the "any" threshold is checked too, so an unbacked slice scoring
    # just under the threshold cannot outrank a backed one (the worklist is ranked by the score)
    out["seg_logits"][:] = 5.0
    out["slice_probs"][:] = 0.3
    out["seg_max"][:] = 0.3
    assert bundle.unreadable_slices(hu, prep, out, (1.0, 1.0)).tolist() == [False, True, True]
