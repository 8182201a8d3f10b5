"""``triage train DATASET --out BUNDLE``: train the slice network, the sequence head, pick thresholds.

Stage 1 trains :class:`ICHNet` on slices (positive slices over-sampled to ~40%; loss = seg BCE with
positive pixels weighted x3 as in PatchFCN + soft Dice + slice BCE), with flips and small affine
jitter. Stage 2 freezes it and trains the bidirectional GRU over whole series on the pooled slice
features (cheap: features are computed once). Stage 3 scores the validation set with each exam
rule, keeps the best by AUC and sets each label's threshold for high sensitivity. A checkpoint is
written every epoch (``--resume`` continues from it) and the bundle is written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from triage.labels import LABELS, SUBTYPES
from triage.logging import get_logger
from triage.models import domain
from triage.models.bundle import load_weights, read_manifest, save_bundle, write_manifest
from triage.models.data import Cached, cached_studies, known_flags, open_source
from triage.models.inference import EXAM_RULES, exam_rules, exam_scores, resolve_device, run_networks, seg_evidence
from triage.models.memory import release_heap
from triage.models.metrics import roc_auc
from triage.models.network import ICHNet, SequenceHead, count_params, widen_stem
from triage.models.preprocess import PreprocessConfig, key_slice_input, network_input

log = get_logger(__name__)

POS_FRACTION = 0.4
HARD_FRACTION = 0.2  # of each batch: negative slices with blood mimics (see SliceSampler)
HARD_HU = 100.0  # a negative slice holding intracranial voxels brighter than this is a "hard" one
POS_PIXEL_WEIGHT = 3.0
ANY_SENSITIVITY = 1.0
SUBTYPE_SENSITIVITY = 0.95
WIDTHS = (12, 24, 48, 64, 96)


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def random_affine(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, degrees: float,
                  scale: tuple[float, float], shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One random rotation (+-``degrees``), scale (``scale``: > 1 zooms in) and shift (+-``shift`` of
    the grid) per sample, applied alike to the input ``x`` and the targets ``y`` (N, C, S, S)."""
    n = x.shape[0]
    ang = torch.from_numpy(rng.uniform(-degrees, degrees, n)).float() * math.pi / 180
    sc = torch.from_numpy(rng.uniform(scale[0], scale[1], n)).float()
    sh = torch.from_numpy(rng.uniform(-shift, shift, (n, 2))).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(ang) / sc
    theta[:, 0, 1] = -torch.sin(ang) / sc
    theta[:, 1, 0] = torch.sin(ang) / sc
    theta[:, 1, 1] = torch.cos(ang) / sc
    theta[:, :, 2] = sh
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x, y


