"""``triage train --input brain_window``: the real-data model.

Trains :class:`~triage.models.network.ICHNet` on the ``brain_window`` input from real slice sets
(``slices:PATH[:split=train,...]``), phantom studies (``phantom:A-B``: voxel truth, all five
subtypes) and real bleed shapes pasted into real blood-free slices (``--shapes DIR``), with the
robustness augmentation of :func:`~triage.models.mixed.robust_augment`. The sequence head is kept at
its identity start (exam score = the maximum slice probability).

Resumable: a checkpoint (weights, optimiser, schedule, random state) is written every
``--steps-per-epoch`` steps with the validation numbers of that moment; ``--resume`` continues.
The preprocessed exams are cached (``--cache``), so a resumed run starts in seconds.

Operating point: the "any" threshold is the highest whose *slice* sensitivity on the real validation
slices is at least ``--sensitivity`` (default 0.95); subtype thresholds are set on the validation
exams that label them (phantoms, subtype-labelled real slices) for 0.95 sensitivity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from triage.labels import LABELS, SUBTYPES
from triage.logging import get_logger
from triage.models.bundle import load_weights, save_bundle
from triage.models.inference import resolve_device, run_networks, slice_scores
from triage.models.metrics import roc_auc
from triage.models.mixed import (
    BLOOD_HU,
    WINDOW_WIDTHS,
    GridExam,
    MixedSampler,
    add_box_pseudo_masks,
    grid_exam_from_slices,
    grid_exam_from_study,
    load_shapes,
    mixed_loss,
)
from triage.models.network import ICHNet, SequenceHead, count_params
from triage.models.preprocess import BRAIN_WINDOW, PreprocessConfig
from triage.models.train import pick_threshold, set_threads

log = get_logger(__name__)

WIDTHS = (16, 32, 64, 96, 128)
SUBTYPE_SENSITIVITY = 0.95
INTENDED_USE = ("Research and software testing only. Trained on public real head CT slices and synthetic "
                "studies; not validated on complete clinical exams. NOT for clinical use.")


def brain_window_config(size: int = 256) -> PreprocessConfig:
    return PreprocessConfig(size=size, base_size=size, windows=BRAIN_WINDOW, context=1, input="brain_window")


# --- data ---------------------------------------------------------------------------------------


def _phantom_exam(args: tuple[Any, str, PreprocessConfig]) -> GridExam:
    source, key, cfg = args
    torch.set_num_threads(1)
    return grid_exam_from_study(source.load(key), cfg)


def load_exams(spec: str, cfg: PreprocessConfig, cache: Path, workers: int = 1) -> tuple[list[GridExam], str]:
    """Exams on the network grid from a '+'-joined spec (slice sets and phantoms), cached per part."""
    exams, descriptions = [], []
    for part in filter(None, spec.split("+")):
        key = hashlib.sha1(json.dumps([part, cfg.to_dict(), 3]).encode()).hexdigest()[:16]
        path = cache / f"mixed-{key}.pkl"
        if path.exists():
            with path.open("rb") as fh:
                got, desc = pickle.load(fh)
        else:
            got, desc = _load_part(part, cfg, workers)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with tmp.open("wb") as fh:
                pickle.dump((got, desc), fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        exams += got
        descriptions.append(desc)
        log.info("exams_loaded", part=part, exams=len(got), slices=sum(len(e.slices) for e in got))
    return exams, "; ".join(descriptions)


def _load_part(part: str, cfg: PreprocessConfig, workers: int) -> tuple[list[GridExam], str]:
    if part.startswith("slices:"):
        from triage.datasets.slices import SliceSet, parse_spec

        path, opts = parse_spec(part)
        ss = SliceSet(path, **opts)
        return [grid_exam_from_slices(ss.load(e), cfg, ss.name) for e in ss.exam_ids()], ss.describe()
    from triage.models.data import open_source

    src = open_source(part)
    items = [(src, k, cfg) for k in src.keys]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            got = list(pool.map(_phantom_exam, items, chunksize=4))
    else:
        got = [_phantom_exam(i) for i in items]
    return got, src.description


# --- scoring ------------------------------------------------------------------------------------


@torch.no_grad()
def exam_outputs(net: ICHNet, seq: SequenceHead, exams: list[GridExam], cfg: PreprocessConfig,
                 flip: bool = False) -> list[dict[str, np.ndarray]]:
    net.eval()
    device = next(net.parameters()).device
    seq.eval().to(device)
    return [run_networks(net, seq, e.windows, e.head, cfg, device, flip=flip) for e in exams]


# Exam rules whose exam score is the maximum over slices of a slice score, so that a threshold set on
# slices means the same on the node's exam score (:func:`~triage.models.inference.exam_scores`).
SLICE_RULES = ("sequence_max", "segmentation_max", "max")


def rule_slice_scores(out: dict[str, np.ndarray], rule: str) -> np.ndarray:
    """(Z, 6) slice scores under ``rule``, as the node computes them
    (:func:`~triage.models.inference.slice_scores`)."""
    if rule not in SLICE_RULES:
        raise ValueError(f"rule {rule!r} is not one of {SLICE_RULES}")
    return slice_scores(out["slice_probs"], out["seg_max"], rule)


def slice_table(exams: list[GridExam], outs: list[dict[str, np.ndarray]], rule: str = "sequence_max"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores (N, 6), labels (N, 6), known (N, 6)) over every slice of the real exams."""
    p, y, k = [], [], []
    for e, o in zip(exams, outs, strict=True):
        if e.source != "real":
            continue
        sc = rule_slice_scores(o, rule)
        for z, s in enumerate(e.slices):
            p.append(sc[z])
            y.append(s.labels)
            k.append(s.label_known)
    if not p:
        return np.zeros((0, 6)), np.zeros((0, 6)), np.zeros((0, 6), bool)
    return np.stack(p), np.stack(y), np.stack(k)


