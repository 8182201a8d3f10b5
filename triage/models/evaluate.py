"""``triage evaluate DATASET --bundle PATH --out DIR``: JSON report + PNG plots.

Per study: the deployed ``Bundle.predict`` (thresholds and masks exactly as the node uses them).
Reported: per-label ROC/AUC, exam-level sensitivity/specificity at the bundle thresholds,
sensitivity at specificity >= 0.90, the RSNA weighted log loss, Dice per subtype and overall on
bleeds >= 1 mL (with and without the HU refinement of the masks), volume error (mean, RMSE, median
absolute, Bland-Altman), a table by bleed size (tiny < 1 mL, small 1-5 mL, larger) and the
false-positive rate per negative kind (calcification-only hard negatives in particular).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from triage.imaging.volume import Volume
from triage.labels import LABELS, SUBTYPES
from triage.logging import get_logger
from triage.models import metrics
from triage.models.data import Study, open_source, stored_studies
from triage.models.inference import EXAM_RULES, Bundle, exam_scores, load_bundle

log = get_logger(__name__)

TARGETS = {
    "any_auc": (">=", 0.99),
    "any_sensitivity_at_spec_0.90": (">=", 0.98),
    "min_subtype_auc": (">=", 0.95),
    "mean_dice_any_ge_1ml": (">=", 0.85),
    "median_abs_volume_error_ml": ("<=", 1.0),
    "fp_rate_calcification": ("<=", 0.05),
}
SIZE_BINS = (("tiny (<1 mL)", 0.0, 1.0), ("small (1-5 mL)", 1.0, 5.0), ("larger (>=5 mL)", 5.0, math.inf))


def study_volume(s: Study) -> Volume:
    z = s.hu.shape[0]
    pos = np.stack([np.zeros(z), np.zeros(z), np.arange(z) * s.slice_spacing], axis=1)
    return Volume(hu=s.hu, pixel_spacing=s.pixel_spacing, slice_spacing=s.slice_spacing, positions=pos)


def evaluate_study(bundle: Bundle, s: Study) -> dict[str, Any]:
    vol = study_volume(s)
    keep: dict[str, Any] = {}
    pred = bundle.predict(vol, gradcam=False, keep=keep)
    vox = vol.voxel_volume_ml
    truth_any = s.truth_any()
    scored = s.has_volume_truth  # RSNA / CQ500 give labels but no masks: no Dice, no volume error
    pred_any = np.zeros(s.hu.shape, bool)
    for m in pred.masks.values():
        pred_any |= m
    raw = bundle.build_masks(s.hu, keep["prep"], keep["outputs"]["seg_logits"], pred.present, refine_hu=False)
    raw_any = np.zeros(s.hu.shape, bool)
    for m in raw.values():
        raw_any |= m
    row: dict[str, Any] = {
        "key": s.key,
        "kind": s.kind,
        "truth": [int(v) for v in s.exam_labels],
        "probs": [pred.exam_probs[lab] for lab in LABELS],
        "present": [int(pred.present[lab]) for lab in LABELS],
        # every exam rule's scores, so rules can be compared on one run (the bundle's is "probs")
        "probs_by_rule": {rule: [round(float(x), 6) for x in exam_scores(keep["outputs"]["slice_probs"],
                                                                          keep["outputs"]["seg_max"], rule)]
                          for rule in EXAM_RULES},
        "volume_true": float(truth_any.sum() * vox) if scored else None,
        "volume_pred": pred.volumes_ml["any"],
        "abc2_pred": pred.abc2_ml["any"],
        "dice_any": metrics.dice(pred_any, truth_any) if scored else None,
        "dice_any_raw": metrics.dice(raw_any, truth_any) if scored else None,
        "timings": pred.timings,
        "input_domain": pred.input_domain,
    }
    subtype_truth = scored and s.mask_any is None  # CT-ICH's one blood mask has no subtypes
    for sub in SUBTYPES:
        if not subtype_truth:
            break
        t = s.masks.get(sub)
        tv = float(t.sum() * vox) if t is not None else 0.0
        row[f"volume_true_{sub}"] = tv
        if tv > 0:
            row[f"dice_{sub}"] = metrics.dice(pred.masks.get(sub, np.zeros(s.hu.shape, bool)), t)
    return row


def _fmt(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def domain_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How many of the evaluated series the bundle's input-domain check found like its training
    studies (None without a check): on another site's data, the first thing to look at."""
    checked = [r["input_domain"] for r in rows if r.get("input_domain")]
    if not checked:
        return None
    dist = np.array([d["distance"] for d in checked], float)
    inside = [bool(d["in_domain"]) for d in checked]
    return {"checked": len(checked), "in_domain": _fmt(float(np.mean(inside))),
            "outside": int(len(inside) - sum(inside)), "threshold": checked[0]["threshold"],
            "distance_median": _fmt(float(np.median(dist))), "distance_max": _fmt(float(dist.max()))}


