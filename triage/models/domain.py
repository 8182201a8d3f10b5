"""Input-domain check: does a series look like the studies the bundle was trained on?

A model answers for any input, including inputs unlike anything it learned from: another scanner's
noise and kernels, a protocol it never saw, or, for the shipped bundle, any real head CT at all
(it was trained on synthetic studies only). This check measures how far a series is from the
training studies in the slice network's own feature space, so such a result can be shown as
*outside the validated input domain* instead of being trusted like the rest.

Method (a study-level Mahalanobis distance, as in Lee et al. 2018, "A simple unified framework
for detecting out-of-distribution samples"): each series is described by the mean of the slice
network's pooled features (:class:`~triage.models.network.ICHNet` ``feat``) over its intracranial
slices. Mean and covariance of that descriptor are fitted on training studies (the covariance
shrunk toward its diagonal, so a few hundred studies are enough for ~150 features). A series'
distance is ``sqrt((d - mean)^T C^-1 (d - mean))``; the bundle's threshold is set on validation
studies that were not used for the fit (a high quantile times a margin), never on the series that
are to be checked.

The statistics live beside the weights in ``domain.safetensors``; the manifest's
``input_domain`` section records its sha256, the threshold and how both were made. A bundle
without that section has no check (``None`` everywhere), which changes nothing else.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.models.bundle import BundleError, sha256_file

DOMAIN_FILE = "domain.safetensors"
MIN_BRAIN_FRACTION = 0.1  # a slice counts as intracranial when this share of its grid is inside the skull
SHRINKAGE = 0.5  # covariance = (1 - s) * sample covariance + s * its diagonal
QUANTILE = 0.99  # of the validation distances ...
MARGIN = 1.25  # ... times this margin gives the threshold


def descriptor(feats: np.ndarray, brain_fraction: np.ndarray) -> np.ndarray:
    """(F,) float64: the mean slice feature over the intracranial slices (over the slices with the
    most intracranial space when none reaches :data:`MIN_BRAIN_FRACTION`)."""
    feats = np.asarray(feats, np.float64)
    frac = np.asarray(brain_fraction, np.float64).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != frac.shape[0] or feats.shape[0] == 0:
        raise ValueError(f"features (Z, F) and brain fractions (Z,) must match, got {feats.shape} and {frac.shape}")
    keep = frac >= MIN_BRAIN_FRACTION
    if not keep.any():
        keep = frac >= frac.max()
    return feats[keep].mean(axis=0)


@dataclass(frozen=True)
class DomainCheck:
    """Fitted statistics and the threshold; :meth:`distance` and :meth:`assess` score a series."""

    mean: np.ndarray  # (F,)
    precision: np.ndarray  # (F, F): the inverse of the shrunk covariance
    threshold: float

    def distance(self, desc: np.ndarray) -> float:
        d = np.asarray(desc, np.float64) - self.mean
        return float(np.sqrt(max(0.0, float(d @ self.precision @ d))))

    def assess(self, feats: np.ndarray, brain_fraction: np.ndarray) -> dict[str, Any]:
        """``{"distance", "threshold", "in_domain"}`` for one series' slice features."""
        dist = self.distance(descriptor(feats, brain_fraction))
        return {"distance": round(dist, 3), "threshold": round(self.threshold, 3),
                "in_domain": bool(dist <= self.threshold)}


def fit(train_desc: np.ndarray, val_desc: np.ndarray, shrinkage: float = SHRINKAGE,
        quantile: float = QUANTILE, margin: float = MARGIN) -> tuple[DomainCheck, dict[str, Any]]:
    """Fit mean and shrunk covariance on ``train_desc`` (N, F); set the threshold on ``val_desc``.

    Returns the check and a summary of the distances (for the manifest and the model card)."""
    x = np.asarray(train_desc, np.float64)
    v = np.asarray(val_desc, np.float64)
    if x.ndim != 2 or x.shape[0] < 10 or v.ndim != 2 or v.shape[0] < 10 or v.shape[1] != x.shape[1]:
        raise ValueError(f"need at least 10 training and 10 validation descriptors of one width, got {x.shape}"
                         f" and {v.shape}")
    if not 0.0 < shrinkage <= 1.0 or not 0.5 <= quantile <= 1.0 or margin < 1.0:
        raise ValueError("shrinkage must be in (0, 1], quantile in [0.5, 1] and margin >= 1")
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False)
    cov = (1.0 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov))
    cov += 1e-6 * max(float(np.trace(cov)) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])
    precision = np.linalg.inv(cov)
    check = DomainCheck(mean, precision, 0.0)
    train_d = np.array([check.distance(r) for r in x])
    val_d = np.array([check.distance(r) for r in v])
    threshold = float(np.quantile(val_d, quantile) * margin)
    summary = {
        "fitted_on_studies": int(x.shape[0]), "validation_studies": int(v.shape[0]),
        "features": int(x.shape[1]), "shrinkage": shrinkage, "quantile": quantile, "margin": margin,
        "training_distance": {"median": round(float(np.median(train_d)), 3), "max": round(float(train_d.max()), 3)},
        "validation_distance": {"median": round(float(np.median(val_d)), 3),
                                "quantile": round(float(np.quantile(val_d, quantile)), 3),
                                "max": round(float(val_d.max()), 3)},
        "validation_in_domain": round(float((val_d <= threshold).mean()), 4),
    }
    return DomainCheck(mean, precision, threshold), summary