def auc_where_known(probs: np.ndarray, labels: np.ndarray, known: np.ndarray, i: int) -> float:
    m = known[:, i]
    return roc_auc(labels[m, i], probs[m, i]) if m.any() else float("nan")


def threshold_for(scores: np.ndarray, truth: np.ndarray, sensitivity: float) -> float:
    """The highest threshold with sensitivity >= ``sensitivity`` on (scores, truth), rounded *down*
    to 4 decimals: rounding to nearest could lift it above the boundary positive's score, and the
    node's runtime (ONNX Runtime) differs from PyTorch's scores in the 6th decimal."""
    return math.floor(pick_threshold(scores, truth, sensitivity) * 1e4) / 1e4


def choose_rule(exams: list[GridExam], outs: list[dict[str, np.ndarray]], sensitivity: float = 0.95
                ) -> tuple[str, dict[str, Any]]:
    """The slice rule whose deployed operating point is best on real validation slices: the
    specificity at the "any" threshold that keeps ``sensitivity`` (as :func:`threshold_for` sets
    it, capped at 0.99: a score that saturates above the cap cannot use its ranking), then the
    "any" AUC on real slices, then on validation exams; ties go to the slice network's own
    probabilities."""
    table: dict[str, Any] = {}
    for rule in SLICE_RULES:
        probs, labels, known = slice_table(exams, outs, rule)
        real = auc_where_known(probs, labels, known, 0) if len(probs) else float("nan")
        spec = float("nan")
        m0 = known[:, 0] if len(probs) else np.zeros(0, bool)
        if m0.any() and (labels[m0, 0] > 0).any() and (labels[m0, 0] == 0).any():
            t = threshold_for(probs[m0, 0], labels[m0, 0], sensitivity)
            spec = float(np.mean(probs[m0, 0][labels[m0, 0] == 0] < t))
        ex_scores = np.stack([rule_slice_scores(o, rule).max(axis=0) for o in outs])
        ex_truth = np.stack([e.exam_labels for e in exams])
        m = ~np.isnan(ex_truth[:, 0])
        exam = roc_auc(ex_truth[m, 0], ex_scores[m, 0]) if m.any() else float("nan")
        table[rule] = {"real_slice_auc_any": None if math.isnan(real) else round(real, 4),
                       "real_slice_specificity_any": None if math.isnan(spec) else round(spec, 4),
                       "exam_auc_any": None if math.isnan(exam) else round(exam, 4)}

    def key(r: str) -> tuple[float, float, float, bool]:
        sp, a, b = (table[r][k] for k in ("real_slice_specificity_any", "real_slice_auc_any", "exam_auc_any"))
        return (-1.0 if sp is None else sp, -1.0 if a is None else a, -1.0 if b is None else b, r == "sequence_max")

    return max(SLICE_RULES, key=key), table


