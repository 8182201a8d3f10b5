"""The networks: a joint 2D segmentation/classification U-Net and a slice-sequence head.

``ICHNet`` (PatchFCN-style): a small U-Net encoder-decoder over one slice plus its neighbours; a
segmentation head with one sigmoid channel per subtype and a slice head with the six labels, fed by
global pooling of the bottleneck, of the quarter-resolution decoder stage (the Grad-CAM layer) and
max-pooled segmentation logits (so the slice decision sees the segmentation evidence).

With ``stem`` = 2 the input grid is twice the U-Net's: a pixel-unshuffle stem folds each 2x2 block
of input pixels into channels, so detail finer than the U-Net grid (a 1-2 mm crescent against the
inner table) still reaches the first convolution, at a fraction of a 256 px U-Net's cost (measured:
forward pass 1.2x, training 1.4x the 128 px network; a plain 256 px U-Net trains 8x slower), and
the segmentation logits are upsampled back to the input grid.

``SequenceHead`` (CNN-RNN style): a bidirectional GRU over the pooled per-slice features of a whole
series, giving slice probabilities that use the neighbouring slices; exam scores are the maximum
over slices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_LABELS = 6
N_SUBTYPES = 5


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ICHNet(nn.Module):
    """Joint segmentation (5 subtype channels) and slice classification (6 labels)."""

    def __init__(self, in_ch: int = 5, widths: tuple[int, ...] = (12, 24, 48, 80, 112), stem: int = 1) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.stem = int(stem)
        self.unshuffle: nn.Module = nn.PixelUnshuffle(self.stem) if self.stem > 1 else nn.Identity()
        self.enc = nn.ModuleList()
        c = in_ch * self.stem * self.stem
        for w in widths:
            self.enc.append(_block(c, w))
            c = w
        self.dec = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.dec.append(_block(c + w_skip, w_skip))
            c = w_skip
        self.seg = nn.Conv2d(widths[0], N_SUBTYPES, 1)
        # Grad-CAM layer: the decoder output at 1/4 resolution (index of self.dec).
        self.cam_index = len(widths) - 4
        self.feat_dim = widths[-1] + widths[2] + N_SUBTYPES
        self.cls = nn.Sequential(nn.Dropout(0.1), nn.Linear(self.feat_dim, N_LABELS))

    def lower(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder and decoder up to the Grad-CAM layer: (encoder outputs, CAM activations)."""
        skips = []
        h = self.unshuffle(x)
        for i, blk in enumerate(self.enc):
            if i:
                h = F.max_pool2d(h, 2)
            h = blk(h)
            skips.append(h)
        for j, blk in enumerate(self.dec[: self.cam_index + 1]):
            h = self._up(blk, h, skips[-2 - j])
        return skips, h

    def upper(self, skips: list[torch.Tensor], cam: torch.Tensor, full_seg: bool = True) -> dict[str, torch.Tensor]:
        """The rest of the network from the CAM activations: segmentation logits, slice logits, features.

        ``full_seg`` = False leaves the segmentation logits on the U-Net grid (size / stem)."""
        h = cam
        for j in range(self.cam_index + 1, len(self.dec)):
            h = self._up(self.dec[j], h, skips[-2 - j])
        seg = self.seg(h)
        feat = torch.cat([skips[-1].mean(dim=(2, 3)), cam.mean(dim=(2, 3)), seg.flatten(2).amax(dim=2)], dim=1)
        if full_seg and self.stem > 1:
            size = (seg.shape[-2] * self.stem, seg.shape[-1] * self.stem)
            seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=False)
        return {"seg": seg, "slice": self.cls(feat), "feat": feat}

    @staticmethod
    def _up(blk: nn.Module, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return blk(torch.cat([h, skip], dim=1))

    def forward(self, x: torch.Tensor, full_seg: bool = True) -> dict[str, torch.Tensor]:
        """``seg`` (N, 5, S, S) logits on the input grid (``full_seg`` = False: on the U-Net grid),
        ``slice`` (N, 6) logits and ``feat`` the pooled features."""
        skips, cam = self.lower(x)
        return self.upper(skips, cam, full_seg)


class SequenceHead(nn.Module):
    """Bidirectional GRU across the slices of one series -> per-slice logits (6 labels).

    Input: per-slice features (B, Z, F) and the CNN slice logits (B, Z, 6); the GRU output is added
    to the CNN logits (residual), so an untrained head starts from the slice network's answer.
    ``seg_inputs`` > 0: the head also reads the segmentation's per-slice evidence (B, Z, seg_inputs),
    the maximum probability of each subtype inside the skull, through its own projection. It starts
    at zero, so a head widened from one without it starts out computing exactly what that one did.
    """

    def __init__(self, feat_dim: int, hidden: int = 48, seg_inputs: int = 0) -> None:
        super().__init__()
        self.seg_inputs = int(seg_inputs)
        self.norm = nn.LayerNorm(feat_dim + N_LABELS)
        self.proj = nn.Linear(feat_dim + N_LABELS, hidden)
        self.seg_proj = nn.Linear(self.seg_inputs, hidden) if self.seg_inputs else None
        if self.seg_proj is not None:
            nn.init.zeros_(self.seg_proj.weight)
            nn.init.zeros_(self.seg_proj.bias)
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, N_LABELS)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feat: torch.Tensor, slice_logits: torch.Tensor,
                seg_evidence: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(self.norm(torch.cat([feat, slice_logits], dim=-1)))
        if self.seg_proj is not None:
            if seg_evidence is None:
                raise ValueError("this sequence head reads the segmentation evidence: pass seg_evidence")
            h = h + self.seg_proj(seg_evidence)
        h, _ = self.gru(torch.relu(h))
        return slice_logits + self.out(h)


def widen_stem(state: dict[str, torch.Tensor], stem: int) -> dict[str, torch.Tensor]:
    """Weights of a stem-1 :class:`ICHNet` -> the same network with a ``stem`` pixel-unshuffle stem.

    The first convolution's weights are shared out over the ``stem**2`` sub-pixel channels of each
    input channel and divided by ``stem**2``, so the widened network starts out computing what the
    original computed on the block-averaged (area-downsampled) input; fine-tuning then learns to use
    the sub-pixel detail.
    """
    key = "enc.0.0.weight"
    w = state[key]
    out = dict(state)
    out[key] = (w.repeat_interleave(stem * stem, dim=1) / float(stem * stem)).contiguous()
    return out


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
