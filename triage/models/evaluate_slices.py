"""``triage evaluate slices:DIR --bundle B --out OUT``: a bundle on a slice set, slice by slice.

Each exam of the set (a patient's ordered slices, or one slice) goes through the deployed
``Bundle.predict`` as a volume (pixels read back as HU through the set's window, or the assumed
brain window; 0.45 mm pixels assumed). Reported (``report.json``, ``rows.jsonl``, PNG plots):
slice-level ROC AUC for "any" and for each subtype with known labels on both sides, sensitivity,
specificity and false-positive rate at the bundle's thresholds, Dice of the deployed blood mask on
slices with drawn masks (with and without the HU refinement), and the input-domain share; each
with a 95 % interval from resampling the set's patients (studies). A bundle's
HU check (``hu_confirmation``) runs only on sets that state their window (pixels read as HU); on an
unknown window the network's own scores are reported. Unknown
labels are left out of every number. Works on any folder in the slice-set format, no configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from triage.datasets.slices import ASSUMED_PIXEL_MM, ASSUMED_SLICE_MM, SliceExam, SliceSet, exam_masks, parse_spec
from triage.imaging.volume import Volume
from triage.labels import LABELS
from triage.models import metrics
from triage.models.inference import Bundle, load_bundle
from triage.models.types import Prediction


def is_slice_spec(spec: str) -> bool:
    if spec.startswith("slices:"):
        return True
    from triage.datasets.slices import is_slice_set

    return is_slice_set(Path(spec))


def open_slice_set(spec: str) -> SliceSet:
    path, opts = parse_spec(spec) if spec.startswith("slices:") else (Path(spec), {})
    return SliceSet(path, **opts)


def predict_exam(bundle: Bundle, ex: SliceExam,
                 hu: np.ndarray | None = None) -> tuple[Prediction, dict[str, Any]]:
    """``Bundle.predict`` on one slice-set exam read as a volume (pixels as HU through its window,
    0.45 mm pixels and 5 mm slices assumed; the HU check only where the window is known); returns
    the prediction and its ``keep`` dict."""
    z = ex.pixels.shape[0]
    pos = np.stack([np.zeros(z), np.zeros(z), np.arange(z) * ASSUMED_SLICE_MM], axis=1)
    vol = Volume(hu=ex.hu if hu is None else hu, pixel_spacing=(ASSUMED_PIXEL_MM, ASSUMED_PIXEL_MM),
                 slice_spacing=ASSUMED_SLICE_MM, positions=pos)
    keep: dict[str, Any] = {}
    # the HU check needs HU: only where the set states its window
    return bundle.predict(vol, gradcam=False, keep=keep, hu_known=ex.window_known), keep


def evaluate_exam(bundle: Bundle, ss: SliceSet, exam_id: str) -> list[dict[str, Any]]:
    ex = ss.load(exam_id)
    hu = ex.hu
    z = hu.shape[0]
    pred, keep = predict_exam(bundle, ex, hu)
    truth = exam_masks(ex).get("any")
    pred_any = np.zeros(hu.shape, bool)
    for m in pred.masks.values():
        pred_any |= m
    raw = bundle.build_masks(hu, keep["prep"], keep["outputs"]["seg_logits"], pred.present, refine_hu=False)
    raw_any = np.zeros(hu.shape, bool)
    for m in raw.values():
        raw_any |= m
    rows = []
    for zi in range(z):
        lab = ex.labels[zi]
        row: dict[str, Any] = {
            "exam": exam_id, "study": ex.study, "image": ex.images[zi], "slice": zi,
            "truth": [None if math.isnan(v) else int(v) for v in lab],
            "probs": [round(float(p), 5) for p in pred.slice_probs[zi]],
            "window_known": ex.window_known,
            "input_domain": pred.input_domain,
        }
        if ex.mask_known[zi] and truth is not None and truth[zi].any():
            row["dice_any"] = round(metrics.dice(pred_any[zi], truth[zi]), 4)
            row["dice_any_unrefined"] = round(metrics.dice(raw_any[zi], truth[zi]), 4)
            row["blood_pixels"] = int(truth[zi].sum())
        rows.append(row)
    return rows


def _rate(x: np.ndarray) -> float | None:
    return round(float(x.mean()), 4) if x.size else None


def _label_intervals(y: np.ndarray, p: np.ndarray, t: float, study: np.ndarray) -> dict[str, list[float] | None]:
    """Intervals of one label's AUC and of its sensitivity and specificity at threshold ``t``."""
    pos, neg = p[y], p[~y]
    return {"auc": metrics.interval95(study, lambda i: metrics.roc_auc(y[i], p[i])) if y.any() and (~y).any() else None,
            "sensitivity": metrics.interval95(study[y], lambda i: float((pos[i] >= t).mean())) if y.any() else None,
            "specificity": metrics.interval95(study[~y], lambda i: float((neg[i] < t).mean())) if (~y).any() else None}