def choose_thresholds(exams: list[GridExam], outs: list[dict[str, np.ndarray]], sensitivity: float,
                      rule: str = "sequence_max") -> dict[str, Any]:
    """"any": on real validation slices; subtypes: on validation exams (max over slices) that label them."""
    probs, labels, known = slice_table(exams, outs, rule)
    thresholds: dict[str, float] = {}
    points: dict[str, Any] = {}
    if len(probs) and known[:, 0].any() and (labels[known[:, 0], 0] > 0).any():
        m = known[:, 0]
        t = threshold_for(probs[m, 0], labels[m, 0], sensitivity)
        pos, neg = m & (labels[:, 0] > 0), m & (labels[:, 0] == 0)
        points["any"] = {"level": "slice", "threshold": round(t, 6), "positives": int(pos.sum()),
                         "negatives": int(neg.sum()),
                         "sensitivity": float((probs[pos, 0] >= t).mean()),
                         "specificity": float((probs[neg, 0] < t).mean()) if neg.any() else None,
                         "auc": round(roc_auc(labels[m, 0], probs[m, 0]), 4) if neg.any() else None}
        thresholds["any"] = round(t, 6)
    ex_scores = np.stack([rule_slice_scores(o, rule).max(axis=0) for o in outs])
    ex_truth = np.stack([e.exam_labels for e in exams])
    for i, lab in enumerate(LABELS):
        if lab in thresholds:
            continue
        m = ~np.isnan(ex_truth[:, i])
        if not m.any() or not (ex_truth[m, i] > 0).any():
            thresholds[lab] = 0.5
            points[lab] = {"level": "exam", "threshold": 0.5, "positives": 0, "note": "no labelled positives"}
            continue
        t = threshold_for(ex_scores[m, i], ex_truth[m, i], SUBTYPE_SENSITIVITY if lab != "any" else sensitivity)
        pos, neg = m & (ex_truth[:, i] > 0), m & (ex_truth[:, i] == 0)
        thresholds[lab] = round(t, 6)
        points[lab] = {"level": "exam", "threshold": round(t, 6), "positives": int(pos.sum()),
                       "negatives": int(neg.sum()), "sensitivity": float((ex_scores[pos, i] >= t).mean()),
                       "specificity": float((ex_scores[neg, i] < t).mean()) if neg.any() else None,
                       "auc": round(roc_auc(ex_truth[m, i], ex_scores[m, i]), 4) if neg.any() else None}
    return {"thresholds": thresholds, "operating_points": points, "rule": rule}


