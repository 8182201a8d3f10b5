"""Input-domain check: does a series look like the studies the bundle was trained on?

A model answers for any input, including inputs unlike anything it learned from: another scanner's
noise and kernels, a protocol it never saw, or, for the shipped bundle, any real head CT at all
(it was trained on synthetic studies only). This check measures how far a series is from the
training studies, so such a result can be shown as *outside the validated input domain* instead of
being trusted like the rest.

Descriptor (:func:`descriptor`, 10 numbers per series, from the network's own input: the windowed,
skull-stripped intracranial space on the network grid, slices at least 10 % inside the skull, the
mask eroded by about 3 mm so its border does not count):

* what the intracranial space is made of, read in the widest window: the share of voxels at or
  below -15 HU (fat, air), at 100-175 HU (dense: calcification, partial-volumed bone, contrast)
  and at or above 175 HU (bone); for the ``brain_window`` input (one 40/80 window over the whole
  head, not skull-stripped) the shares of dark (<= 2 HU), bright (45-78 HU) and saturated
  (>= 78 HU: bone, dense calcium) voxels inside the head;
* its texture in the brain window: mean and median absolute Laplacian, mean, median and 90th
  percentile of the gradient magnitude, and the noise (residual after a 3x3 mean: its SD and
  median absolute value) over brain-density voxels.

Distance: the descriptor is standardised with the training studies' mean and SD, then a
Mahalanobis distance with their correlation matrix shrunk toward the identity (stable with a few
hundred studies). The bundle's threshold is set on validation studies that were not used for the
fit (a high quantile times a margin), never on the series that are to be checked.

Why not the network's own features (the usual choice, Lee et al. 2018): on the shipped bundle the
mean pooled slice feature did not separate the one real CT from synthetic validation studies (its
distance was 1.06 times their 99th percentile, against 2.1 for this descriptor); a network trained
on narrow data maps unfamiliar input onto familiar features, which is also why it can be confidently
wrong. That comparison used the real CT, so the descriptor's choice is not blind to it; its
threshold is.

The statistics live beside the weights in ``domain.safetensors``; the manifest's
``input_domain`` section records its sha256, the threshold and how both were made. A bundle
without that section has no check (``None`` everywhere), which changes nothing else.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from triage.models.bundle import BundleError, sha256_file

DOMAIN_FILE = "domain.safetensors"
MIN_BRAIN_FRACTION = 0.1  # a slice counts as intracranial when this share of its grid is inside the skull
SHRINKAGE = 0.5  # correlation = (1 - s) * sample correlation + s * identity
RIDGE = 1e-3
MIN_STUDIES = 10  # fewest fitting and threshold studies accepted
QUANTILE = 0.99  # of the validation distances ...
MARGIN = 1.25  # ... times this margin gives the threshold
FEATURES = ("share_le_-15HU", "share_100-175HU", "share_ge_175HU", "laplacian_mean", "laplacian_median",
            "gradient_mean", "gradient_median", "gradient_p90", "noise_sd", "noise_median_abs")

# the same ten numbers for the ``brain_window`` input (one 40/80 window over the whole head)
BRAIN_WINDOW_FEATURES = ("share_dark_le_2HU", "share_bright_45-78HU", "share_saturated_ge_78HU") + FEATURES[3:]


def descriptor(windows_u8: np.ndarray, brain_small: np.ndarray,
               window_settings: Sequence[Sequence[float]]) -> np.ndarray:
    """(10,) float64 descriptor of one series from its network input (see the module docstring).

    ``windows_u8`` (Z, W, S, S) and ``brain_small`` (Z, S, S) as :func:`~triage.models.preprocess.prepare`
    returns them; ``window_settings`` the (centre, width) of each channel (the bundle's preprocessing).
    """
    win = np.asarray(windows_u8)
    brain = np.asarray(brain_small, bool)
    if win.ndim != 4 or brain.shape != (win.shape[0], *win.shape[2:]) or win.shape[0] == 0:
        raise ValueError(f"windows (Z, W, S, S) and mask (Z, S, S) must match, got {win.shape} and {brain.shape}")
    if len(window_settings) != win.shape[1]:
        raise ValueError(f"{len(window_settings)} window settings for {win.shape[1]} channels")
    frac = brain.reshape(len(brain), -1).mean(axis=1)
    keep = frac >= MIN_BRAIN_FRACTION
    if not keep.any():
        keep = frac >= frac.max()
    brain = brain[keep]
    steps = max(1, win.shape[-1] // 85)  # about 3 mm on a 256 px grid of a 20-25 cm head
    inner = np.stack([ndimage.binary_erosion(m, iterations=steps) for m in brain])
    if not inner.any():
        inner = brain
    if not inner.any():  # no intracranial space at all: a descriptor far from any head
        return np.full(len(FEATURES), 1e3)
    wide = int(np.argmax([w for _, w in window_settings]))
    centre, width = window_settings[wide]
    hu = win[keep, wide][inner].astype(np.float64) / 255.0 * width + (centre - width / 2.0)
    if centre + width / 2.0 < 175.0:
        # a brain window alone (the ``brain_window`` input: the whole head, not skull-stripped): the
        # shares of dark (air, fat, CSF), of blood/grey-matter bright and of saturated (bone) voxels
        lo, hi = centre - width / 2.0, centre + width / 2.0
        shares = [float(np.mean(hu <= lo + 2.0)), float(np.mean((hu > 45.0) & (hu < hi - 2.0))),
                  float(np.mean(hu >= hi - 2.0))]
    else:
        shares = [float(np.mean(hu <= -15.0)), float(np.mean((hu > 100.0) & (hu < 175.0))),
                  float(np.mean(hu >= 175.0))]
    b = win[keep, 0].astype(np.float32)
    lap = np.abs(np.stack([ndimage.laplace(x) for x in b])[inner])
    grad = np.stack([np.hypot(ndimage.sobel(x, 0), ndimage.sobel(x, 1)) for x in b])[inner]
    resid = (b - ndimage.uniform_filter(b, size=(1, 3, 3)))[inner & (b > 32) & (b < 223)]
    if resid.size == 0:
        resid = np.zeros(1, np.float32)
    texture = [lap.mean(), np.median(lap), grad.mean(), np.median(grad), np.quantile(grad, 0.9),
               resid.std(), np.median(np.abs(resid))]
    return np.array(shares + [float(t) for t in texture], np.float64)


@dataclass(frozen=True)
class DomainCheck:
    """Fitted statistics and the threshold; :meth:`distance` and :meth:`assess` score a series."""

    mean: np.ndarray  # (F,) of the training descriptors
    scale: np.ndarray  # (F,) their SD
    precision: np.ndarray  # (F, F): the inverse of the shrunk correlation matrix
    threshold: float
    window_settings: tuple[tuple[float, float], ...]

    def distance(self, desc: np.ndarray) -> float:
        z = (np.asarray(desc, np.float64) - self.mean) / self.scale
        return float(np.sqrt(max(0.0, float(z @ self.precision @ z))))

    def assess(self, windows_u8: np.ndarray, brain_small: np.ndarray) -> dict[str, Any]:
        """``{"distance", "threshold", "in_domain"}`` for one series' network input."""
        dist = self.distance(descriptor(windows_u8, brain_small, self.window_settings))
        return {"distance": round(dist, 3), "threshold": round(self.threshold, 3),
                "in_domain": bool(dist <= self.threshold)}


def fit(train_desc: np.ndarray, val_desc: np.ndarray, window_settings: Sequence[Sequence[float]],
        shrinkage: float = SHRINKAGE, quantile: float = QUANTILE,
        margin: float = MARGIN) -> tuple[DomainCheck, dict[str, Any]]:
    """Fit the statistics on ``train_desc`` (N, F); set the threshold on ``val_desc``.

    Returns the check and a summary of the distances (for the manifest and the model card)."""
    x = np.asarray(train_desc, np.float64)
    v = np.asarray(val_desc, np.float64)
    if x.ndim != 2 or min(x.shape[0], v.shape[0] if v.ndim == 2 else 0) < MIN_STUDIES or v.shape[1] != x.shape[1]:
        raise ValueError(f"need at least {MIN_STUDIES} training and {MIN_STUDIES} validation descriptors of one "
                         f"width, got {x.shape} and {v.shape}")
    if not 0.0 < shrinkage <= 1.0 or not 0.5 <= quantile <= 1.0 or margin < 1.0:
        raise ValueError("shrinkage must be in (0, 1], quantile in [0.5, 1] and margin >= 1")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature: any change counts in raw units
    corr = np.atleast_2d(np.cov((x - mean) / scale, rowvar=False))
    corr = (1.0 - shrinkage) * corr + shrinkage * np.eye(len(corr)) + RIDGE * np.eye(len(corr))
    settings = tuple((float(c), float(w)) for c, w in window_settings)
    check = DomainCheck(mean, scale, np.linalg.inv(corr), 0.0, settings)
    train_d = np.array([check.distance(r) for r in x])
    val_d = np.array([check.distance(r) for r in v])
    threshold = float(np.quantile(val_d, quantile) * margin)
    summary = {
        "fitted_on_studies": int(x.shape[0]), "validation_studies": int(v.shape[0]),
        "features": (list(BRAIN_WINDOW_FEATURES) if len(settings) == 1 and settings[0][0] + settings[0][1] / 2 < 175
                     else list(FEATURES)) if x.shape[1] == len(FEATURES) else int(x.shape[1]),
        "shrinkage": shrinkage, "quantile": quantile, "margin": margin,
        "training_distance": {"median": round(float(np.median(train_d)), 3), "max": round(float(train_d.max()), 3),
                              "in_domain": round(float((train_d <= threshold).mean()), 4)},
        "validation_distance": {"median": round(float(np.median(val_d)), 3),
                                "quantile": round(float(np.quantile(val_d, quantile)), 3),
                                "max": round(float(val_d.max()), 3),
                                "in_domain": round(float((val_d <= threshold).mean()), 4)},
    }
    return DomainCheck(mean, scale, check.precision, threshold, settings), summary


def save(bundle: str | Path, check: DomainCheck, summary: dict[str, Any], data: str) -> dict[str, Any]:
    """Write ``domain.safetensors`` and return the manifest's ``input_domain`` section."""
    from safetensors.numpy import save_file

    path = Path(bundle) / DOMAIN_FILE
    save_file({"mean": check.mean, "scale": check.scale, "precision": check.precision}, str(path))
    return {
        "file": DOMAIN_FILE, "sha256": sha256_file(path), "threshold": round(check.threshold, 4),
        "method": "Mahalanobis distance of 10 input statistics of the intracranial space (composition in HU, "
                  "texture, noise), standardised on the training studies; correlation shrunk toward the identity "
                  "(triage/models/domain.py)",
        "data": data, "fitted": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **summary,
    }


def load(bundle: str | Path, manifest: dict[str, Any]) -> DomainCheck | None:
    """The bundle's check, or None when its manifest has no ``input_domain``. A changed or
    malformed file is refused (BundleError), like changed weights."""
    section = manifest.get("input_domain")
    if not section:
        return None
    from safetensors.numpy import load_file

    path = Path(bundle) / str(section.get("file", DOMAIN_FILE))
    if not path.is_file():
        raise BundleError(f"{bundle}: input_domain names {path.name}, which is missing")
    if sha256_file(path) != section.get("sha256"):
        raise BundleError(f"{path}: sha256 differs from the manifest's input_domain")
    arrays = load_file(str(path))
    mean, scale, precision = arrays.get("mean"), arrays.get("scale"), arrays.get("precision")
    n = len(FEATURES)
    if mean is None or scale is None or precision is None or mean.shape != (n,) or scale.shape != (n,) \
            or precision.shape != (n, n):
        raise BundleError(f"{path}: expected the statistics of {n} input features")
    windows = manifest.get("preprocessing", {}).get("windows")
    from triage.models.preprocess import WINDOWS

    settings = tuple((float(c), float(w)) for c, w in (windows or WINDOWS))
    return DomainCheck(mean, scale, precision, float(section["threshold"]), settings)


def study_descriptors(studies: list[Any], window_settings: Sequence[Sequence[float]]) -> np.ndarray:
    """(N, F) descriptors of preprocessed studies (:class:`~triage.models.data.Cached`): the same
    network input inference computes."""
    from tqdm import tqdm

    return np.stack([descriptor(s.windows, s.brain_small, window_settings)
                     for s in tqdm(studies, desc="domain statistics", unit="study")])


def cli_fit(args: Any, settings: Any) -> int:
    """``triage domain BUNDLE --data DATASET --val DATASET``: fit the bundle's input-domain check on
    the studies it was trained on (or studies like them) and set its threshold on validation studies.

    Writes ``domain.safetensors`` into the bundle and its ``input_domain`` section into the manifest;
    the weights, thresholds and version are untouched (the check adds a flag; it changes no answer)."""
    import json

    from triage.models.bundle import read_manifest, write_manifest
    from triage.models.data import cached_studies, open_source
    from triage.models.preprocess import PreprocessConfig

    path = Path(args.bundle)
    manifest = read_manifest(path)
    cfg = PreprocessConfig.from_dict(manifest["preprocessing"])
    stem = int(manifest.get("architecture", {}).get("stem", 1) or 1)
    cache = Path(getattr(args, "cache", "") or (Path(settings.data_dir) / "cache" / "models"))
    workers = int(getattr(args, "workers", 1) or 1)
    fmt = getattr(args, "format", "auto")
    desc = {}
    for role, spec in (("data", args.data), ("val", args.val)):
        src = open_source(spec, fmt)
        studies = cached_studies(src, cfg, cache, workers, target_size=cfg.size // stem, mmap=True)
        if not studies:
            raise SystemExit(f"{spec}: no studies")
        desc[role] = (study_descriptors(studies, cfg.windows), src.description)
    check, summary = fit(desc["data"][0], desc["val"][0], cfg.windows)
    manifest["input_domain"] = save(path, check, summary, f"fitted on {desc['data'][1]}; threshold on {desc['val'][1]}")
    write_manifest(path, manifest)
    print(json.dumps(manifest["input_domain"], indent=2))
    return 0
