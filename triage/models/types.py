"""What a model bundle returns for one volume (consumed by the pipeline and reports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BundleIdentity:
    name: str
    version: str
    sha256: str

    def __str__(self) -> str:
        return f"{self.name} {self.version} ({self.sha256[:12]})"


@dataclass
class Prediction:
    """Outputs for one series, in the geometry of the input :class:`~triage.imaging.volume.Volume`.

    ``exam_probs`` / ``thresholds`` / ``present``: per label (see :mod:`triage.labels`).
    ``slice_probs``: (Z, 6) float32, label order of ``LABELS``: each slice's score under the bundle's
    exam rule (its maximum over slices is the exam score; :func:`triage.models.inference.slice_scores`).
    ``masks``: subtype -> bool (Z, Y, X), same shape as the volume (empty subtypes may be absent);
    "any": blood of a positive exam under no called subtype (absent when there is none).
    ``volumes_ml``: per subtype and "any" (total: the union of every mask).
    ``abc2_ml``: ABC/2 estimate per subtype and "any".
    ``heatmaps``: label -> float32 (Z, Y, X) in [0, 1], zero outside the intracranial space;
    only for positive labels (may be empty for negative exams).
    ``key_slices``: label -> slice indices (most informative first).
    ``brain_mask``: bool (Z, Y, X) intracranial space, or None.
    ``timings``: stage -> seconds (preprocess, detection, segmentation, gradcam).
    ``input_domain``: ``{"distance", "threshold", "in_domain"}`` from the bundle's input-domain
    check (:mod:`triage.models.domain`), or None when the bundle has none.
    """

    exam_probs: dict[str, float]
    thresholds: dict[str, float]
    present: dict[str, bool]
    slice_probs: np.ndarray
    masks: dict[str, np.ndarray]
    volumes_ml: dict[str, float]
    abc2_ml: dict[str, float]
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    key_slices: dict[str, list[int]] = field(default_factory=dict)
    brain_mask: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    bundle: BundleIdentity | None = None
    device: str = "cpu"
    input_domain: dict[str, Any] | None = None

    @property
    def positive(self) -> bool:
        return bool(self.present.get("any", False))

    @property
    def out_of_domain(self) -> bool:
        """True when the bundle's input-domain check found the series unlike its training studies."""
        return self.input_domain is not None and not self.input_domain.get("in_domain", True)