def validation_summary(exams: list[GridExam], outs: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    probs, labels, known = slice_table(exams, outs)
    real = {lab: auc_where_known(probs, labels, known, i) for i, lab in enumerate(LABELS)} if len(probs) else {}
    ph = [(e, o) for e, o in zip(exams, outs, strict=True) if e.source == "phantom"]
    phantom_auc = float("nan")
    if ph:
        phantom_auc = roc_auc(np.array([e.exam_labels[0] for e, _ in ph]),
                              np.array([o["slice_probs"][:, 0].max() for _, o in ph]))
    return {"real_slice_auc": {k: None if math.isnan(v) else round(v, 4) for k, v in real.items()},
            "phantom_exam_auc_any": None if math.isnan(phantom_auc) else round(phantom_auc, 4)}


def trained_on(exams: list[GridExam], donors: list[GridExam] | None = None, donors_erased: bool = False) -> str:
    """One line for the pages' banner: what the training exams were (and the sets whose drawn blood
    was moved into them, ``--transplant-from``, and whose slices were shown with it erased)."""
    real = [e for e in exams if e.source == "real"]
    sets = sorted({str(e.meta.get("set") or "real") for e in real})
    parts = []
    if real:
        parts.append(f"{sum(len(e.slices) for e in real)} real head CT slices of "
                     f"{len({(e.meta.get('set'), e.meta.get('study')) for e in real})} patients ({', '.join(sets)})")
    n_ph = sum(1 for e in exams if e.source == "phantom")
    if n_ph:
        parts.append(f"{n_ph} synthetic phantom studies")
    if donors:
        sets = sorted({str(e.meta.get("set") or "real") for e in donors})
        bleeding = sum(1 for e in donors for s in e.slices if s.has_blood_pixels)
        parts.append(f"the drawn blood of {bleeding} real slices ({', '.join(sets)}) "
                     + ("moved into blood-free ones, those slices shown only with it erased" if donors_erased
                        else "moved into blood-free ones"))
    return " and ".join(parts) or "no data"


# --- training -----------------------------------------------------------------------------------


def batch_shares(masked: float = 0.0, phantom: float = 0.3, paste: float = 0.15,
                 erase: float = 0.0) -> dict[str, float]:
    """Share of each batch per sample kind: real slices with and without blood (5:6), real slices with
    drawn masks (``masked``, pixel truth on real anatomy), the same with their blood erased
    (``erase``: counterfactual negatives), pasted real bleed shapes and phantom slices."""
    real = 1.0 - masked - phantom - paste - erase
    if real < 0.1 or min(masked, phantom, erase) < 0:
        raise SystemExit(f"batch shares leave {real:.2f} for real slices (masked {masked}, erase {erase}, "
                         f"phantom {phantom}, paste {paste}): keep at least 0.1")
    return {"real_pos": real * 5 / 11, "real_neg": real * 6 / 11, "real_masked": masked, "erase": erase,
            "paste": paste, "phantom": phantom}


def parse_hu_range(text: str, flag: str = "--paste-hu", default: tuple[float, float] = BLOOD_HU
                   ) -> tuple[float, float]:
    """``LO,HI`` (HU) of ``flag`` -> (LO, HI); empty: ``default``."""
    if not text:
        return default
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} wants LO,HI in HU, got {text!r}") from None
    if not lo < hi:
        raise SystemExit(f"{flag} wants LO < HI, got {text!r}")
    return lo, hi


