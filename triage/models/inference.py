"""Inference: load a bundle once, predict on :class:`~triage.imaging.volume.Volume` objects.

``load_bundle(None)`` loads the shipped default bundle. ``Bundle.predict`` fills every field of
:class:`~triage.models.types.Prediction`, masks and heatmaps in the input volume's geometry.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from triage.imaging.volume import Volume
from triage.labels import LABELS, SUBTYPES
from triage.logging import get_logger
from triage.models.bundle import BundleError, default_bundle_path, load_weights, read_manifest
from triage.models.domain import DomainCheck
from triage.models.domain import load as load_domain
from triage.models.export import onnx_session
from triage.models.gradcam import gradcam_heatmaps, gradcam_maps
from triage.models.network import ICHNet, SequenceHead
from triage.models.preprocess import (
    Prepared,
    PreprocessConfig,
    disk,
    from_network_grid,
    intracranial_mask,
    key_slice_input,
    needs_intracranial,
    network_input,
    prepare,
    seg_probs_on_input_grid,
    with_intracranial,
)
from triage.models.types import BundleIdentity, Prediction

log = get_logger(__name__)

CHUNK = 8  # slices per forward pass: bounds the activations (32 took 600 MB more RSS, no faster; docs/benchmarks.md)
MAX_KEY_SLICES = 5


def inference_threads(configured: int = 0) -> int:
    """Intra-op threads for inference: ``configured`` when > 0, else one core left to the rest of
    the node (receiver, database, web), at most 2. On a busy 2-core host two threads stall each
    other at every parallel region (measured: Grad-CAM and detection 2-10x slower than with one)."""
    if configured > 0:
        return int(configured)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores - 1))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seg_evidence(seg_logits: torch.Tensor, brain_small: np.ndarray) -> torch.Tensor:
    """(Z, 5): the per-slice maximum of each subtype's segmentation probability inside the
    intracranial space, from logits on the U-Net grid (on a coarser grid than ``brain_small``: over
    the cells that touch it)."""
    brain = torch.from_numpy(np.asarray(brain_small))[:, None].float()
    if brain.shape[-2:] != seg_logits.shape[-2:]:  # a stem network: the U-Net grid is coarser
        brain = F.adaptive_max_pool2d(brain, seg_logits.shape[-2:])
    return (torch.sigmoid(seg_logits.float().cpu()) * brain).flatten(2).amax(dim=2)


@torch.no_grad()
def run_networks(net: ICHNet, seq: SequenceHead, windows_u8: np.ndarray, brain_small: np.ndarray,
                 cfg: PreprocessConfig, device: torch.device = torch.device("cpu"),
                 session: Any | None = None, flip: bool = False) -> dict[str, np.ndarray]:
    """Network outputs on the network grid. ``session``: an ONNX Runtime session of the slice
    network (:mod:`triage.models.export`) that runs it instead of ``net``.

    ``flip``: test-time augmentation. The series is also run mirrored left-right and the two passes
    are averaged (probabilities and per-slice maxima; segmentation logits mirrored back), which
    makes the outputs mirror-invariant, at twice the network time.

    Returns ``slice_probs`` (Z, 6) from the sequence head, ``cnn_slice_probs`` (Z, 6) from the slice
    network alone, ``seg_logits`` float32 (Z, 5, G, G) on the U-Net grid (G = S / stem; masks
    are made from them by :func:`seg_probs_on_input_grid`, only on the slices that need it) and
    ``seg_max`` (Z, 5) the per-slice maximum of the segmentation probabilities inside the
    intracranial space (on the U-Net grid: over the cells that touch it).
    """
    if flip:
        a = run_networks(net, seq, windows_u8, brain_small, cfg, device, session)
        b = run_networks(net, seq, np.ascontiguousarray(windows_u8[..., ::-1]),
                         np.ascontiguousarray(brain_small[..., ::-1]), cfg, device, session)
        out = {k: ((a[k] + b[k]) / 2).astype(np.float32) for k in ("slice_probs", "cnn_slice_probs", "seg_max")}
        out["seg_logits"] = ((a["seg_logits"] + b["seg_logits"][..., ::-1]) / 2).astype(np.float32)
        return out
    x = network_input(windows_u8, cfg.context)
    segs, logits, feats = [], [], []
    for i in range(0, x.shape[0], CHUNK):
        if session is not None:
            seg_i, slice_i, feat_i = (torch.from_numpy(a) for a in session.run(None, {"x": x[i : i + CHUNK].numpy()}))
        else:
            out = net(x[i : i + CHUNK].to(device), full_seg=False)
            seg_i, slice_i, feat_i = out["seg"], out["slice"], out["feat"]
        segs.append(seg_i.float().cpu())
        logits.append(slice_i.float().cpu())
        feats.append(feat_i.float().cpu())
    seg_logits = torch.cat(segs)
    seg_max = seg_evidence(seg_logits, brain_small)
    cnn_logits = torch.cat(logits)
    seq_logits = seq(torch.cat(feats)[None].to(device), cnn_logits[None].to(device),
                     seg_max[None].to(device) if seq.seg_inputs else None)[0].cpu()
    return {
        "slice_probs": torch.sigmoid(seq_logits).numpy().astype(np.float32),
        "cnn_slice_probs": torch.sigmoid(cnn_logits).numpy().astype(np.float32),
        "seg_logits": seg_logits.numpy(),
        "seg_max": seg_max.numpy(),
    }


EXAM_RULES = ("sequence_max", "segmentation_max", "mean", "max")
TTA_MODES = ("none", "flip")  # test-time augmentation (manifest "test_time_augmentation")
ExamRule = str | dict[str, str]  # one rule for every label, or a rule per label (manifest "exam_score")


def exam_rules(rule: ExamRule) -> dict[str, str]:
    """The rule of each label: ``rule`` itself for all, or a per-label mapping (a label left out
    keeps ``sequence_max``). Unknown rules or labels raise ValueError."""
    if isinstance(rule, str):
        rules = dict.fromkeys(LABELS, rule)
    else:
        unknown = set(rule) - set(LABELS)
        if unknown:
            raise ValueError(f"exam score rule for unknown labels {sorted(unknown)} (labels: {LABELS})")
        rules = {lab: str(rule.get(lab, "sequence_max")) for lab in LABELS}
    for r in rules.values():
        if r not in EXAM_RULES:
            raise ValueError(f"unknown exam score rule {r!r} (choose from {EXAM_RULES})")
    return rules


def exam_scores(slice_probs: np.ndarray, seg_max: np.ndarray, rule: ExamRule) -> np.ndarray:
    """Exam probabilities (6,) from slice probabilities and segmentation evidence.

    ``sequence_max``: max over slices of the sequence-head probabilities (CNN-RNN).
    ``segmentation_max``: max segmentation probability per subtype, "any" = max over subtypes
    (PatchFCN's exam score = max). ``mean``: the average of the two; ``max``: the larger.
    A per-label mapping applies each label's own rule (chosen on validation by ``triage tune``).
    """
    rules = exam_rules(rule)
    seq = slice_probs.max(axis=0) if len(slice_probs) else np.zeros(6, np.float32)
    segm = seg_max.max(axis=0) if len(seg_max) else np.zeros(5, np.float32)
    by_rule = _by_rule(seq, segm)
    return np.array([by_rule[rules[lab]][i] for i, lab in enumerate(LABELS)], dtype=np.float32)


def _by_rule(seq: np.ndarray, seg: np.ndarray) -> dict[str, np.ndarray]:
    """Scores (..., 6) of each rule from slice probabilities (..., 6) and segmentation maxima
    (..., 5), whose "any" is their largest subtype: for one exam (maxima over slices) or per slice."""
    seg6 = np.concatenate([seg.max(axis=-1, keepdims=True), seg], axis=-1).astype(np.float32)
    return {"sequence_max": seq, "segmentation_max": seg6, "mean": (seq + seg6) / 2.0,
            "max": np.maximum(seq, seg6)}


def slice_scores(slice_probs: np.ndarray, seg_max: np.ndarray, rule: ExamRule) -> np.ndarray:
    """(Z, 6) per-slice scores under the exam rule(s): the slice probabilities for
    ``sequence_max``, the segmentation's per-slice maximum ("any" = its largest subtype) for
    ``segmentation_max``, the larger of the two for ``max`` and their average for ``mean``. For every
    rule but ``mean`` the exam score (:func:`exam_scores`) is their maximum over slices, so a slice
    and its exam are judged by one threshold (key slices, slice-level evaluation)."""
    rules = exam_rules(rule)
    if not len(slice_probs):
        return np.zeros((0, len(LABELS)), np.float32)
    seg = seg_max if seg_max.size else np.zeros((len(slice_probs), 5), np.float32)
    by_rule = _by_rule(slice_probs, seg)
    return np.stack([by_rule[rules[lab]][:, i] for i, lab in enumerate(LABELS)], axis=1).astype(np.float32)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the seconds it took (for work run on another thread)."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def decide(exam: dict[str, float], thresholds: dict[str, float]) -> dict[str, bool]:
    """Present flags. Subtypes are reported only on an "any"-positive exam; a positive exam whose
    subtypes all fall under their thresholds reports its most probable subtype, so every positive
    exam names one."""
    present = {lab: bool(exam[lab] >= thresholds[lab]) for lab in LABELS}
    if not present["any"]:
        return dict.fromkeys(LABELS, False)
    if not any(present[s] for s in SUBTYPES):
        present[max(SUBTYPES, key=lambda s: exam[s] / max(thresholds[s], 1e-6))] = True
    return present


def abc2_ml(mask: np.ndarray, pixel_spacing: tuple[float, float], slice_spacing: float) -> float:
    """ABC/2 (mL): A = longest in-plane diameter on the largest slice, B = the largest extent
    perpendicular to A on that slice, C = number of slices with the lesion x slice spacing."""
    areas = mask.sum(axis=(1, 2))
    if not areas.any():
        return 0.0
    z = int(np.argmax(areas))
    ys, xs = np.nonzero(mask[z])
    pts = np.stack([ys * float(pixel_spacing[0]), xs * float(pixel_spacing[1])], axis=1)
    if len(pts) > 2000:  # the diameter lies on the hull; sub-sample the interior for speed
        pts = pts[np.random.default_rng(0).choice(len(pts), 2000, replace=False)]
    if len(pts) < 2:
        a = b = float(np.mean(pixel_spacing))
    else:
        dy = pts[:, None, 0] - pts[None, :, 0]
        dx = pts[:, None, 1] - pts[None, :, 1]
        d2 = dy * dy
        d2 += dx * dx  # = ((pts[:, None] - pts[None]) ** 2).sum(-1), without the (N, N, 2) temporary
        del dy, dx
        i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
        a = float(np.sqrt(d2[i, j])) + float(np.mean(pixel_spacing))
        u = (pts[j] - pts[i]) / max(np.sqrt(d2[i, j]), 1e-6)
        perp = pts @ np.array([-u[1], u[0]])
        b = float(perp.max() - perp.min()) + float(np.mean(pixel_spacing))
    c = int((areas > 0).sum()) * float(slice_spacing)
    return a * b * c / 2.0 / 1000.0


def grow_into_blood(hu: np.ndarray, brain: np.ndarray, mask: np.ndarray, px_mm: float, reach_mm: float,
                    hu_range: tuple[float, float]) -> np.ndarray:
    """``mask`` (Z, Y, X) plus, slice by slice, the blood-dense tissue (``hu_range``, inside ``brain``,
    opened by a 3x3 cross so single noisy pixels do not bridge) connected to it within ``reach_mm``.

    The network's masks of real bleeds are too small (on real masked slices: precision 0.8-0.95,
    recall 0.40-0.46); the HU of the bleed tell where it ends. The reach keeps a wrong seed from
    spreading along the cortex or a dural sinus."""
    out = mask.copy()
    lo, hi = hu_range
    reach = reach_mm / px_mm
    r = int(np.ceil(reach))
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        ys, xs = np.nonzero(mask[z])
        y0, y1 = max(0, ys.min() - r), min(mask.shape[1], ys.max() + r + 1)
        x0, x1 = max(0, xs.min() - r), min(mask.shape[2], xs.max() + r + 1)
        seed = mask[z, y0:y1, x0:x1]
        h = hu[z, y0:y1, x0:x1]
        band = ndimage.binary_opening((h >= lo) & (h <= hi) & brain[z, y0:y1, x0:x1])
        band &= ndimage.distance_transform_edt(~seed) <= reach
        lab, n = ndimage.label(band)
        if n:
            hit = np.unique(lab[seed & (lab > 0)])
            out[z, y0:y1, x0:x1] |= np.isin(lab, hit[hit > 0])
    return out


def key_slices(slice_probs: np.ndarray, label_index: int, threshold: float) -> list[int]:
    order = np.argsort(-slice_probs[:, label_index], kind="stable")
    keys = [int(z) for z in order[:MAX_KEY_SLICES] if slice_probs[z, label_index] >= threshold]
    return keys or [int(order[0])]


@dataclass
class Bundle:
    """A loaded model bundle. Thread-unsafe: use one per worker."""

    path: Path
    manifest: dict[str, Any]
    net: ICHNet
    seq: SequenceHead
    thresholds: dict[str, float]
    device: torch.device
    cfg: PreprocessConfig
    session: Any | None = None  # ONNX Runtime session of the slice network (CPU), else PyTorch
    domain: DomainCheck | None = None  # the input-domain check (manifest ``input_domain``), if any

    @property
    def runtime(self) -> str:
        """Where the slice network runs: "onnxruntime" or "torch"; recorded with every result."""
        return "onnxruntime" if self.session is not None else "torch"

    @property
    def identity(self) -> BundleIdentity:
        return BundleIdentity(self.manifest["name"], str(self.manifest["version"]),
                              self.manifest["weights"]["sha256"])

    @property
    def exam_rule(self) -> ExamRule:
        """The manifest's ``exam_score``: one rule, or a rule per label."""
        rule = self.manifest.get("exam_score", "sequence_max")
        return dict(rule) if isinstance(rule, dict) else str(rule)

    @property
    def flip(self) -> bool:
        """Mirror test-time augmentation (manifest ``test_time_augmentation`` = "flip")."""
        return self.manifest.get("test_time_augmentation", "none") == "flip"

    @property
    def refine_hu(self) -> bool:
        return bool(self.manifest.get("mask_refinement", {}).get("hu_range", True))

    def warm_up(self) -> None:
        """A forward pass and a Grad-CAM backward on zeros: the first series does not pay for torch's
        lazy start (kernel selection, autograd), measured at several seconds on a busy 2-core host."""
        s = self.cfg.size
        win = np.zeros((2, len(self.cfg.windows), s, s), np.uint8)
        run_networks(self.net, self.seq, win, np.zeros((2, s, s), bool), self.cfg, self.device, self.session,
                     self.flip)
        gradcam_maps(self.net, key_slice_input(win, self.cfg.context, [0, 1]).to(self.device), {0: [0, 1]})

    def unreadable_slices(self, hu: np.ndarray, prep: Prepared, out: dict[str, np.ndarray],
                          pixel_spacing: tuple[float, float], hu_known: bool = True) -> np.ndarray:
        """Bool (Z,): slices of a ``brain_window`` bundle that do not count toward the exam.

        * Caps: an intracranial cross-section (from HU) under ``min_area_cm2`` (skull base, vertex).
        * Without HU confirmation (manifest ``hu_confirmation``): a slice where no blood-dense tissue
          backs the network: inside the intracranial space, where the segmentation is 0.5 or more,
          fewer than ``min_area_mm2`` of pixels within ``hu`` (acute blood is hyperdense; after an
          opening by a 1 mm disk, so noise specks and thin streaks do not count), leaving out the
          rim of calcifications away from the skull (within 2.5 mm of tissue denser than ``hu``).
          Every slice is checked, called or not: the exam's score ranks the worklist, and an
          unbacked slice must not outrank a backed one (until 2026.12.06.3 only slices at the "any"
          threshold were, so an unbacked 0.76 counted and an unbacked 0.78 did not). The brain
          window saturates at 80 HU, so the network cannot tell dense calcium from blood, nor does
          it see HU at all; the node does, and this is where it uses them.
        """
        z = hu.shape[0]
        unread = np.zeros(z, bool)
        if self.cfg.min_area_cm2 > 0:
            area = np.asarray(prep.extra.get("intracranial_cm2", np.full(z, np.nan)), np.float32)
            caps = np.nan_to_num(area, nan=np.inf) < self.cfg.min_area_cm2
            if not caps.all():
                unread |= caps
        conf = self.manifest.get("hu_confirmation")
        if not conf or not hu_known:
            return unread
        lo, hi = (float(v) for v in conf.get("hu", (50.0, 100.0)))
        min_px = float(conf.get("min_area_mm2", 8.0)) / (float(pixel_spacing[0]) * float(pixel_spacing[1]))
        px_mm = float(np.mean(pixel_spacing))
        # every slice is looked at, called or not, so that no slice without blood-dense tissue
        # outranks one with it; a slice whose segmentation never reaches 0.5 has none to show
        # (bilinear up-sampling never exceeds its inputs), and needs no morphology to say so
        if not out["seg_logits"].size:
            return unread
        top = out["seg_logits"].max(axis=1)  # the most probable subtype per pixel
        unread |= top.reshape(z, -1).max(axis=1) < 0.0
        for zi in np.flatnonzero(~unread):
            logits = top[zi : zi + 1]
            fine = seg_probs_on_input_grid(logits, prep.brain_small[zi : zi + 1])
            up = from_network_grid(fine, prep.box, (1, *hu.shape[1:]))[0]
            inside = prep.brain_mask[zi]
            dense = (up >= 0.5) & inside & (hu[zi] >= lo) & (hu[zi] <= hi)
            # the partial-volume rim of a calcification (choroid plexus, pineal, dystrophic) reads
            # 50-100 HU: tissue within ~2.5 mm of a denser spot away from the skull does not confirm
            deep = ndimage.binary_erosion(inside, iterations=max(1, int(round(3.0 / px_mm))))
            calc = deep & (hu[zi] > hi)
            if calc.any():
                dense &= ~ndimage.binary_dilation(calc, iterations=max(1, int(round(2.5 / px_mm))))
            dense = ndimage.binary_opening(dense, structure=disk(max(1, int(round(1.0 / px_mm)))))
            unread[zi] = dense.sum() < min_px
        return unread

    def build_masks(self, hu: np.ndarray, prep: Prepared, seg_logits: np.ndarray, present: dict[str, bool],
                    refine_hu: bool, grow: bool = False) -> dict[str, np.ndarray]:
        """Full-resolution masks of the present subtypes: up-sampled probability >= 0.5 inside the
        intracranial mask and, with ``refine_hu``, within the acute-blood HU range (specks < 3 voxels
        that the HU gate leaves behind are dropped). With ``grow`` (values are HU) and a bundle whose
        manifest asks for it (``mask_refinement.grow``), each mask takes in the blood-dense tissue
        connected to it nearby (:func:`grow_into_blood`).

        On an exam called positive, blood the network segments under a subtype that is not called
        (the same rule on the largest of those channels) and no called subtype's mask holds is
        ``masks["any"]``: the reported total is all the blood it sees, not only the called subtypes'
        (a haematoma called intraparenchymal whose ventricular extension did not reach its own
        threshold keeps that part)."""
        masks: dict[str, np.ndarray] = {}
        for k, sub in enumerate(SUBTYPES):
            if present.get(sub):
                masks[sub] = self._mask(hu, prep, seg_logits[:, k], refine_hu)
        others = [k for k, sub in enumerate(SUBTYPES) if not present.get(sub)]
        if present.get("any") and others and len(seg_logits):
            rest = self._mask(hu, prep, seg_logits[:, others].max(axis=1), refine_hu)
            for m in masks.values():
                rest &= ~m
            if rest.any():
                masks["any"] = rest
        how = self.manifest.get("mask_refinement", {}).get("grow")
        spacing = prep.extra.get("pixel_spacing")
        if grow and refine_hu and how and spacing is not None and masks:
            # each mask grows only where no other mask is, nor what an earlier one grew into: the
            # masks stay disjoint where the network's were, and the subtype volumes add up
            claimed = np.zeros(prep.shape, bool)
            for m in masks.values():
                claimed |= m
            for label, m in masks.items():
                grown = grow_into_blood(hu, prep.brain_mask & ~(claimed & ~m), m, float(np.mean(spacing)),
                                        float(how["mm"]), (float(how["hu"][0]), float(how["hu"][1])))
                claimed |= grown
                masks[label] = grown
        return masks

    def _mask(self, hu: np.ndarray, prep: Prepared, logits: np.ndarray, refine_hu: bool) -> np.ndarray:
        """One channel's (Z, h, w) U-Net-grid logits -> its full-resolution mask (see build_masks)."""
        # Only slices with a logit >= 0 (probability 0.5) can hold a voxel (bilinear up-sampling never
        # exceeds its inputs; the margin covers rounding), and components are labelled in the bounding
        # box of the mask: the same mask as working on the whole volume, at a fraction of it.
        lo, hi = self.cfg.blood_hu
        m = np.zeros(prep.shape, bool)
        zs = np.flatnonzero(logits.reshape(len(logits), -1).max(axis=1) >= -1e-3)
        if zs.size:
            fine = seg_probs_on_input_grid(logits[zs], prep.brain_small[zs])
            up = from_network_grid(fine, prep.box, (len(zs),) + tuple(prep.shape[1:]))
            m[zs] = (up >= 0.5) & prep.brain_mask[zs]
        if refine_hu and m.any():
            box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(m))
            sub_m = m[box] & (hu[box] >= lo) & (hu[box] <= hi)
            lab, n = ndimage.label(sub_m)
            if n:
                sub_m &= (np.bincount(lab.ravel()) >= 3)[lab]
            m[box] = sub_m
        return m

    def _masks_and_volumes(self, hu: np.ndarray, prep: Prepared, seg_logits: np.ndarray, present: dict[str, bool],
                           volume: Volume, hu_known: bool
                           ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
        """The output masks (:meth:`build_masks`), their volumes (mL) and ABC/2 estimates, per subtype
        and "any" (the union)."""
        masks = self.build_masks(hu, prep, seg_logits, present, self.refine_hu, grow=hu_known)
        union = np.zeros(hu.shape, bool)
        for m in masks.values():
            union |= m
        vox_ml = volume.voxel_volume_ml
        volumes = {sub: float(masks[sub].sum() * vox_ml) if sub in masks else 0.0 for sub in SUBTYPES}
        volumes["any"] = float(union.sum() * vox_ml)
        abc = {sub: abc2_ml(masks[sub], volume.pixel_spacing, volume.slice_spacing) if sub in masks else 0.0
               for sub in SUBTYPES}
        abc["any"] = abc2_ml(union, volume.pixel_spacing, volume.slice_spacing) if masks else 0.0
        return masks, volumes, abc

    def predict(self, volume: Volume, gradcam: bool = True, keep: dict[str, Any] | None = None,
                hu_known: bool = True) -> Prediction:
        """Run preprocessing, detection, segmentation and Grad-CAM on one series.

        ``hu_known`` False: the volume's values are not HU (a slice set's pixels in an unknown
        window, read through an assumed one): the HU check of a ``brain_window`` bundle is skipped.

        Inference takes one core (:func:`inference_threads`); the morphology on the full-resolution
        grid (SciPy, which releases the GIL) runs beside the networks on a second thread: the HU
        intracranial mask while the slice network reads the series, the output masks during
        Grad-CAM. ``timings``: "preprocess" includes the intracranial mask's own time and
        "segmentation" the masks' own, so with the overlap the stages add up to more than the wall
        time."""
        hu = np.asarray(volume.hu, dtype=np.float32)
        if hu.ndim != 3 or min(hu.shape) < 1:
            raise ValueError(f"volume must be (Z, Y, X) with at least one slice, got {hu.shape}")
        torch.manual_seed(0)
        timings: dict[str, float] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict") as beside:
            t0 = time.perf_counter()
            pending = (beside.submit(_timed, intracranial_mask, hu, volume.pixel_spacing, self.cfg.bone_hu)
                       if needs_intracranial(hu, self.cfg) else None)
            prep = prepare(hu, volume.pixel_spacing, self.cfg, intracranial=pending is None)
            timings["preprocess"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            out = run_networks(self.net, self.seq, prep.windows, prep.brain_small, self.cfg, self.device,
                               self.session, self.flip)
            if pending is not None:  # needed from here on (caps, HU check, masks, heat maps)
                brain_mask, seconds = pending.result()
                prep = with_intracranial(prep, brain_mask)
                timings["preprocess"] += seconds
            if keep is not None:
                keep["prep"] = prep
            if self.cfg.input == "brain_window":
                unread = self.unreadable_slices(hu, prep, out, volume.pixel_spacing, hu_known)
                if unread.any():
                    out = dict(out, slice_probs=out["slice_probs"].copy(), seg_max=out["seg_max"].copy())
                    out["slice_probs"][unread] = 0.0
                    out["seg_max"][unread] = 0.0
                if keep is not None:
                    keep["unread_slices"] = unread
            # per slice, the score the exam rule takes its maximum of (not always the slice network's)
            slice_probs = slice_scores(out["slice_probs"], out["seg_max"], self.exam_rule)
            probs = exam_scores(out["slice_probs"], out["seg_max"], self.exam_rule)
            exam = {lab: float(probs[i]) for i, lab in enumerate(LABELS)}
            present = decide(exam, self.thresholds)
            domain = self.domain.assess(prep.windows, prep.brain_small) if self.domain is not None else None
            timings["detection"] = time.perf_counter() - t0
            if keep is not None:
                keep["outputs"] = out

            masking = beside.submit(_timed, self._masks_and_volumes, hu, prep, out["seg_logits"], present,
                                    volume, hu_known)
            t0 = time.perf_counter()
            keys = {lab: key_slices(slice_probs, i, self.thresholds[lab])
                    for i, lab in enumerate(LABELS) if present[lab]}
            heatmaps: dict[str, np.ndarray] = {}
            if gradcam and keys:  # positive labels only, their key slices only (triage/models/gradcam.py)
                heatmaps = gradcam_heatmaps(self.net, prep.windows, self.cfg.context, keys, prep.brain_small,
                                            prep.brain_mask, prep.box, prep.shape, seg_logits=out["seg_logits"],
                                            device=self.device)
            gradcam_s = time.perf_counter() - t0
            (masks, volumes, abc), timings["segmentation"] = masking.result()
            timings["gradcam"] = gradcam_s
        return Prediction(
            exam_probs=exam,
            thresholds=dict(self.thresholds),
            present=present,
            slice_probs=slice_probs,
            masks=masks,
            volumes_ml=volumes,
            abc2_ml=abc,
            heatmaps=heatmaps,
            key_slices=keys,
            brain_mask=prep.brain_mask,
            timings=timings,
            bundle=self.identity,
            device=str(self.device) + ("+onnxruntime" if self.session is not None else ""),
            input_domain=domain,
        )


RUNTIMES = ("auto", "torch", "onnx")


def load_bundle(path: str | os.PathLike[str] | None = None, device: str = "auto",
                thresholds_override: dict[str, float] | None = None, threads: int = 0,
                runtime: str = "auto") -> Bundle:
    """Load, verify (sha256) and warm up a bundle; None or "" -> the shipped default bundle.

    ``threads``: intra-op threads of this process (0 = :func:`inference_threads`'s choice).
    ``runtime``: where the slice network runs on CPU. "auto": ONNX Runtime when the bundle has a
    verified ONNX export and onnxruntime is installed, else PyTorch; "onnx": ONNX Runtime or an
    error; "torch": always PyTorch. On a GPU the network runs in PyTorch.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    torch.set_num_threads(inference_threads(threads))
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    p = Path(path) if path else default_bundle_path()
    manifest = read_manifest(p)
    if manifest.get("test_time_augmentation", "none") not in TTA_MODES:
        raise BundleError(f"{p}: test_time_augmentation must be one of {TTA_MODES}")
    try:
        exam_rules(manifest.get("exam_score", "sequence_max"))
    except ValueError as exc:
        raise BundleError(f"{p}: exam_score: {exc}") from exc
    net, seq = load_weights(p, manifest)
    dev = resolve_device(device)
    thresholds = {lab: float(manifest["thresholds"][lab]) for lab in LABELS}
    for lab, value in (thresholds_override or {}).items():
        if lab not in thresholds:
            raise ValueError(f"threshold override for unknown label {lab!r} (labels: {', '.join(LABELS)})")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"threshold for {lab!r} must be within [0, 1], got {value}")
        thresholds[lab] = float(value)
    session = None
    if runtime != "torch" and dev.type == "cpu":
        session = onnx_session(p, manifest, torch.get_num_threads())
    if runtime == "onnx" and session is None:
        raise BundleError(f"runtime 'onnx' asked for, but {p} has no ONNX export (`triage export`), onnxruntime "
                          "is not installed, or the device is not the CPU")
    bundle = Bundle(p, manifest, net.to(dev), seq.to(dev), thresholds, dev,
                    PreprocessConfig.from_dict(manifest["preprocessing"]), session,
                    load_domain(p, manifest))
    bundle.warm_up()
    log.info("bundle_loaded", bundle=str(bundle.identity), device=str(dev), runtime=bundle.runtime)
    return bundle


def load_dicom_folder(path: str | os.PathLike[str]) -> Volume:
    """A Volume from a folder of DICOM files, built by the node's assembler (same geometry handling
    as the worker)."""
    from triage.dicom.assembly import load_volume

    p = Path(path)
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    if not files:
        raise FileNotFoundError(f"no files under {p}")
    volume, _ = load_volume(files)
    return volume


def prediction_summary(pred: Prediction) -> dict[str, Any]:
    return {
        "bundle": str(pred.bundle),
        "positive": pred.positive,
        "exam_probs": {k: round(v, 4) for k, v in pred.exam_probs.items()},
        "thresholds": pred.thresholds,
        "present": pred.present,
        "volumes_ml": {k: round(v, 2) for k, v in pred.volumes_ml.items()},
        "abc2_ml": {k: round(v, 2) for k, v in pred.abc2_ml.items()},
        "key_slices": pred.key_slices,
        "timings_s": {k: round(v, 3) for k, v in pred.timings.items()},
        "input_domain": pred.input_domain,
    }


def cli_infer(args: argparse.Namespace, settings: Any) -> int:
    """``triage infer PATH``: print the findings for one DICOM series folder as JSON."""
    try:
        volume = load_dicom_folder(args.path)
    except (OSError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    bundle = load_bundle(getattr(args, "bundle", "") or settings.bundle_path or None, device=settings.device,
                         thresholds_override=settings.thresholds or None,
                         threads=int(getattr(settings, "inference_threads", 0) or 0),
                         runtime=str(getattr(settings, "inference_runtime", "auto") or "auto"))
    pred = bundle.predict(volume)
    summary = prediction_summary(pred)
    summary["slices"] = int(volume.hu.shape[0])
    print(json.dumps(summary, indent=2))
    return 0