def summarise(rows: list[dict[str, Any]], thresholds: dict[str, float]) -> dict[str, Any]:
    """The report's numbers; each with a 95 % interval (``ci95``) from resampling the set's patients,
    so that two bundles' numbers on a few dozen slices can be read against their noise."""
    truth = np.array([[np.nan if v is None else v for v in r["truth"]] for r in rows], float)
    probs = np.array([r["probs"] for r in rows], float)
    study = np.array([str(r["study"]) for r in rows])
    out: dict[str, Any] = {"slices": len(rows), "exams": len({r["exam"] for r in rows}),
                           "studies": len({r["study"] for r in rows})}
    per_label = {}
    for i, lab in enumerate(LABELS):
        known = ~np.isnan(truth[:, i])
        y, p = truth[known, i] > 0, probs[known, i]
        t = float(thresholds[lab])
        auc = metrics.roc_auc(y, p) if known.any() else float("nan")
        per_label[lab] = {
            "known": int(known.sum()), "positives": int(y.sum()), "negatives": int((~y).sum()),
            "auc": None if math.isnan(auc) else round(auc, 4),
            "threshold": round(t, 6),
            "sensitivity": _rate(p[y] >= t), "specificity": _rate(p[~y] < t),
            "false_positive_rate": _rate(p[~y] >= t),
        }
        per_label[lab]["ci95"] = _label_intervals(y, p, t, study[known])
        if y.any() and (~y).any():
            fpr, tpr, _ = metrics.roc_curve(y, p)
            ok = fpr <= 0.2
            per_label[lab]["sensitivity_at_specificity_0.80"] = round(float(tpr[ok].max()), 4)
    out["any"] = per_label["any"]
    out["per_label"] = per_label
    dice = np.array([r["dice_any"] for r in rows if "dice_any" in r])
    raw = np.array([r["dice_any_unrefined"] for r in rows if "dice_any_unrefined" in r])
    dice_study = np.array([str(r["study"]) for r in rows if "dice_any" in r])
    out["dice_any"] = {"n": int(dice.size), "mean": round(float(dice.mean()), 4) if dice.size else None,
                       "mean_ci95": (metrics.interval95(dice_study, lambda i: float(dice[i].mean()))
                                     if dice.size else None),
                       "median": round(float(np.median(dice)), 4) if dice.size else None,
                       "mean_unrefined": round(float(raw.mean()), 4) if raw.size else None}
    dom = [r["input_domain"] for r in rows if r.get("input_domain")]
    exams_dom = {r["exam"]: r["input_domain"] for r in rows if r.get("input_domain")}
    out["input_domain"] = None if not dom else {
        "exams": len(exams_dom), "in_domain": round(float(np.mean([d["in_domain"] for d in exams_dom.values()])), 4)}
    return out


def plots(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = np.array([[np.nan if v is None else v for v in r["truth"]] for r in rows], float)
    probs = np.array([r["probs"] for r in rows], float)
    files = []
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=90)
    drawn = False
    for i, lab in enumerate(LABELS):
        known = ~np.isnan(truth[:, i])
        y = truth[known, i] > 0
        if not y.any() or y.all():
            continue
        fpr, tpr, _ = metrics.roc_curve(y, probs[known, i])
        ax.plot(fpr, tpr, lw=1.4, label=f"{lab} AUC {summary['per_label'][lab]['auc']:.3f} (n={known.sum()})")
        drawn = True
    if drawn:
        t = summary["per_label"]["any"]
        if t["sensitivity"] is not None and t["specificity"] is not None:
            ax.plot([1 - t["specificity"]], [t["sensitivity"]], "k o", ms=5, label="'any' at the bundle threshold")
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"Slice ROC ({summary['slices']} slices)")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "roc.png")
        files.append("roc.png")
    plt.close(fig)
    dice = [r["dice_any"] for r in rows if "dice_any" in r]
    if dice:
        fig, ax = plt.subplots(figsize=(4.6, 3.4), dpi=90)
        ax.hist(dice, bins=np.linspace(0, 1, 21), color="C0")
        ax.set(xlabel="Dice (blood, deployed mask)", ylabel="slices",
               title=f"Dice, mean {np.mean(dice):.3f} (n={len(dice)})")
        fig.tight_layout()
        fig.savefig(out / "dice.png")
        plt.close(fig)
        files.append("dice.png")
    return files


def one_line(summary: dict[str, Any]) -> str:
    a = summary["any"]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def ci(v: list[float] | None) -> str:
        return "" if not v else f" [{v[0]:.3f}-{v[1]:.3f}]"

    d, c = summary["dice_any"], a.get("ci95", {})
    return (f"{summary['name']}: {summary['slices']} slices ({a['positives']} blood, {a['negatives']} none) "
            f"AUC any {f(a['auc'])}{ci(c.get('auc'))}; at threshold {a['threshold']:.3f}: "
            f"sensitivity {f(a['sensitivity'])}{ci(c.get('sensitivity'))}, "
            f"specificity {f(a['specificity'])}{ci(c.get('specificity'))}; "
            f"Dice {f(d['mean'])}{ci(d.get('mean_ci95'))} (n={d['n']}); [95 % intervals, patients resampled]")


def main(args: argparse.Namespace, settings: Any) -> int:
    bundle = load_bundle(args.bundle or settings.bundle_path or None, device=args.device,
                         thresholds_override=settings.thresholds or None)
    ss = open_slice_set(args.dataset)
    ids = ss.exam_ids()
    if getattr(args, "limit", 0):
        ids = ids[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    t0 = time.time()
    rows = []
    for exam_id in tqdm(ids, desc="evaluate", unit="exam"):
        rows += evaluate_exam(bundle, ss, exam_id)
    with (out / "rows.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    summary = summarise(rows, bundle.thresholds)
    summary |= {"name": ss.name, "dataset": ss.describe(), "bundle": str(bundle.identity),
                "seconds": round(time.time() - t0, 1)}
    summary["plots"] = plots(rows, summary, out)
    summary["summary"] = one_line(summary)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(summary["summary"])
    return 0
