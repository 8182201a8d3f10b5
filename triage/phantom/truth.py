"""Ground truth on disk: ``truth.npz`` + ``truth.json`` per study, ``masks.nii.gz`` for viewers.

``truth.npz``: ``masks`` uint8 (Z, Y, X) bit field (bit i-1 set = subtype ``SUBTYPES[i-1]``),
``brain_mask`` bool, ``slice_labels`` uint8 (Z, 6), ``exam_labels`` uint8 (6,), ``hu`` int16
(the exact volume, so readers need not decode DICOM), all in the same slice order as the DICOM
head series (ascending along the slice normal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from triage.labels import LABELS, SUBTYPES
from triage.phantom.generator import SyntheticStudy


def pack_masks(masks: dict[str, np.ndarray]) -> np.ndarray:
    bits = None
    for i, s in enumerate(SUBTYPES):
        m = masks[s].astype(np.uint8) << i
        bits = m if bits is None else bits | m
    return bits  # type: ignore[return-value]


def unpack_masks(bits: np.ndarray) -> dict[str, np.ndarray]:
    return {s: (bits >> i) & 1 == 1 for i, s in enumerate(SUBTYPES)}


def truth_json(study: SyntheticStudy, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "seed": study.seed,
        "kind": study.kind,
        "labels": list(LABELS),
        "exam_labels": [int(x) for x in study.exam_labels],
        "slice_labels": study.slice_labels.astype(int).tolist(),
        "volumes_ml": {k: round(v, 4) for k, v in study.volumes_ml.items()},
        "voxel_volume_ml": study.voxel_volume_ml,
        "shape": list(study.hu.shape),
        "pixel_spacing": list(study.pixel_spacing),
        "slice_spacing": study.slice_spacing,
        "slice_thickness": study.slice_thickness,
        "tilt_deg": study.geometry.tilt_deg,
        "meta": study.meta,
        **(extra or {}),
    }


def save_truth(study: SyntheticStudy, out: Path, extra: dict[str, Any] | None = None, nifti: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bits = pack_masks(study.masks)
    np.savez_compressed(
        out / "truth.npz", masks=bits, brain_mask=study.brain_mask, slice_labels=study.slice_labels,
        exam_labels=study.exam_labels, hu=study.hu.astype(np.int16),
    )
    (out / "truth.json").write_text(json.dumps(truth_json(study, extra), indent=1))
    if nifti:
        import nibabel as nib

        from triage.phantom.dicom_writer import nifti_affine

        img = nib.Nifti1Image(np.ascontiguousarray(bits.transpose(2, 1, 0)), nifti_affine(study))
        img.header["descrip"] = b"ICH bitmask: 1 EDH 2 IPH 4 IVH 8 SAH 16 SDH"
        nib.save(img, out / "masks.nii.gz")


def load_truth(d: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (hu float32, masks dict, brain_mask, slice_labels, exam_labels) and the JSON document."""
    z = np.load(d / "truth.npz")
    arrays: dict[str, Any] = {
        "hu": z["hu"].astype(np.float32),
        "masks": unpack_masks(z["masks"]),
        "brain_mask": z["brain_mask"],
        "slice_labels": z["slice_labels"],
        "exam_labels": z["exam_labels"],
    }
    return arrays, json.loads((d / "truth.json").read_text())