def summarise(rows: list[dict[str, Any]], thresholds: dict[str, float]) -> dict[str, Any]:
    truth = np.array([r["truth"] for r in rows], float)
    probs = np.array([r["probs"] for r in rows], float)
    present = np.array([r["present"] for r in rows], float)
    per_label = {}
    # each evaluated exam its own cluster (the readers give no patient id): where a source holds
    # several exams of one patient (RSNA's series) the interval is somewhat too narrow
    studies = np.arange(len(rows))
    for i, lab in enumerate(LABELS):
        pos, neg = truth[:, i] > 0, truth[:, i] == 0
        per_label[lab] = {
            "positives": int(pos.sum()),
            "negatives": int(neg.sum()),
            "auc": _fmt(metrics.roc_auc(truth[:, i], probs[:, i])),
            "auc_ci95": metrics.interval95(studies, lambda k, i=i: metrics.roc_auc(truth[k, i], probs[k, i])),
            "threshold": thresholds[lab],
            "sensitivity": _fmt(float(present[pos, i].mean()) if pos.any() else None),
            "specificity": _fmt(float(1 - present[neg, i].mean()) if neg.any() else None),
        }
    sub_aucs = [per_label[s]["auc"] for s in SUBTYPES if per_label[s]["auc"] is not None]
    ge1 = [r for r in rows if r["volume_true"] is not None and r["volume_true"] >= 1.0]
    positives = [r for r in rows if r["truth"][0] and r["volume_true"] is not None]
    vol_err = np.array([r["volume_pred"] - r["volume_true"] for r in positives]) if positives else np.zeros(0)
    abc_err = np.array([r["abc2_pred"] - r["volume_true"] for r in positives]) if positives else np.zeros(0)
    dice_sub = {}
    for sub in SUBTYPES:
        ds = [r[f"dice_{sub}"] for r in rows if r.get(f"volume_true_{sub}", 0) >= 1.0 and f"dice_{sub}" in r]
        dice_sub[sub] = {"n": len(ds), "mean": _fmt(float(np.mean(ds)) if ds else None)}
    bins = []
    for name, lo, hi in SIZE_BINS:
        rs = [r for r in positives if lo <= r["volume_true"] < hi]
        errs = [abs(r["volume_pred"] - r["volume_true"]) for r in rs]
        bins.append({"bin": name, "n": len(rs),
                     "sensitivity": _fmt(float(np.mean([r["present"][0] for r in rs])) if rs else None),
                     "mean_dice": _fmt(float(np.mean([r["dice_any"] for r in rs])) if rs else None),
                     "median_abs_volume_error_ml": _fmt(float(np.median(errs)) if errs else None)})
    kinds = sorted({r["kind"] for r in rows if not r["truth"][0]})
    fp = {k: {"n": sum(1 for r in rows if r["kind"] == k and not r["truth"][0]),
              "fp_rate": _fmt(float(np.mean([r["present"][0] for r in rows if r["kind"] == k and not r["truth"][0]])))}
          for k in kinds}
    calc = fp.get("hard_negative_calcification", {}).get("fp_rate")
    summary = {
        "studies": len(rows),
        "positives": int(truth[:, 0].sum()),
        "per_label": per_label,
        "any_sensitivity_at_spec_0.90": _fmt(metrics.sensitivity_at_specificity(truth[:, 0], probs[:, 0], 0.90)),
        "weighted_log_loss": _fmt(metrics.weighted_log_loss(truth, probs)),
        "dice": {
            "any_ge_1ml": {"n": len(ge1), "mean": _fmt(float(np.mean([r["dice_any"] for r in ge1])) if ge1 else None),
                           "median": _fmt(float(np.median([r["dice_any"] for r in ge1])) if ge1 else None)},
            "any_ge_1ml_without_hu_refinement": {
                "n": len(ge1), "mean": _fmt(float(np.mean([r["dice_any_raw"] for r in ge1])) if ge1 else None)},
            "per_subtype_ge_1ml": dice_sub,
        },
        "volume_error_ml": {
            "n": len(vol_err),
            "mean": _fmt(float(vol_err.mean()) if len(vol_err) else None),
            "rmse": _fmt(float(np.sqrt((vol_err**2).mean())) if len(vol_err) else None),
            "median_abs": _fmt(float(np.median(np.abs(vol_err))) if len(vol_err) else None),
            "abc2_median_abs": _fmt(float(np.median(np.abs(abc_err))) if len(abc_err) else None),
        },
        "size_bins": bins,
        "false_positive_rate_by_kind": fp,
        "mean_seconds": {k: _fmt(float(np.mean([r["timings"].get(k, 0.0) for r in rows])))
                         for k in ("preprocess", "detection", "segmentation")},
        "input_domain": domain_summary(rows),
    }
    observed = {
        "any_auc": per_label["any"]["auc"],
        "any_sensitivity_at_spec_0.90": summary["any_sensitivity_at_spec_0.90"],
        "min_subtype_auc": _fmt(min(sub_aucs)) if sub_aucs else None,
        "mean_dice_any_ge_1ml": summary["dice"]["any_ge_1ml"]["mean"],
        "median_abs_volume_error_ml": summary["volume_error_ml"]["median_abs"],
        "fp_rate_calcification": calc,
    }
    summary["targets"] = {
        k: {"target": f"{op} {v}", "observed": observed[k],
            "met": None if observed[k] is None else (observed[k] >= v if op == ">=" else observed[k] <= v)}
        for k, (op, v) in TARGETS.items()
    }
    return summary