def _augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-right flip, rotation +-10 deg, scale 0.9-1.1, shift +-5%, applied alike to input and target."""
    n = x.shape[0]
    flip = torch.from_numpy(rng.random(n) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None, None], y.flip(-1), y)
    x, y = random_affine(x, y, rng, 10.0, (0.9, 1.1), 0.05)
    noise = torch.from_numpy(rng.normal(0, 0.01, x.shape[:2])).float()[:, :, None, None]
    x = (x + noise * (x > 0)).clamp_(0, 1)
    return _intensity_augment(x, rng, y), y


# window widths (HU) of the input channels: the windows, then the brain window of each neighbour slice
_WINDOWS = [(float(c), float(w)) for c, w in PreprocessConfig().windows]
_NEIGHBOURS = 2 * PreprocessConfig().context
CHANNEL_WIDTHS = torch.tensor([w for _, w in _WINDOWS] + [_WINDOWS[0][1]] * _NEIGHBOURS)
CHANNEL_LOWS = torch.tensor([c - w / 2 for c, w in _WINDOWS] + [_WINDOWS[0][0] - _WINDOWS[0][1] / 2] * _NEIGHBOURS)
SOFT_CHANNEL = 2  # the soft-tissue window (40/380) holds calcium-bright voxels unclipped
# HARD_HU as a uint8 level of that window
HARD_LEVEL = int(math.ceil((HARD_HU - float(CHANNEL_LOWS[SOFT_CHANNEL])) / float(CHANNEL_WIDTHS[SOFT_CHANNEL]) * 255))
REFERENCE_GRID = 128  # the augmentation sizes in pixels below are pixels of a 128 px grid
RIM_PROBABILITY = 0.5
RIM_DEPTH = 4  # pixels of the 128 px reference grid (about 1.5 mm each)


def _depth_map(inside: torch.Tensor, layers: int) -> torch.Tensor:
    """Pixels from the intracranial edge (1 on the edge, capped at ``layers``) by repeated erosion."""
    depth, prev = torch.zeros_like(inside), inside
    for _ in range(layers):
        depth = depth + prev
        prev = -F.max_pool2d(-prev, 3, 1, 1)
    return depth


def _grid_scale(t: torch.Tensor) -> int:
    """Input-grid pixels per pixel of the 128 px grid the augmentation sizes below are given in: a
    stem network's 256 px input gets them doubled, so they keep their size in mm. An integer, at
    least 1 (grids up to 128 px keep the sizes as given)."""
    return max(1, round(t.shape[-1] / REFERENCE_GRID))


def _on_reference_grid(field: Callable[[torch.Tensor, np.random.Generator], torch.Tensor],
                       inside: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A smooth HU field computed on a grid :func:`_grid_scale` times coarser than the input and
    resampled to it, so it has the same size in mm (and cost) as on the 128 px grid."""
    k = _grid_scale(inside)
    if k == 1:
        return field(inside, rng)
    ref = (F.interpolate(inside, size=(inside.shape[-2] // k, inside.shape[-1] // k), mode="area") > 0.5).float()
    return F.interpolate(field(ref, rng), size=inside.shape[-2:], mode="bilinear", align_corners=False) * inside


def _rim_field(inside: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """HU added along an arc of the intracranial edge: the inner-table partial volume and
    beam-hardening rim that thick, tilted slices show under the skull (strongest at the edge,
    decaying over 1-3 pixels). The phantom draws only a faint rim; real scanners show more."""
    n, _, h, w = inside.shape
    depth = _depth_map(inside, RIM_DEPTH + 1)
    band = ((depth >= 1) & (depth <= RIM_DEPTH)).float()
    amp = torch.from_numpy(rng.uniform(15, 70, n)).float()[:, None, None, None]
    lam = torch.from_numpy(rng.uniform(0.5, 1.5, n)).float()[:, None, None, None]
    rim = band * torch.exp(-(depth - 1) / lam) * amp
    # restrict to an arc around the brain's centre, with soft ends
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    theta = torch.atan2(yy, xx)[None, None]
    centre = torch.from_numpy(rng.uniform(-math.pi, math.pi, n)).float()[:, None, None, None]
    half = torch.from_numpy(rng.uniform(0.5, math.pi, n)).float()[:, None, None, None]
    gap = torch.remainder(theta - centre + math.pi, 2 * math.pi) - math.pi
    arc = ((half - gap.abs()) / 0.3).clamp(0, 1)
    return rim * arc


CUPPING_PROBABILITY = 0.5
CUPPING_DEPTH = 16  # reference-grid pixels the field is computed to (it is ~0 beyond)


def _cupping_field(inside: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """HU added by a broad, smooth rise toward the inner table: beam hardening (cupping) and the
    partial volume of a vault cut obliquely by thick, tilted slices. On the real GE CT brain 3-5 mm
    under the table reads 37-45 HU mid-head and 58-61 HU near the vertex (1-2 mm: 52-90 HU), where
    the phantom gives 36-42 and 40-51. Amplitude 0-45 HU at the edge, decaying over 1-5 pixels
    (~1-6 mm), strongest on one side of the head on some samples, as tilt and head position give."""
    n, _, h, w = inside.shape
    depth = _depth_map(inside, CUPPING_DEPTH)
    amp = torch.from_numpy(rng.uniform(0, 45, n)).float()[:, None, None, None]
    lam = torch.from_numpy(rng.uniform(1, 5, n)).float()[:, None, None, None]
    field = amp * torch.exp(-(depth - 1).clamp(min=0) / lam) * inside
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    phi = torch.from_numpy(rng.uniform(-math.pi, math.pi, n)).float()[:, None, None, None]
    tilt = torch.from_numpy(rng.uniform(0, 0.8, n)).float()[:, None, None, None]
    side = 1 + tilt * (torch.cos(phi) * xx + torch.sin(phi) * yy).clamp(-1, 1)
    return field * side


CSF_FILL_PROBABILITY = 0.5
CSF_FILL_MAX = 4  # reference-grid pixels (about 1.5 mm each)


def _fill_csf_layer(x: torch.Tensor, y: torch.Tensor, inside: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """On some samples, the outer 1-4 pixels of the intracranial space take the values of the brain
    just inside them (filled from the inside out by local means), wherever no blood is within 3
    pixels. The phantom always draws a dark CSF layer between the cortex and the inner table, so the
    network learnt that grey-matter density touching bone is extra-axial blood; in the real GE CT
    the gyri touch the table and that is where it called subdural blood."""
    n = x.shape[0]
    use = np.flatnonzero(rng.random(n) < CSF_FILL_PROBABILITY)
    if not len(use):
        return x
    xs, ins = x[use], inside[use]
    k = _grid_scale(x)
    fill_max, spare = CSF_FILL_MAX * k, 3 * k
    blood = F.max_pool2d((y[use].amax(dim=1, keepdim=True) > 0.05).float(), 2 * spare + 1, 1, spare)
    depth = _depth_map(ins, fill_max + 1)
    width = torch.from_numpy(rng.integers(1, CSF_FILL_MAX + 1, len(use)) * k).float()[:, None, None, None]
    free = (1 - blood) * ins
    step = k  # pixels filled per pass (one 128 px-grid pixel), kernel to match
    for j in range(fill_max, 0, -step):
        src = free * (depth > j).float()
        num = F.avg_pool2d(xs * src, 2 * step + 1, 1, step)
        den = F.avg_pool2d(src, 2 * step + 1, 1, step)
        tgt = free * (depth <= j).float() * (depth > j - step).float() * (j <= width).float() * (den > 0).float()
        xs = torch.where(tgt > 0, num / den.clamp(min=1e-6), xs)
        depth = torch.where(tgt > 0, torch.full_like(depth, fill_max + 1.0), depth)  # now a source
    x = x.clone()
    x[use] = xs
    return x


BONE_SPECK_PROBABILITY = 0.3
BONE_SPECK_BAND = 6  # reference-grid pixels from the intracranial edge


def _bone_specks(x: torch.Tensor, y: torch.Tensor, inside: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Small bone-bright blobs (150-1000 HU, radius 0.7-2.5 px) just inside the intracranial edge, on
    some samples and never over blood: the clinoids, petrous ridges and inner-table fragments that
    thick slices cut at the skull base, which the phantom draws too rarely. Blood never reads above
    ~100 HU, so these teach the network that calcium-bright is not blood."""
    n, c, h, w = x.shape
    k = _grid_scale(x)
    b = BONE_SPECK_BAND * k
    eroded = -F.max_pool2d(F.max_pool2d(-inside, (2 * b + 1, 1), 1, (b, 0)), (1, 2 * b + 1), 1, (0, b))
    band = inside - eroded  # square erosion, done separably
    free = band[:, 0] * (y.amax(dim=1) < 0.05).float()
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for i in np.flatnonzero(rng.random(n) < BONE_SPECK_PROBABILITY):
        cand = torch.nonzero(free[i] > 0)
        if not len(cand):
            continue
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = cand[int(rng.integers(0, len(cand)))].tolist()
            r = float(rng.uniform(0.7, 2.5)) * k
            e = int(math.ceil(1.5 * r)) + 1  # alpha is 0 beyond 1.5 r: work on that window only
            win = (slice(max(0, cy - e), cy + e + 1), slice(max(0, cx - e), cx + e + 1))
            dist = ((yy[win] - cy) ** 2 + (xx[win] - cx) ** 2).sqrt()
            alpha = (1.5 - dist / r).clamp(0, 1) * inside[i, 0][win]
            val = ((float(rng.uniform(150, 1000)) - CHANNEL_LOWS[:c]) / CHANNEL_WIDTHS[:c]).clamp(0, 1)
            x[i][(slice(None), *win)] = x[i][(slice(None), *win)] * (1 - alpha) + alpha * val[:, None, None]
    return x


def _intensity_augment(x: torch.Tensor, rng: np.random.Generator, y: torch.Tensor | None = None) -> torch.Tensor:
    """Scanner variation the labels do not change: a global HU offset of the brain (calibration,
    sd 4 HU) on every sample; on about half of them a narrow bright partial-volume rim under the skull
    (:func:`_rim_field`), on about half a broad cupping rise toward the skull (:func:`_cupping_field`)
    and, given the targets ``y``, the CSF layer under the table filled with brain on about half
    (:func:`_fill_csf_layer`) and bone specks at the skull base (:func:`_bone_specks`)."""
    n = x.shape[0]
    inside = (x[:, 2:3] > 0.01).float()  # skull-stripped input: zero outside the intracranial space
    if y is not None:
        x = _fill_csf_layer(x, y, inside, rng)
    hu = torch.from_numpy(rng.normal(0, 4.0, n)).float()[:, None, None, None] * inside
    use = torch.from_numpy(rng.random(n) < RIM_PROBABILITY).float()[:, None, None, None]
    hu = hu + _on_reference_grid(_rim_field, inside, rng) * use
    use = torch.from_numpy(rng.random(n) < CUPPING_PROBABILITY).float()[:, None, None, None]
    hu = hu + _on_reference_grid(_cupping_field, inside, rng) * use
    width = CHANNEL_WIDTHS[: x.shape[1]].view(1, -1, 1, 1)
    x = (x + hu / width * inside).clamp_(0, 1)
    return _bone_specks(x, y, inside, rng) if y is not None else x


def seg_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """BCE with positive pixels weighted (PatchFCN) + soft Dice over the batch per subtype.

    ``known`` (N,) weights samples whose masks are known (1) or unknown (0: no segmentation loss).
    """
    w = 1.0 + (POS_PIXEL_WEIGHT - 1.0) * (target > 0.5).float()
    if known is None or bool((known > 0).all()):
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=w)
    else:
        k = known.float()[:, None, None, None]
        if not bool(k.any()):
            return logits.sum() * 0
        elem = F.binary_cross_entropy_with_logits(logits, target, weight=w * k, reduction="sum")
        bce = elem / (k.sum() * logits[0].numel())
        logits = logits[known > 0]
        target = target[known > 0]
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    present = target.sum(dim=(0, 2, 3)) > 0
    dice = 1 - (2 * inter + 1) / (denom + 1)
    dice_term = dice[present].mean() if present.any() else logits.sum() * 0
    return bce + 0.5 * dice_term


def check_hard_fraction(fraction: float) -> float:
    """The share of blood-mimic negatives per batch must leave room beside the positives."""
    if not 0.0 <= fraction <= 1.0 - POS_FRACTION:
        raise ValueError(f"hard fraction {fraction} outside [0, {1.0 - POS_FRACTION:g}]")
    return fraction


class SliceSampler:
    """Draws (study, slice) pairs with positive slices over-sampled; slices with neither labels nor
    masks known (CQ500 positives) are left to the sequence head's exam-level loss."""

    def __init__(self, studies: list[Cached], rng: np.random.Generator,
                 hard_fraction: float = HARD_FRACTION) -> None:
        self.studies = studies
        self.rng = rng
        self.hard_fraction = check_hard_fraction(hard_fraction)
        self.label_known = [known_flags(s.label_known, s.windows.shape[0]) for s in studies]
        self.seg_known = [known_flags(s.seg_known, s.windows.shape[0]) for s in studies]
        idx = [(i, z) for i, s in enumerate(studies) for z in range(s.windows.shape[0])
               if self.label_known[i][z] or self.seg_known[i][z]]
        if not idx:
            raise ValueError("no slice of the training set has known labels or masks")
        self.index = np.array(idx, dtype=np.int64)
        pos = np.array([self.label_known[i][z] and studies[i].slice_labels[z, 0] > 0 for i, z in idx])
        self.pos = self.index[pos]
        self.neg = self.index[~pos]
        # a positive slice is drawn with weight 1/sqrt(n), n = the positive slices of its study: small
        # bleeds (one or two slices; the positives that set the operating threshold) come up far more
        # often than uniform slice sampling, which favours bleeds spanning many slices, would give them
        self.pos_p = np.zeros(0)
        if len(self.pos):
            w = 1.0 / np.sqrt(np.bincount(self.pos[:, 0])[self.pos[:, 0]])
            self.pos_p = w / w.sum()
        hard = np.array([self._is_hard(studies[i], z) for i, z in self.neg.tolist()], bool)
        self.hard = self.neg[hard] if len(self.neg) else self.neg

    def __len__(self) -> int:
        return len(self.index)

    @staticmethod
    def _is_hard(s: Cached, z: int) -> bool:
        """A negative slice with a blood mimic: from a hard-negative study (calcification, artefact:
        synthetic sources say so), or holding intracranial voxels above ``HARD_HU`` (calcified pineal,
        plexus, falx, dystrophic specks in any source). Uniform sampling shows the network these
        rarely, and they are where it calls false positives."""
        if str(s.meta.get("kind", "")).startswith("hard_negative"):
            return True
        return bool((s.windows[z, SOFT_CHANNEL] >= HARD_LEVEL).any())

    def slice_input(self, i: int, z: int) -> torch.Tensor:
        """The network input (C, S, S) of slice ``z`` of study ``i``, built from the uint8 windows
        when drawn (a float copy of a 256 px training set would not fit in memory)."""
        return key_slice_input(self.studies[i].windows, 1, [z])[0]

    def batch(self, n: int) -> tuple[torch.Tensor, ...]:
        n_pos = int(self.rng.binomial(n, POS_FRACTION)) if len(self.pos) else 0
        n_hard = int(self.rng.binomial(n - n_pos, self.hard_fraction / (1 - POS_FRACTION))) if len(self.hard) else 0
        picks = []
        if n_pos:
            picks.append(self.pos[self.rng.choice(len(self.pos), n_pos, p=self.pos_p)])
        if n_hard:
            picks.append(self.hard[self.rng.integers(0, len(self.hard), n_hard)])
        rest = n - n_pos - n_hard
        picks.append(self.neg[self.rng.integers(0, len(self.neg), rest)] if len(self.neg)
                     else self.pos[self.rng.integers(0, len(self.pos), rest)])
        sel = np.concatenate(picks)
        x = torch.stack([self.slice_input(i, z) for i, z in sel])
        y = torch.stack([torch.from_numpy(self.studies[i].target[z]).float() / 255.0 for i, z in sel])
        if y.shape[-1] != x.shape[-1]:  # targets kept on a stem network's U-Net grid
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        lab = torch.stack([torch.from_numpy(self.studies[i].slice_labels[z]) for i, z in sel])
        seg_w = torch.tensor([float(self.seg_known[i][z]) for i, z in sel])
        cls_w = torch.tensor([float(self.label_known[i][z]) for i, z in sel])
        return x, y, lab, seg_w, cls_w


def train_cnn(net: ICHNet, studies: list[Cached], epochs: int, out: Path, device: torch.device,
              rng: np.random.Generator, resume: bool, batch_size: int = 16, lr: float = 2e-3,
              steps_per_epoch: int | None = None, progress: bool = True,
              hard_fraction: float = HARD_FRACTION) -> list[dict[str, float]]:
    sampler = SliceSampler(studies, rng, hard_fraction)
    steps = steps_per_epoch or max(1, len(sampler) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    pct = min(0.3, max(0.1, 2.5 / (epochs * steps)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=pct)
    ckpt = out / "checkpoints" / "cnn.pt"
    start, history = 0, []
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        start, history = state["epoch"], state["history"]
        # the schedule is rebuilt for the (possibly changed) number of epochs, positioned after the
        # steps already done, so a run can be shortened or extended on resume
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(epochs, start + 1) * steps,
                                                    pct_start=pct, last_epoch=start * steps - 1)
        rng.bit_generator.state = state["rng"]
        log.info("resumed", epoch=start)
    net.to(device)
    for epoch in range(start, epochs):
        net.train()
        t0 = time.time()
        tot = {"loss": 0.0, "seg": 0.0, "cls": 0.0}
        bar = tqdm(range(steps), desc=f"cnn epoch {epoch + 1}/{epochs}", disable=not progress, unit="batch")
        for _ in bar:
            x, y, lab, seg_w, cls_w = sampler.batch(batch_size)
            x, y = _augment(x, y, rng)
            x, y, lab, seg_w, cls_w = x.to(device), y.to(device), lab.to(device), seg_w.to(device), cls_w.to(device)
            out_ = net(x)
            ls = seg_loss(out_["seg"], y, seg_w)
            w = torch.ones(len(LABELS), device=device)
            w[0] = 2.0  # "any" counts double, as in the RSNA challenge metric
            elem = F.binary_cross_entropy_with_logits(out_["slice"], lab, reduction="none") * w * cls_w[:, None]
            lc = elem.sum() / (cls_w.sum().clamp(min=1.0) * len(LABELS))
            loss = ls + lc
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            tot["loss"] += loss.item()
            tot["seg"] += ls.item()
            tot["cls"] += lc.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        rec = {k: v / steps for k, v in tot.items()} | {"epoch": epoch + 1, "seconds": time.time() - t0}
        history.append(rec)
        log.info("cnn_epoch", **rec)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch + 1, "history": history, "rng": rng.bit_generator.state}, ckpt)
    return history


@torch.no_grad()
def slice_features(net: ICHNet, studies: list[Cached], device: torch.device,
                   mirror: bool = False, progress: bool = True) -> list[tuple[torch.Tensor, ...]]:
    """Per-study slice features and logits for the sequence head. ``mirror``: also the series
    mirrored left-right (what the head reads under the flip test-time augmentation), as a second
    sample of the same study."""
    net.eval()
    feats = []
    for s in tqdm(studies, desc="slice features", disable=not progress, unit="study"):
        known = torch.from_numpy(known_flags(s.label_known, s.windows.shape[0]))
        views = [(s.windows, s.brain_small)]
        if mirror:
            views.append((np.ascontiguousarray(s.windows[..., ::-1]), np.ascontiguousarray(s.brain_small[..., ::-1])))
        for windows, brain in views:
            out = net(network_input(windows, 1).to(device), full_seg=False)
            feats.append((out["feat"].cpu(), out["slice"].cpu(), torch.from_numpy(s.slice_labels), known,
                          torch.from_numpy(s.exam_labels), seg_evidence(out["seg"], brain)))
        release_heap()  # else the heap keeps every series' freed buffers (GBs over a training set)
    return feats


def train_sequence(seq: SequenceHead, feats: list[tuple[torch.Tensor, ...]], epochs: int,
                   rng: np.random.Generator, progress: bool = True) -> list[float]:
    opt = torch.optim.AdamW(seq.parameters(), lr=3e-3, weight_decay=1e-4)
    w = torch.ones(len(LABELS))
    w[0] = 2.0
    history = []
    seq.train()
    for _ in tqdm(range(epochs), desc="sequence head", disable=not progress, unit="epoch"):
        tot = 0.0
        for i in rng.permutation(len(feats)):
            f, logit, lab, known, exam, segev = feats[i]
            f = f + torch.randn_like(f) * 0.05  # features from the training set are over-confident
            pred = seq(f[None], logit[None], segev[None] if seq.seg_inputs else None)[0]
            if bool(known.all()):
                loss = (F.binary_cross_entropy_with_logits(pred, lab, reduction="none") * w).mean()
            else:  # exam labels only (CQ500): multiple-instance loss on the most suspicious slice
                loss = (F.binary_cross_entropy_with_logits(pred.max(dim=0).values, exam, reduction="none") * w).mean()
                if bool(known.any()):
                    loss = loss + (F.binary_cross_entropy_with_logits(pred[known], lab[known], reduction="none")
                                   * w).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item()
        history.append(tot / max(1, len(feats)))
    seq.eval()
    return history


def pick_threshold(scores: np.ndarray, truth: np.ndarray, sensitivity: float) -> float:
    """The largest threshold whose sensitivity on (scores, truth) is at least ``sensitivity``."""
    pos = np.sort(scores[truth > 0])
    if len(pos) == 0:
        return 0.5
    k = int(math.floor((1.0 - sensitivity) * len(pos) + 1e-9))
    return float(max(min(pos[k], 0.99), 1e-4))


def validation_scores(net: ICHNet, seq: SequenceHead, studies: list[Cached], cfg: PreprocessConfig,
                      device: torch.device, flip: bool = False) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {r: [] for r in EXAM_RULES}
    for s in studies:
        res = run_networks(net, seq, s.windows, s.brain_small, cfg, device, flip=flip)
        for r in EXAM_RULES:
            out[r].append(exam_scores(res["slice_probs"], res["seg_max"], r))
        release_heap()
    return {r: np.stack(v) for r, v in out.items()}


def save_validation_scores(path: Path, studies: list[Cached], truth: np.ndarray,
                           scores: dict[str, np.ndarray]) -> None:
    """Every rule's exam scores per validation study (.npz with ``truth`` and ``keys``), so another
    operating point can be weighed offline without running the networks again."""
    np.savez(path, truth=truth, keys=np.array([s.key for s in studies]), **scores)


def choose_rule_and_thresholds(scores: dict[str, np.ndarray], truth: np.ndarray,
                               any_sensitivity: float = ANY_SENSITIVITY, per_label: bool = False) -> dict[str, Any]:
    """The exam rule with the best validation AUC for "any" (then mean AUC), and each label's
    threshold on it. ``per_label``: each label takes the rule with its own best validation AUC
    (ties go to the overall rule), and the result's ``rule`` is a label -> rule mapping."""
    table = {}
    for rule, sc in scores.items():
        aucs = {lab: roc_auc(truth[:, i], sc[:, i]) for i, lab in enumerate(LABELS)}
        valid = [a for a in aucs.values() if not math.isnan(a)]
        table[rule] = {"auc": aucs, "mean_auc": float(np.mean(valid)) if valid else float("nan")}
    best = max(table, key=lambda r: (round(table[r]["auc"]["any"], 4), table[r]["mean_auc"]))
    rule: str | dict[str, str] = best
    if per_label:
        def label_key(r: str, lab: str) -> tuple[float, bool]:
            a = table[r]["auc"][lab]
            return (-1.0 if math.isnan(a) else round(a, 4), r == best)

        rule = {lab: max(table, key=lambda r, lab=lab: label_key(r, lab)) for lab in LABELS}
    rules = exam_rules(rule)
    sc = np.stack([scores[rules[lab]][:, i] for i, lab in enumerate(LABELS)], axis=1)
    thresholds, stats = {}, {}
    for i, lab in enumerate(LABELS):
        target = any_sensitivity if lab == "any" else SUBTYPE_SENSITIVITY
        t = pick_threshold(sc[:, i], truth[:, i], target)
        thresholds[lab] = round(t, 6)
        pos, neg = truth[:, i] > 0, truth[:, i] == 0
        stats[lab] = {
            "threshold": round(t, 6),
            "sensitivity": float((sc[pos, i] >= t).mean()) if pos.any() else None,
            "specificity": float((sc[neg, i] < t).mean()) if neg.any() else None,
            "positives": int(pos.sum()),
            "negatives": int(neg.sum()),
        }
    return {"rule": rule, "rules": table, "thresholds": thresholds, "operating_points": stats}


def init_from_bundle(path: str | Path, cfg: PreprocessConfig, stem: int = 1) -> tuple[ICHNet, SequenceHead]:
    """The networks of an existing bundle, in training mode, to fine-tune from; its preprocessing must
    match ``cfg`` (same windows, context, crop and HU ranges), or the weights would see different
    inputs. Only the grids and the slice-area floor may differ: the networks are fully
    convolutional with global pooling, so a bundle trained at 96 px is a sound start for 128 px, and
    a stem-1 bundle at 128 px starts a stem-2 network at 256 px (:func:`widen_stem`)."""
    manifest = read_manifest(path)
    theirs = PreprocessConfig.from_dict(manifest["preprocessing"])
    if replace(theirs, size=cfg.size, base_size=cfg.base_size, min_area_cm2=cfg.min_area_cm2) != cfg:
        raise SystemExit(f"--init bundle {path}: its preprocessing {theirs.to_dict()} differs from {cfg.to_dict()}")
    net, seq = load_weights(path, manifest)
    if net.stem != stem:
        if net.stem != 1:
            raise SystemExit(f"--init bundle {path} has stem {net.stem}; only a stem-1 bundle can be widened")
        wide = ICHNet(cfg.channels, net.widths, stem=stem)
        wide.load_state_dict(widen_stem(net.state_dict(), stem))
        net = wide
    if not seq.seg_inputs:  # an older head: it gains the segmentation evidence, starting from zero weights
        wider = SequenceHead(net.feat_dim, hidden=seq.gru.hidden_size, seg_inputs=len(SUBTYPES))
        missing = wider.load_state_dict(seq.state_dict(), strict=False).missing_keys
        if any(not k.startswith("seg_proj.") for k in missing):
            raise SystemExit(f"--init bundle {path}: its sequence head lacks {missing}")
        seq = wider
    log.info("initialised", bundle=str(path), sha256=manifest["weights"]["sha256"][:12], stem=stem)
    return net.train(), seq.train()


def _lineage(path: str | Path) -> dict[str, Any]:
    """What the --init bundle was trained on, kept in the new manifest: a sequence-head-only stage
    (``--epochs 0``) keeps that bundle's slice network, so its data still describes the weights."""
    manifest = read_manifest(path)
    tr = manifest.get("training") or {}
    return {"version": manifest.get("version"), "sha256": manifest.get("weights", {}).get("sha256"),
            "command": tr.get("command"), "data": tr.get("data"), "studies": tr.get("studies"),
            "initial_training": tr.get("initial_training")}


def set_threads() -> None:
    """Training takes up to 2 cores; the usual OMP_NUM_THREADS knob wins (e.g. 1 on a shared host)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(max(1, int(omp)) if omp.isdigit() else max(1, min(2, os.cpu_count() or 1)))


def main(args: argparse.Namespace, settings: Any) -> int:
    if getattr(args, "input", "hu") == "brain_window":
        from triage.models import train_mixed

        return train_mixed.main(args, settings)
    if "slices:" in f"{args.dataset}+{args.val or ''}":
        raise SystemExit("slice sets are windowed 8-bit images without the HU this recipe reads: "
                         "train on them with --input brain_window")
    set_threads()
    device = resolve_device(getattr(args, "device", "auto"))
    rng = seed_everything(int(args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = int(getattr(args, "size", 96) or 96)
    stem = int(getattr(args, "stem", 1) or 1)
    if stem < 1 or size % stem:
        raise SystemExit(f"--size {size} must be a multiple of --stem {stem}")
    cfg = PreprocessConfig(size=size, base_size=max(PreprocessConfig.base_size, size))
    cache = Path(getattr(args, "cache", "") or (Path(settings.data_dir) / "cache" / "models"))
    workers = int(getattr(args, "workers", 1) or 1)
    steps = int(getattr(args, "steps_per_epoch", 0) or 0) or None
    widths = WIDTHS
    seq_epochs = int(getattr(args, "seq_epochs", 15))
    tta = str(getattr(args, "tta", "none") or "none")
    per_label = bool(getattr(args, "per_label_rules", False))
    hard = getattr(args, "hard_fraction", None)
    try:  # refused before minutes of preprocessing
        hard_fraction = check_hard_fraction(HARD_FRACTION if hard is None else float(hard))
    except ValueError as exc:
        raise SystemExit(f"--hard-fraction: {exc}") from None
    t_start = time.time()
    if int(args.epochs) <= 0 and not getattr(args, "init", ""):  # refused before minutes of preprocessing
        raise SystemExit("--epochs 0 trains only the sequence head, on an --init bundle's slice network")

    train_src = open_source(args.dataset, args.format)
    val_src = open_source(args.val, args.format) if args.val else None
    if any("(slices," in (s.description if s else "") for s in (train_src, val_src)):
        raise SystemExit("slice sets are windowed 8-bit images without the HU this recipe reads: "
                         "train on them with --input brain_window")
    same_kind = val_src is not None and val_src.name.split(":")[0] == train_src.name.split(":")[0]
    if val_src and same_kind and set(val_src.keys) & set(train_src.keys):
        raise SystemExit("training and validation sets overlap; use disjoint seeds")
    # memory-mapped: a training set larger than RAM is paged by the kernel (session 12's 640 + 600
    # studies at 256 px were killed for memory when held in the process)
    train = cached_studies(train_src, cfg, cache, workers, target_size=size // stem, mmap=True)
    val = cached_studies(val_src, cfg, cache, workers, target_size=size // stem, mmap=True) if val_src else []
    t_data = time.time() - t_start

    net = ICHNet(cfg.channels, widths, stem=stem)
    seq = SequenceHead(net.feat_dim, seg_inputs=len(SUBTYPES))
    init = getattr(args, "init", "") or ""
    if init:  # fine-tune: start from a bundle's weights (e.g. the synthetic bundle before real data)
        net, seq = init_from_bundle(init, cfg, stem)
    log.info("training", studies=len(train), val=len(val), params=count_params(net) + count_params(seq),
             device=str(device))
    t0 = time.time()
    lr = float(getattr(args, "lr", 2e-3) or 2e-3)
    if int(args.epochs) > 0:
        history = train_cnn(net, train, int(args.epochs), out, device, rng, bool(args.resume), lr=lr,
                            steps_per_epoch=steps, hard_fraction=hard_fraction)
    else:  # second stage: the slice network is kept; the sequence head learns from its outputs
        history = []  # on studies it never saw, whose scores are not over-confident (stacking)
    t_cnn = time.time() - t0
    t0 = time.time()
    feats = slice_features(net, train, device, mirror=tta == "flip")
    seq_hist = train_sequence(seq.to(device), feats, seq_epochs, rng)
    t_seq = time.time() - t0

    net.eval()
    seq.eval()
    selection: dict[str, Any] = {"rule": "sequence_max", "thresholds": dict.fromkeys(LABELS, 0.5)}
    if val:
        truth = np.stack([s.exam_labels for s in val])
        scores = validation_scores(net, seq, val, cfg, device, flip=tta == "flip")
        # kept beside the checkpoints, so another operating point can be chosen without retraining
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_validation_scores(out / "checkpoints" / "validation_scores.npz", val, truth, scores)
        selection = choose_rule_and_thresholds(scores, truth, float(getattr(args, "sensitivity", ANY_SENSITIVITY)),
                                               per_label=per_label)
    kinds: dict[str, int] = {}
    for s in train:
        kinds[s.meta.get("kind", "")] = kinds.get(s.meta.get("kind", ""), 0) + 1
    manifest = {
        "name": out.name,
        "version": time.strftime("%Y.%m.%d"),
        "description": "Joint 2D U-Net segmentation/classification + bidirectional GRU across slices",
        "intended_use": "Research and software testing only. Trained on synthetic data. NOT for clinical use.",
        "preprocessing": cfg.to_dict(),
        "architecture": {"network": "ICHNet", "widths": list(widths), "stem": stem, "sequence": "BiGRU",
                         "gru_hidden": 48,
                         "parameters": count_params(net) + count_params(seq)},
        "exam_score": selection["rule"],
        "test_time_augmentation": tta,
        "thresholds": selection["thresholds"],
        "mask_refinement": {"probability": 0.5, "hu_range": True, "intracranial": True},
        "training": {
            "command": f"triage train '{args.dataset}' --val '{args.val}' --out {args.out} --epochs {args.epochs} "
                       f"--seed {args.seed} --size {cfg.size} --stem {stem} --steps-per-epoch {steps or 0}"
                       f" --seq-epochs {seq_epochs} --lr {lr:g}"
                       f" --sensitivity {getattr(args, 'sensitivity', ANY_SENSITIVITY)}"
                       + (f" --tta {tta}" if tta != "none" else "")
                       + (" --per-label-rules" if per_label else "")
                       + (f" --hard-fraction {hard_fraction:g}" if hard_fraction != HARD_FRACTION else "")
                       + (f" --init {init}" if init else ""),
            "initialised_from": init or None,
            "initial_training": _lineage(init) if init else None,
            "data": train_src.description,
            "validation": val_src.description if val_src else None,
            "studies": len(train),
            "kinds": kinds,
            "slices": int(sum(s.windows.shape[0] for s in train)),
            "epochs": int(args.epochs),
            "seed": int(args.seed),
            "history": history,
            "sequence_history": seq_hist,
            "seconds": {"data": round(t_data, 1), "cnn": round(t_cnn, 1), "sequence": round(t_seq, 1),
                        "total": round(time.time() - t_start, 1)},
            "device": str(device),
            "host": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        },
        "validation": {k: v for k, v in selection.items() if k != "thresholds"},
    }
    if len(train) >= domain.MIN_STUDIES and len(val) >= domain.MIN_STUDIES:
        # every new bundle says when a series is unlike its training studies (triage/models/domain.py)
        check, summary = domain.fit(domain.study_descriptors(train, cfg.windows),
                                    domain.study_descriptors(val, cfg.windows), cfg.windows)
        val_name = val_src.description if val_src else ""
        manifest["input_domain"] = domain.save(out, check, summary,
                                               f"fitted on {train_src.description}; threshold on {val_name}")
    else:
        log.warning("no input-domain check: it needs training and validation sets of at least "
                    f"{domain.MIN_STUDIES} studies each (`triage domain` can add it later)")
    written = save_bundle(out, net.cpu(), seq.cpu(), manifest)
    print(json.dumps({"bundle": str(out), "sha256": written["weights"]["sha256"], "exam_score": selection["rule"],
                      "thresholds": selection["thresholds"]}, indent=2))
    return 0


def tune(args: argparse.Namespace, settings: Any) -> int:
    """``triage tune BUNDLE --val DATASET``: choose a bundle's exam rule and thresholds again on a
    validation set, with or without mirror test-time augmentation, without retraining.

    The weights are untouched; the manifest's ``exam_score``, ``test_time_augmentation``,
    ``thresholds`` and ``validation`` are rewritten (and ``version`` when given, since the bundle's
    answers change). The thresholds in config still override the bundle's."""
    path = Path(args.bundle)
    manifest = read_manifest(path)
    if manifest.get("preprocessing", {}).get("input") == "brain_window":
        from triage.models import train_mixed

        return train_mixed.tune(args, settings)
    set_threads()
    net, seq = load_weights(path, manifest)
    cfg = PreprocessConfig.from_dict(manifest["preprocessing"])
    cache = Path(getattr(args, "cache", "") or (Path(settings.data_dir) / "cache" / "models"))
    val_src = open_source(args.val, getattr(args, "format", "auto"))
    val = cached_studies(val_src, cfg, cache, int(getattr(args, "workers", 1) or 1), target_size=cfg.size // net.stem,
                         mmap=True)
    if not val:
        raise SystemExit(f"{args.val}: no validation studies")
    tta = str(args.tta)
    truth = np.stack([s.exam_labels for s in val])
    scores = validation_scores(net.eval(), seq.eval(), val, cfg, torch.device("cpu"), flip=tta == "flip")
    scores_out = str(getattr(args, "scores_out", "") or "")
    if scores_out:
        save_validation_scores(Path(scores_out), val, truth, scores)
    per_label = bool(getattr(args, "per_label_rules", False))
    selection = choose_rule_and_thresholds(scores, truth, float(args.sensitivity), per_label=per_label)
    manifest["exam_score"] = selection["rule"]
    manifest["test_time_augmentation"] = tta
    manifest["thresholds"] = selection["thresholds"]
    manifest["validation"] = {k: v for k, v in selection.items() if k != "thresholds"}
    manifest["tuned"] = {"command": f"triage tune <bundle> --val '{args.val}' --tta {tta}"
                                    f" --sensitivity {args.sensitivity}"
                                    + (" --per-label-rules" if per_label else ""),
                         "validation": val_src.description}
    if getattr(args, "version", ""):
        manifest["version"] = str(args.version)
    write_manifest(path, manifest)
    print(json.dumps({"bundle": str(path), "exam_score": selection["rule"], "test_time_augmentation": tta,
                      "thresholds": selection["thresholds"],
                      "auc_any": selection["rules"][exam_rules(selection["rule"])["any"]]["auc"]["any"]}, indent=2))
    return 0
