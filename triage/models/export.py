"""ONNX export of a bundle's slice network, and the ONNX Runtime session that runs it on CPU.

``triage export BUNDLE`` writes ``slice_network.onnx`` beside the weights: the per-slice network
(:class:`~triage.models.network.ICHNet`) from the input batch to the segmentation logits on the
U-Net grid, the slice logits and the pooled features, with a dynamic batch size. The export is
checked against PyTorch on a fresh batch before it is recorded, and the manifest keeps its sha256
and the sha256 of the weights it was made from. The sequence head (a small GRU over one series)
and Grad-CAM (which needs gradients) stay in PyTorch.

Why: ONNX Runtime runs this network in about half PyTorch's CPU time (docs/benchmarks.md). A
stale export (weights retrained since) or a changed file is refused, like changed weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from triage.logging import get_logger
from triage.models.bundle import BundleError, load_weights, read_manifest, sha256_file, write_manifest
from triage.models.network import ICHNet
from triage.models.preprocess import PreprocessConfig

log = get_logger(__name__)

ONNX_FILE = "slice_network.onnx"
OUTPUTS = ("seg", "slice", "feat")
MAX_ABS_DIFF = 1e-3  # largest difference in any output (logits) the check accepts


class SliceNetworkGraph(nn.Module):
    """The exported function: input batch -> (segmentation logits on the U-Net grid, slice logits,
    pooled features), exactly what :func:`~triage.models.inference.run_networks` asks of the net."""

    def __init__(self, net: ICHNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(x, full_seg=False)
        return out["seg"], out["slice"], out["feat"]


def export_onnx(bundle: str | Path) -> dict[str, Any]:
    """Export the bundle's slice network to ONNX, check it against PyTorch, record it in the manifest."""
    import onnxruntime as ort

    path = Path(bundle)
    manifest = read_manifest(path)
    net, _ = load_weights(path, manifest)
    cfg = PreprocessConfig.from_dict(manifest["preprocessing"])
    graph = SliceNetworkGraph(net.eval()).eval()
    torch.manual_seed(0)
    example = torch.rand(2, cfg.channels, cfg.size, cfg.size)
    tmp = path / (ONNX_FILE + ".tmp")
    # the exporter's notes (torchvision ops this net has none of, optimiser passes) and deprecations
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING if name != "torch.onnx" else logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), input_names=["x"], output_names=list(OUTPUTS),
                                    dynamic_shapes={"x": {0: torch.export.Dim("slices", min=1, max=4096)}},
                                    dynamo=True, verbose=False)
        program.save(str(tmp))
    check = torch.rand(3, cfg.channels, cfg.size, cfg.size)  # another batch size than the example
    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"x": check.numpy()})
    with torch.no_grad():
        want = graph(check)
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))
    if not diff <= MAX_ABS_DIFF:
        tmp.unlink()
        raise BundleError(f"ONNX export differs from PyTorch by {diff:.2e} (> {MAX_ABS_DIFF:g}); not recorded")
    os.replace(tmp, path / ONNX_FILE)
    entry = {"file": ONNX_FILE, "sha256": sha256_file(path / ONNX_FILE), "bytes": (path / ONNX_FILE).stat().st_size,
             "weights_sha256": manifest["weights"]["sha256"], "outputs": list(OUTPUTS),
             "max_abs_diff": diff, "torch": torch.__version__, "onnxruntime": ort.__version__}
    manifest["exports"] = {**manifest.get("exports", {}), "onnx": entry}
    write_manifest(path, manifest)
    log.info("onnx_exported", bundle=str(path), sha256=entry["sha256"][:12], max_abs_diff=diff)
    return entry


def onnx_session(bundle: str | Path, manifest: dict[str, Any], threads: int) -> Any | None:
    """An ONNX Runtime session for the bundle's verified export; None when the bundle has none or
    onnxruntime is not installed. A stale or changed export raises :class:`BundleError`."""
    entry = manifest.get("exports", {}).get("onnx")
    if not entry:
        return None
    f = Path(bundle) / entry["file"]
    if entry.get("weights_sha256") != manifest["weights"]["sha256"]:
        raise BundleError(f"{f} was exported from other weights; run `triage export {bundle}` again")
    if not f.is_file():
        raise BundleError(f"{f} not found")
    digest = sha256_file(f)
    if digest != entry["sha256"]:
        raise BundleError(f"{f}: sha256 {digest[:12]} does not match the manifest ({entry['sha256'][:12]})")
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime not installed: the slice network runs in PyTorch")
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])


def main(args: argparse.Namespace, settings: Any) -> int:
    """``triage export BUNDLE``: write and record the ONNX export of a bundle's slice network."""
    try:
        entry = export_onnx(args.bundle)
    except (BundleError, ImportError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(entry, indent=2))
    return 0