def plots(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = np.array([r["truth"] for r in rows], float)
    probs = np.array([r["probs"] for r in rows], float)
    files = []
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=90)
    for i, lab in enumerate(LABELS):
        if truth[:, i].min() == truth[:, i].max():
            continue
        fpr, tpr, _ = metrics.roc_curve(truth[:, i], probs[:, i])
        ax.plot(fpr, tpr, label=f"{lab} AUC {summary['per_label'][lab]['auc']:.3f}", lw=1.4)
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"Exam ROC (n={len(rows)})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png")
    plt.close(fig)
    files.append("roc.png")

    pos = [r for r in rows if r["truth"][0] and r["volume_true"] is not None]  # sources with masks only
    if pos:
        t = np.array([r["volume_true"] for r in pos])
        p = np.array([r["volume_pred"] for r in pos])
        mean, diff = (t + p) / 2, p - t
        md, sd = float(diff.mean()), float(diff.std())
        fig, ax = plt.subplots(figsize=(4.6, 3.6), dpi=90)
        ax.scatter(mean, diff, s=8, alpha=0.7)
        for y, ls in ((md, "-"), (md + 1.96 * sd, "--"), (md - 1.96 * sd, "--")):
            ax.axhline(y, color="C3", ls=ls, lw=0.9)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set(xlabel="mean of true and predicted volume (mL)", ylabel="predicted - true (mL)",
               title=f"Bland-Altman, bias {md:.2f} mL, LoA +-{1.96 * sd:.2f}")
        fig.tight_layout()
        fig.savefig(out / "bland_altman.png")
        plt.close(fig)
        files.append("bland_altman.png")

        fig, ax = plt.subplots(figsize=(4.6, 3.6), dpi=90)
        ax.scatter(t, [r["dice_any"] for r in pos], s=8, alpha=0.7)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.axvline(1.0, color="0.7", lw=0.8)
        ax.set(xlabel="true bleed volume (mL)", ylabel="Dice (any)", ylim=(-0.02, 1.02), title="Dice by bleed size")
        fig.tight_layout()
        fig.savefig(out / "dice_by_size.png")
        plt.close(fig)
        files.append("dice_by_size.png")
    return files


def main(args: argparse.Namespace, settings: Any) -> int:
    from triage.models import evaluate_slices

    if evaluate_slices.is_slice_spec(str(args.dataset)):  # labelled 2-D slices: slice-level report
        return evaluate_slices.main(args, settings)
    bundle = load_bundle(args.bundle or settings.bundle_path or None, device=args.device,
                         thresholds_override=settings.thresholds or None)
    src = open_source(args.dataset, args.format)
    if getattr(args, "limit", 0):
        src.keys = src.keys[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if getattr(args, "cache", "") else None
    rows_path = out / "rows.jsonl"
    done = {}
    if rows_path.exists():  # resumable: studies already evaluated with this bundle are kept
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            if r.get("bundle") == bundle.identity.sha256:
                done[r["key"]] = r
    from tqdm import tqdm

    t0 = time.time()
    todo = [k for k in src.keys if k not in done]
    src_todo = type(src)(src.name, todo, src.load, src.description)
    with rows_path.open("a") as fh:
        for s in tqdm(stored_studies(src_todo, cache), total=len(todo), desc="evaluate", unit="study"):
            row = evaluate_study(bundle, s) | {"bundle": bundle.identity.sha256}
            done[s.key] = row
            fh.write(json.dumps(row) + "\n")
            fh.flush()
    rows = [done[k] for k in src.keys if k in done]
    summary = summarise(rows, bundle.thresholds)
    summary["bundle"] = str(bundle.identity)
    summary["dataset"] = src.description
    summary["seconds"] = round(time.time() - t0, 1)
    summary["plots"] = plots(rows, summary, out)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["targets"], indent=2))
    return 0