def _held(student: torch.Tensor, teacher: torch.Tensor, free: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples distillation holds: all of them, or those not ``free`` ((N,) 1.0 for samples
    that teach something new: phantoms, pasted bleeds, drawn masks, erased bleeds)."""
    if free is None:
        return student, teacher
    held = free < 0.5
    return student[held], teacher[held]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, free: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """MSE between the (N, labels) slice logits of the student and the teacher, over the held
    samples (:func:`_held`; zero when there are none)."""
    s, t = _held(student, teacher, free)
    return F.mse_loss(s, t) if len(s) else student.sum() * 0.0


def distill_seg_loss(student: torch.Tensor, teacher: torch.Tensor, free: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The segmentation's counterpart of :func:`distill_loss`: the (N, C, H, W) logits pulled to the
    teacher's probabilities (soft-target BCE less the teacher's own entropy: zero where they agree),
    so that the masks of the slices the teacher read well (and their normal anatomy) stay as they
    were while the free samples teach new blood."""
    s, t = _held(student, teacher, free)
    if not len(s):
        return student.sum() * 0.0
    target = torch.sigmoid(t)
    return F.binary_cross_entropy_with_logits(s, target) - F.binary_cross_entropy_with_logits(t, target)


def train_loop(net: ICHNet, sampler: MixedSampler, steps: int, steps_per_epoch: int, out: Path, lr: float,
               batch: int, rng: np.random.Generator, resume: bool, val: list[GridExam], cfg: PreprocessConfig,
               seq: SequenceHead, device: torch.device, teacher: ICHNet | None = None,
               distill: float = 0.0, frozen_encoder: bool = False, distill_real_only: bool = False,
               distill_seg: float = 0.0) -> list[dict[str, Any]]:
    """The training loop (checkpoint each epoch, resumable). With a ``teacher`` and ``distill`` > 0,
    the slice logits are also pulled (MSE, weight ``distill``) to the teacher's on the same batch:
    the segmentation can learn without moving the detector it feeds; ``distill_real_only``: on the
    real slices only, so the phantoms and pasted bleeds are learned freely while the real slices'
    scores stay. ``distill_seg`` > 0: the segmentation too (:func:`distill_seg_loss`, on the same samples).
    ``frozen_encoder``: the encoder's batch-norm statistics stay as trained too (its weights are frozen
    by the caller)."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    ckpt = out / "checkpoints" / "mixed.pt"
    start, history = 0, []
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start, history = int(state["step"]), state["history"]
        log.info("resumed", step=start)
    net.to(device)
    step = start
    t0, tot = time.time(), {"loss": 0.0, "cls": 0.0, "seg": 0.0, "box": 0.0}
    while step < steps:
        net.train()
        if frozen_encoder:
            net.enc.eval()
        b = sampler.batch(batch)
        out_ = net(b["x"].to(device))
        losses = mixed_loss({k: v.cpu() for k, v in out_.items()}, b)
        if teacher is not None and (distill > 0 or distill_seg > 0):
            with torch.no_grad():
                target = teacher(b["x"].to(device))
            free = b["free"].to(device) if distill_real_only else None
            losses["loss"] = (losses["loss"] + distill * distill_loss(out_["slice"], target["slice"], free)
                              + distill_seg * distill_seg_loss(out_["seg"], target["seg"], free))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        step += 1
        for k in tot:
            tot[k] += float(losses[k].detach())
        if step % steps_per_epoch == 0 or step == steps:
            n = steps_per_epoch if step % steps_per_epoch == 0 else step % steps_per_epoch
            rec: dict[str, Any] = {k: round(v / n, 4) for k, v in tot.items()}
            rec |= {"step": step, "seconds": round(time.time() - t0, 1)}
            if val:
                rec |= validation_summary(val, exam_outputs(net, seq, val, cfg))
            history.append(rec)
            log.info("mixed_epoch", **{k: v for k, v in rec.items() if not isinstance(v, dict)},
                     real_any_auc=(rec.get("real_slice_auc") or {}).get("any"),
                     phantom_auc=rec.get("phantom_exam_auc_any"))
            print(json.dumps(rec), flush=True)
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "history": history, "rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state()}, tmp)
            os.replace(tmp, ckpt)
            t0, tot = time.time(), dict.fromkeys(tot, 0.0)
    return history


def main(args: argparse.Namespace, settings: Any) -> int:
    set_threads()
    device = resolve_device(getattr(args, "device", "auto"))
    seed = int(args.seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = int(getattr(args, "size", 0) or 256)
    stem = int(getattr(args, "stem", 0) or 2)
    cfg = brain_window_config(size)
    cache = Path(getattr(args, "cache", "") or (Path(settings.data_dir) / "cache" / "models"))
    workers = int(getattr(args, "workers", 1) or 1)
    spe = int(getattr(args, "steps_per_epoch", 0) or 200)
    steps = max(1, int(args.epochs) * spe)
    batch = int(getattr(args, "batch", 0) or 24)
    lr = float(getattr(args, "lr", 0) or 2e-3)
    sensitivity = float(getattr(args, "sensitivity", 0.95) or 0.95)
    t_start = time.time()
    train, train_desc = load_exams(args.dataset, cfg, cache, workers)
    val, val_desc = load_exams(args.val, cfg, cache, workers) if args.val else ([], "")
    def studies_of(exams: list[GridExam]) -> set[tuple[str, str]]:
        return {(str(e.meta.get("set")), str(e.meta.get("study"))) for e in exams if e.source == "real"}

    donor_spec = str(getattr(args, "transplant_from", "") or "")
    if float(getattr(args, "transplant", 0.0) or 0.0) > 0 and not donor_spec:
        raise SystemExit("--transplant needs --transplant-from: the slice sets whose drawn blood is moved")
    donors = load_exams(donor_spec, cfg, cache, workers)[0] if donor_spec else []
    shared = (studies_of(train) | studies_of(donors)) & studies_of(val)
    if shared:
        raise SystemExit(f"training and validation share {len(shared)} studies (e.g. {sorted(shared)[0]}): "
                         "split slice sets by study (split=train / split=val with one fraction and seed)")
    shapes_dir = str(getattr(args, "shapes", "") or "")
    shapes = load_shapes(shapes_dir) if shapes_dir else []
    box_pseudo = bool(getattr(args, "box_pseudo", False))
    t_data = time.time() - t_start
    net = ICHNet(cfg.channels, WIDTHS, stem=stem)
    seq = SequenceHead(net.feat_dim, seg_inputs=len(SUBTYPES))
    init = str(getattr(args, "init", "") or "")
    theirs: dict[str, Any] = {}
    if init:  # fine-tune a brain_window bundle (same preprocessing, any grid size) on more data
        from triage.models.bundle import read_manifest

        theirs = read_manifest(init)
        if replace(PreprocessConfig.from_dict(theirs["preprocessing"]), size=cfg.size, base_size=cfg.base_size) != cfg:
            raise SystemExit(f"--init {init}: its preprocessing differs from {cfg.to_dict()}")
        net, seq = load_weights(init, theirs)
        net.train()
    masked = float(getattr(args, "masked_share", 0.0) or 0.0)
    phantom = float(getattr(args, "phantom_share", 0.3))
    erase = float(getattr(args, "erase_share", 0.0) or 0.0)
    shares = batch_shares(masked, phantom, erase=erase)
    # head-crop grid: a ~21 cm head box over ``size`` pixels
    paste_hu = str(getattr(args, "paste_hu", "") or "")
    widths = str(getattr(args, "aug_window_width", "") or "")
    crescents = float(getattr(args, "paste_crescents", 0.0) or 0.0)
    csf = float(getattr(args, "paste_csf", 0.0) or 0.0)
    sampler = MixedSampler(train, shapes, rng, shares=shares, grid_px_mm=210.0 / size,
                           paste_hu=parse_hu_range(paste_hu), crescents=crescents, csf=csf,
                           window_widths=parse_hu_range(widths, "--aug-window-width", WINDOW_WIDTHS),
                           transplant=float(getattr(args, "transplant", 0.0) or 0.0), donors=donors,
                           rim=float(getattr(args, "aug_rim", 0.0) or 0.0),
                           sinus=float(getattr(args, "paste_sinus", 0.0) or 0.0),
                           scanner=float(getattr(args, "aug_scanner", 0.0) or 0.0))
    if box_pseudo:  # after the sampler's index: pseudo-masks are targets, not drawn masks ("real_masked")
        log.info("box_pseudo_masks", slices=add_box_pseudo_masks(train))
    log.info("training_mixed", exams=len(train), val=len(val), params=count_params(net) + count_params(seq),
             **sampler.counts())
    t0 = time.time()
    distill = float(getattr(args, "distill", 0.0) or 0.0)
    distill_seg = float(getattr(args, "distill_seg", 0.0) or 0.0)
    teacher = None
    if distill > 0 or distill_seg > 0:
        if not init:
            raise SystemExit("--distill / --distill-seg need --init: the teacher is the bundle fine-tuned from")
        teacher = load_weights(init, theirs)[0].to(device).eval()
    distill_real_only = str(getattr(args, "distill_on", "all") or "all") == "real"
    frozen = bool(getattr(args, "freeze_encoder", False))
    if frozen:  # the encoder stays as trained: only the decoder, the segmentation and slice heads learn
        for p in net.enc.parameters():
            p.requires_grad_(False)
    history = train_loop(net, sampler, steps, spe, out, lr, batch, rng, bool(args.resume), val, cfg, seq, device,
                         teacher, distill, frozen, distill_real_only, distill_seg)
    t_train = time.time() - t0
    net = net.cpu().eval()
    seq = seq.eval()
    selection: dict[str, Any] = {"thresholds": dict.fromkeys(LABELS, 0.5), "operating_points": {},
                                 "rule": "sequence_max", "rules": {}}
    summary: dict[str, Any] = {}
    if val:
        outs = exam_outputs(net, seq, val, cfg)
        rule, rules = choose_rule(val, outs, sensitivity)
        selection = choose_thresholds(val, outs, sensitivity, rule)
        selection["rules"] = rules
        summary = validation_summary(val, outs)
    refinement: dict[str, Any] = {"probability": 0.5, "hu_range": True, "intracranial": True}
    if "grow" in theirs.get("mask_refinement", {}):  # the node-side growth stays with its weights
        refinement["grow"] = theirs["mask_refinement"]["grow"]
    manifest = {
        "name": out.name,
        "version": time.strftime("%Y.%m.%d"),
        "description": "2D U-Net segmentation/classification on a brain window with neighbour slices "
                       "(pixel-unshuffle stem), sequence head at identity",
        "intended_use": INTENDED_USE,
        "trained_on": trained_on(train, donors, donors_erased=erase > 0 and not sampler.counts()["real_masked"]),
        "preprocessing": cfg.to_dict(),
        "architecture": {"network": "ICHNet", "widths": list(WIDTHS), "stem": stem, "sequence": "BiGRU",
                         "gru_hidden": 48, "parameters": count_params(net) + count_params(seq)},
        "exam_score": selection["rule"],
        "test_time_augmentation": "none",
        "thresholds": selection["thresholds"],
        "mask_refinement": refinement,
        "training": {
            "command": f"triage train '{args.dataset}' --val '{args.val}' --input brain_window --out <bundle> "
                       f"--epochs {args.epochs} --steps-per-epoch {spe} --batch {batch} --seed {seed} --size {size} "
                       f"--stem {stem} --lr {lr:g} --sensitivity {sensitivity:g}"
                       + (f" --shapes {shapes_dir}" if shapes_dir else "")
                       + (f" --paste-hu {paste_hu}" if paste_hu else "")
                       + (f" --aug-window-width {widths}" if widths else "")
                       + (f" --paste-crescents {crescents:g}" if crescents > 0 else "")
                       + (f" --paste-csf {csf:g}" if csf > 0 else "")
                       + (f" --paste-sinus {sampler.sinus:g}" if sampler.sinus > 0 else "")
                       + (f" --transplant {sampler.transplant:g} --transplant-from '{donor_spec}'"
                          if sampler.transplant > 0 else "")
                       + (f" --aug-rim {sampler.rim:g}" if sampler.rim > 0 else "")
                       + (f" --aug-scanner {sampler.scanner:g}" if sampler.scanner > 0 else "")
                       + (f" --masked-share {masked:g}" if masked > 0 else "")
                       + (f" --phantom-share {phantom:g}" if phantom != 0.3 else "")
                       + (f" --erase-share {erase:g}" if erase > 0 else "")
                       + (" --box-pseudo" if box_pseudo else "")
                       + (f" --distill {distill:g}" if distill > 0 else "")
                       + (f" --distill-seg {distill_seg:g}" if distill_seg > 0 else "")
                       + (" --distill-on real" if (distill > 0 or distill_seg > 0) and distill_real_only else "")
                       + (" --freeze-encoder" if frozen else "")
                       + (f" --init {init}" if init else ""),
            "initialised_from": init or None,
            "recipe": "mixed (triage/models/train_mixed.py)",
            "data": train_desc + (f"; blood moved from {len(donors)} exams of {donor_spec}" if donors else ""),
            "validation": val_desc,
            "exams": len(train),
            "slices": int(sum(len(e.slices) for e in train)),
            "sampler": sampler.counts(),
            "steps": steps,
            "batch": batch,
            "seed": seed,
            "history": history,
            "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "total": round(time.time() - t_start, 1)},
            "device": str(device),
            "host": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        },
        "validation": {"rule": selection["rule"], "rules": selection["rules"],
                       "operating_points": selection["operating_points"], **summary},
    }
    written = save_bundle(out, net, seq, manifest)
    print(json.dumps({"bundle": str(out), "sha256": written["weights"]["sha256"],
                      "thresholds": selection["thresholds"], **summary}, indent=2))
    return 0


def with_hu_confirmation(bundle_path: Path, spec: str, exams: list[GridExam],
                         outs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The real exams' outputs as the node sees them: the slices its HU check does not back
    (``Bundle.unreadable_slices``, which checks every slice whatever the thresholds) count as 0.
    Runs ``Bundle.predict`` on the slice sets of ``spec``; phantom exams are left as they are
    (their voxel truth sets nothing here)."""
    from triage.datasets.slices import SliceSet, parse_spec
    from triage.models.evaluate_slices import predict_exam
    from triage.models.inference import load_bundle

    bundle = load_bundle(bundle_path, device="cpu")
    unread: dict[str, np.ndarray] = {}
    for part in filter(None, spec.split("+")):
        if part.startswith("slices:"):
            path, opts = parse_spec(part)
            ss = SliceSet(path, **opts)
            for exam_id in ss.exam_ids():
                _, keep = predict_exam(bundle, ss.load(exam_id))
                unread[f"{ss.name}|{exam_id}"] = keep["unread_slices"]
    fixed = []
    for e, o in zip(exams, outs, strict=True):
        u = unread.get(f"{e.meta.get('set')}|{e.key}") if e.source == "real" else None
        if u is not None and u.any():
            o = dict(o, slice_probs=o["slice_probs"].copy(), seg_max=o["seg_max"].copy())
            o["slice_probs"][u] = 0.0
            o["seg_max"][u] = 0.0
        fixed.append(o)
    return fixed


def tune(args: argparse.Namespace, settings: Any) -> int:
    """``triage tune`` for a ``brain_window`` bundle: the thresholds again on validation exams (the
    "any" threshold on real validation slices), with or without mirror test-time augmentation."""
    from triage.models.bundle import load_weights, read_manifest, write_manifest

    set_threads()
    path = Path(args.bundle)
    manifest = read_manifest(path)
    net, seq = load_weights(path, manifest)
    cfg = PreprocessConfig.from_dict(manifest["preprocessing"])
    cache = Path(getattr(args, "cache", "") or (Path(settings.data_dir) / "cache" / "models"))
    val, val_desc = load_exams(args.val, cfg, cache, int(getattr(args, "workers", 1) or 1))
    if not val:
        raise SystemExit(f"{args.val}: no validation exams")
    tta = str(args.tta)
    outs = exam_outputs(net, seq, val, cfg, flip=tta == "flip")
    manifest["test_time_augmentation"] = tta
    if manifest.get("hu_confirmation"):
        write_manifest(path, manifest)  # the bundle the node will run: with this augmentation
        outs = with_hu_confirmation(path, args.val, val, outs)
    rule, rules = choose_rule(val, outs, float(args.sensitivity))
    selection = choose_thresholds(val, outs, float(args.sensitivity), rule)
    manifest["exam_score"] = rule
    manifest["thresholds"] = selection["thresholds"]
    manifest["test_time_augmentation"] = tta
    manifest["validation"] = {"rule": rule, "rules": rules, "operating_points": selection["operating_points"],
                              **validation_summary(val, outs)}
    manifest["tuned"] = {"command": f"triage tune <bundle> --val '{args.val}' --tta {tta} "
                                    f"--sensitivity {args.sensitivity}", "validation": val_desc}
    if getattr(args, "version", ""):
        manifest["version"] = str(args.version)
    write_manifest(path, manifest)
    print(json.dumps({"bundle": str(path), "test_time_augmentation": tta, "thresholds": selection["thresholds"],
                      **manifest["validation"]}, indent=2))
    return 0