def save(bundle: str | Path, check: DomainCheck, summary: dict[str, Any], data: str) -> dict[str, Any]:
    """Write ``domain.safetensors`` and return the manifest's ``input_domain`` section."""
    from safetensors.numpy import save_file

    path = Path(bundle) / DOMAIN_FILE
    save_file({"mean": check.mean.astype(np.float64), "precision": check.precision.astype(np.float64)}, str(path))
    return {
        "file": DOMAIN_FILE, "sha256": sha256_file(path), "threshold": round(check.threshold, 4),
        "method": "Mahalanobis distance of the mean slice feature over intracranial slices "
                  f"(brain fraction >= {MIN_BRAIN_FRACTION}); covariance shrunk toward its diagonal",
        "data": data, "fitted": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **summary,
    }


def load(bundle: str | Path, manifest: dict[str, Any], feature_width: int) -> DomainCheck | None:
    """The bundle's check, or None when its manifest has no ``input_domain``. A changed or
    mismatched file is refused (BundleError), like changed weights."""
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
    mean, precision = arrays["mean"], arrays["precision"]
    if mean.shape != (feature_width,) or precision.shape != (feature_width, feature_width):
        raise BundleError(f"{path}: statistics of width {mean.shape} do not match the network's {feature_width} "
                          "features")
    return DomainCheck(mean, precision, float(section["threshold"]))


def study_descriptors(net: Any, seq: Any, studies: list[Any], cfg: Any, flip: bool) -> np.ndarray:
    """(N, F) descriptors of preprocessed studies (:class:`~triage.models.data.Cached`), through the
    same network pass as inference (:func:`~triage.models.inference.run_networks`)."""
    from tqdm import tqdm

    from triage.models.inference import run_networks
    from triage.models.memory import release_heap

    out = []
    for s in tqdm(studies, desc="domain features", unit="study"):
        res = run_networks(net, seq, s.windows, s.brain_small, cfg, flip=flip)
        out.append(descriptor(res["feat"], np.asarray(s.brain_small).reshape(len(s.brain_small), -1).mean(axis=1)))
        release_heap()
    return np.stack(out)


def cli_fit(args: Any, settings: Any) -> int:
    """``triage domain BUNDLE --data DATASET --val DATASET``: fit the bundle's input-domain check on
    the studies it was trained on (or studies like them) and set its threshold on validation studies.

    Writes ``domain.safetensors`` into the bundle and its ``input_domain`` section into the manifest;
    the weights, thresholds and version are untouched (the check adds a flag; it changes no answer)."""
    import json

    from triage.models.bundle import load_weights, read_manifest, write_manifest
    from triage.models.data import cached_studies, open_source
    from triage.models.preprocess import PreprocessConfig
    from triage.models.train import _set_threads

    _set_threads()
    path = Path(args.bundle)
    manifest = read_manifest(path)
    net, seq = load_weights(path, manifest)
    net.eval()
    seq.eval()
    cfg = PreprocessConfig.from_dict(manifest["preprocessing"])
    flip = manifest.get("test_time_augmentation", "none") == "flip"
    cache = Path(getattr(args, "cache", "") or (Path(settings.data_dir) / "cache" / "models"))
    workers = int(getattr(args, "workers", 1) or 1)
    fmt = getattr(args, "format", "auto")
    desc = {}
    for role, spec in (("data", args.data), ("val", args.val)):
        src = open_source(spec, fmt)
        studies = cached_studies(src, cfg, cache, workers, target_size=cfg.size // net.stem, mmap=True)
        if not studies:
            raise SystemExit(f"{spec}: no studies")
        desc[role] = (study_descriptors(net, seq, studies, cfg, flip), src.description)
    check, summary = fit(desc["data"][0], desc["val"][0])
    manifest["input_domain"] = save(path, check, summary, f"fitted on {desc['data'][1]}; threshold on {desc['val'][1]}")
    write_manifest(path, manifest)
    print(json.dumps(manifest["input_domain"], indent=2))
    return 0
