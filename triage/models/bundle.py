"""Model bundle on disk: ``model.safetensors`` + ``manifest.json`` (+ ``MODEL_CARD.md``, plots).

The manifest records everything inference needs to reproduce training (labels, preprocessing,
architecture, thresholds, exam-score rule) and what the model is (training data, metrics), plus
the sha256 of the weights, checked on every load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from triage.labels import LABELS
from triage.models.network import ICHNet, SequenceHead
from triage.models.preprocess import PreprocessConfig

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BUNDLES = Path(__file__).resolve().parent / "bundles"
# the default: trained on real head CT slices and phantoms (MODEL_CARD.md in its folder)
DEFAULT_BUNDLE = BUNDLES / "ich-real-unet"
# trained on synthetic studies only: the demo's bundle (``bundle_path``), and the earlier default
PHANTOM_BUNDLE = BUNDLES / "ich-phantom-unet-gru"


class BundleError(RuntimeError):
    """The bundle directory is missing, incomplete, or its weights do not match the manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_models(manifest: dict[str, Any]) -> tuple[ICHNet, SequenceHead]:
    arch = manifest["architecture"]
    cfg = PreprocessConfig.from_dict(manifest["preprocessing"])
    net = ICHNet(in_ch=cfg.channels, widths=tuple(arch["widths"]), stem=int(arch.get("stem", 1)))
    seq = SequenceHead(net.feat_dim, hidden=int(arch["gru_hidden"]), seg_inputs=int(arch.get("sequence_seg_inputs", 0)))
    return net, seq


def save_bundle(out: str | Path, net: ICHNet, seq: SequenceHead, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write weights then the manifest (with their sha256). Returns the manifest written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"seq.{k}": v.detach().cpu().contiguous() for k, v in seq.state_dict().items()})
    wpath = out / WEIGHTS
    save_file(tensors, str(wpath), metadata={"format": "ich-triage", "name": str(manifest.get("name", ""))})
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["labels"] = list(LABELS)
    manifest["weights"] = {"file": WEIGHTS, "sha256": sha256_file(wpath), "bytes": wpath.stat().st_size}
    manifest["architecture"] = {**manifest.get("architecture", {}), "widths": list(net.widths), "stem": net.stem,
                                "sequence_seg_inputs": seq.seg_inputs}
    write_manifest(out, manifest)
    return manifest


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    (Path(path) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise BundleError(f"{p} not found: not a model bundle")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{p} is not valid JSON: {exc}") from exc
    for key in ("name", "version", "labels", "preprocessing", "architecture", "thresholds", "weights"):
        if key not in manifest:
            raise BundleError(f"{p} lacks {key!r}")
    if tuple(manifest["labels"]) != LABELS:
        raise BundleError(f"{p}: label order {manifest['labels']} differs from {list(LABELS)}")
    return manifest


def load_weights(path: str | Path, manifest: dict[str, Any]) -> tuple[ICHNet, SequenceHead]:
    """Load and verify the weights (sha256 against the manifest), returning models in eval mode."""
    wpath = Path(path) / manifest["weights"]["file"]
    if not wpath.is_file():
        raise BundleError(f"{wpath} not found")
    digest = sha256_file(wpath)
    if digest != manifest["weights"]["sha256"]:
        raise BundleError(f"{wpath}: sha256 {digest[:12]} does not match the manifest "
                          f"({manifest['weights']['sha256'][:12]})")
    tensors = load_file(str(wpath))
    net, seq = build_models(manifest)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    seq.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("seq.")})
    return net.eval(), seq.eval()


def default_bundle_path() -> Path:
    return DEFAULT_BUNDLE


def state_to_cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in sd.items()}
