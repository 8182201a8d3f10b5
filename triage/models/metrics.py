"""Evaluation metrics: ROC/AUC, operating points, weighted log loss, Dice, cluster-bootstrap intervals."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata


def roc_curve(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with thresholds descending; ties are grouped."""
    y = np.asarray(truth) > 0
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, len(s) - 1]
    tps = np.cumsum(y)[idx]
    fps = (idx + 1) - tps
    p, n = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.r_[0.0, tps / p]
    fpr = np.r_[0.0, fps / n]
    return fpr, tpr, np.r_[np.inf, s[idx]]


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney with ties = 1/2); NaN if one class is absent."""
    y = np.asarray(truth) > 0
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s, method="average")  # ties share their mean rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sens_spec(truth: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    y = np.asarray(truth) > 0
    pred = np.asarray(scores) >= threshold
    sens = float(pred[y].mean()) if y.any() else math.nan
    spec = float((~pred[~y]).mean()) if (~y).any() else math.nan
    return sens, spec


def sensitivity_at_specificity(truth: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    fpr, tpr, _ = roc_curve(truth, scores)
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def weighted_log_loss(truth: np.ndarray, probs: np.ndarray, weights: tuple[float, ...] = (2, 1, 1, 1, 1, 1)) -> float:
    """RSNA 2019 metric: per-sample weighted mean of the six binary log losses ("any" weighted 2)."""
    y = np.asarray(truth, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    w = np.asarray(weights, dtype=np.float64)
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(((ll * w).sum(axis=1) / w.sum()).mean())


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(pred, bool), np.asarray(truth, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def cluster_bootstrap(clusters: np.ndarray, statistic: Callable[[np.ndarray], float], n_resamples: int = 2000,
                      level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of ``statistic`` over resamples of whole clusters (``clusters``: one label per
    row; ``statistic`` takes the row indices of a resample, with repeats). Slices of one patient are not
    independent, so patients are drawn, not slices (``scipy.stats.bootstrap`` draws single observations).
    Resamples where the statistic is undefined (NaN: one class absent) are left out; None when fewer
    than half are defined."""
    labels, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(labels))]
    rng = np.random.default_rng(seed)
    values = np.array([statistic(np.concatenate([members[k] for k in rng.integers(0, len(labels), len(labels))]))
                       for _ in range(n_resamples)], float)
    values = values[~np.isnan(values)]
    if values.size < n_resamples / 2:
        return None
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def interval95(clusters: np.ndarray, statistic: Callable[[np.ndarray], float]) -> list[float] | None:
    """:func:`cluster_bootstrap`'s 95 % interval as a report writes it (4 decimals), or None."""
    ci = cluster_bootstrap(clusters, statistic)
    return None if ci is None else [round(ci[0], 4), round(ci[1], 4)]
