"""Grad-CAM for the slice classifier of :class:`~triage.models.network.ICHNet`.

Target layer: the decoder stage at 1/4 of the network resolution (``ICHNet.cam_index``), not the
8x8 bottleneck, so maps resolve bleeds of a few millimetres. The slice logit of the label is
back-propagated once for all requested slices together (the network is in eval mode, so slices do
not interact); weights are the spatially averaged gradients (Selvaraju et al. 2017), the map is
ReLU(sum_k w_k A_k), up-sampled to the original grid, zeroed outside the intracranial space and
normalised to [0, 1] over the series.

A ReLU Grad-CAM can be empty (every weighted activation negative, e.g. when the slice logit is
driven by suppressing evidence elsewhere); the segmentation probability of the label is used on
those slices instead, so a positive label always comes with a map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from triage.models.network import ICHNet
from triage.models.preprocess import from_network_grid


def gradcam_slices(net: ICHNet, x: torch.Tensor, label_index: int) -> torch.Tensor:
    """Grad-CAM maps (N, S, S) >= 0 for the slices in ``x`` (N, C, S, S) and one label."""
    net.eval()
    with torch.enable_grad():
        xin = x.detach().requires_grad_(False)
        out = net(xin, keep_cam=True)
        cam = out["cam"]
        net.zero_grad(set_to_none=True)
        out["slice"][:, label_index].sum().backward()
        grads = cam.grad
        assert grads is not None
        weights = grads.mean(dim=(2, 3), keepdim=True)
        maps = F.relu((weights * cam).sum(dim=1, keepdim=True))
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    net.zero_grad(set_to_none=True)
    return maps.detach()


def gradcam_volume(net: ICHNet, x: torch.Tensor, label_index: int, slices: list[int],
                   brain_small: np.ndarray, brain_mask: np.ndarray, box: tuple[int, int, int, int],
                   shape: tuple[int, int, int], fallback: np.ndarray | None = None) -> np.ndarray:
    """A float32 (Z, Y, X) heatmap in [0, 1] on the original grid, non-zero only on ``slices``.

    ``fallback``: (Z, S, S) segmentation probabilities for the label, used on slices whose
    Grad-CAM is empty.
    """
    small = torch.zeros((shape[0],) + tuple(x.shape[-2:]))
    if slices:
        idx = torch.as_tensor(sorted(set(slices)))
        maps = gradcam_slices(net, x[idx], label_index) * torch.from_numpy(brain_small[idx.numpy()]).float()
        if fallback is not None:
            empty = maps.flatten(1).amax(dim=1) <= 0
            if empty.any():
                fb = torch.from_numpy(np.ascontiguousarray(fallback[idx.numpy()])).float()
                maps[empty] = fb[empty] * maps.new_tensor(brain_small[idx.numpy()][empty.numpy()])
        small[idx] = maps
    full = from_network_grid(small, box, shape)
    full *= brain_mask
    np.clip(full, 0.0, None, out=full)
    peak = float(full.max())
    if peak > 0:
        full /= peak
    return full.astype(np.float32)
