"""Key images: brain-window slices with segmentation outlines, heatmap and a burned-in legend.

``plain_rgb`` is the key slice in a brain window (W 80 / L 40), scaled up so the longer side is
at least :data:`MIN_SIDE` pixels. ``overlay_rgb`` is the same image (rows ``0..H-1`` align pixel
for pixel with ``plain_rgb``) with the label's heatmap blended in, the outline of every subtype
segment on that slice in its colour, and a legend panel appended below it listing findings,
probabilities, volumes and "NOT FOR DIAGNOSTIC USE".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from reports.dicom.codes import COLORS
from reports.dicom.common import NOT_FOR_DIAGNOSIS
from triage.imaging.volume import Volume
from triage.labels import LABEL_INDEX, SHORT, SUBTYPES
from triage.models.types import Prediction

WINDOW_LEVEL, WINDOW_WIDTH = 40.0, 80.0
MIN_SIDE = 512
MAX_IMAGES = 6
HEAT_MIN = 0.15  # heatmap values below this are not drawn
HEAT_ALPHA = 0.45
FONT_PX = 18


@dataclass
class KeyImage:
    label: str  # the label this image illustrates ("any" for the summary of a negative exam)
    slice_index: int  # index into the Volume (slice order along the normal)
    plain_rgb: np.ndarray  # uint8 (H, W, 3)
    overlay_rgb: np.ndarray  # uint8 (H + legend, W, 3); rows [0, H) align with plain_rgb
    caption: str = ""


def window(hu: np.ndarray, level: float = WINDOW_LEVEL, width: float = WINDOW_WIDTH) -> np.ndarray:
    lo = level - width / 2
    return (np.clip((hu.astype(np.float32) - lo) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _scale(shape: tuple[int, int]) -> int:
    return max(1, -(-MIN_SIDE // max(shape)))  # ceil


def _up(img: np.ndarray, k: int, resample: Image.Resampling) -> np.ndarray:
    if k == 1:
        return img
    pil = Image.fromarray(img)
    return np.asarray(pil.resize((img.shape[1] * k, img.shape[0] * k), resample))


def _font(size: int = FONT_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: no files, no downloads


def _select(prediction: Prediction, n_slices: int) -> list[tuple[str, int]]:
    """(label, slice) pairs: one per subtype called present, else the most suspicious slice."""
    picks: list[tuple[str, int]] = []
    wanted = [s for s in SUBTYPES if prediction.present.get(s, False)]
    if prediction.positive and not wanted:
        wanted = ["any"]
    for label in wanted:
        ks = [k for k in prediction.key_slices.get(label, []) if 0 <= int(k) < n_slices]
        if ks:
            k = int(ks[0])
        elif prediction.slice_probs is not None and len(prediction.slice_probs) == n_slices:
            k = int(np.argmax(prediction.slice_probs[:, LABEL_INDEX[label]]))
        else:
            k = n_slices // 2
        picks.append((label, k))
    if not picks:  # negative exam: one summary image on the most suspicious slice
        if prediction.slice_probs is not None and len(prediction.slice_probs) == n_slices:
            k = int(np.argmax(prediction.slice_probs[:, 0]))
        else:
            k = n_slices // 2
        picks.append(("any", k))
    return picks[:MAX_IMAGES]


def slice_caption(volume: Volume, k: int) -> str:
    """Where slice ``k`` is, in the source's numbering as the viewer shows it:
    ``Im 124 (17/40), z 85.0 mm`` (``slice 17/40`` when the source gave no InstanceNumber)."""
    n = volume.shape[0]
    numbers = volume.meta.get("instance_numbers") or []
    number = numbers[k] if k < len(numbers) else None
    text = f"Im {number} ({k + 1}/{n})" if number is not None else f"slice {k + 1}/{n}"
    normal = volume.meta.get("normal")
    if normal is not None and k < len(volume.positions):
        text += f", z {float(np.dot(np.asarray(normal, float), volume.positions[k])):.1f} mm"
    return text


def _legend_lines(prediction: Prediction, label: str, where: str) -> list[tuple[str, tuple[int, int, int]]]:
    white = (255, 255, 255)
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if prediction.positive:
        lines.append((f"ICH AI: POSITIVE - key image for {SHORT[label]} - {where}", (255, 90, 90)))
        for s in SUBTYPES:
            if prediction.present.get(s, False):
                p = prediction.exam_probs.get(s, 0.0)
                v = prediction.volumes_ml.get(s, 0.0)
                lines.append((f"{SHORT[s]}: p={p:.2f}  volume {v:.1f} mL", COLORS[s]))
        total, abc2 = prediction.volumes_ml.get("any", 0.0), prediction.abc2_ml.get("any", 0.0)
        lines.append((f"Total {total:.1f} mL  (ABC/2 {abc2:.1f} mL)", white))
    else:
        p = prediction.exam_probs.get("any", 0.0)
        lines.append(("ICH AI: NEGATIVE - no hemorrhage above threshold", (120, 220, 120)))
        lines.append((f"Most suspicious slice: {where}  (ICH p={p:.2f})", white))
    if prediction.out_of_domain:
        lines.append(("OUT OF DOMAIN: unlike the training studies - do not rely on it", (255, 160, 0)))
    lines.append((NOT_FOR_DIAGNOSIS + " - triage aid only", (255, 220, 0)))
    return lines


def _render(volume: Volume, prediction: Prediction, label: str, k: int) -> KeyImage:
    gray = window(volume.hu[k])
    f = _scale(gray.shape)
    plain = np.repeat(_up(gray, f, Image.Resampling.BILINEAR)[..., None], 3, axis=2)
    over = plain.astype(np.float32)
    heat = prediction.heatmaps.get(label)
    if heat is None and label != "any":
        heat = prediction.heatmaps.get("any")
    if heat is not None and heat.shape == volume.shape:
        h = _up((np.clip(heat[k], 0, 1) * 255).astype(np.uint8), f, Image.Resampling.BILINEAR).astype(np.float32) / 255
        rgb = colormaps["inferno"](h)[..., :3] * 255.0
        a = np.where(h >= HEAT_MIN, HEAT_ALPHA * h, 0.0)[..., None]
        over = over * (1 - a) + rgb * a
    for s in (*SUBTYPES, "any"):
        m = prediction.masks.get(s)
        if m is None or m.shape != volume.shape or not m[k].any():
            continue
        mk = _up(m[k].astype(np.uint8) * 255, f, Image.Resampling.NEAREST) > 0
        edge = mk & ~ndimage.binary_erosion(mk, iterations=max(2, f // 2))
        over[edge] = COLORS[s]
    over8 = np.clip(over + 0.5, 0, 255).astype(np.uint8)
    lines = _legend_lines(prediction, label, slice_caption(volume, k))
    font = _font(max(FONT_PX, plain.shape[1] // 32))
    line_h = int(font.size * 1.35) if hasattr(font, "size") else 22
    panel = Image.new("RGB", (plain.shape[1], line_h * len(lines) + 12), (0, 0, 0))
    draw = ImageDraw.Draw(panel)
    for i, (text, color) in enumerate(lines):
        draw.text((10, 6 + i * line_h), text, fill=color, font=font)
    overlay = np.concatenate([over8, np.asarray(panel)], axis=0)
    caption = lines[0][0]
    return KeyImage(
        label=label, slice_index=k, plain_rgb=np.ascontiguousarray(plain), overlay_rgb=overlay, caption=caption
    )


def render_key_images(volume: Volume, prediction: Prediction) -> list[KeyImage]:
    """Key images for the report: one per subtype called present, or one summary if negative."""
    return [_render(volume, prediction, label, k) for label, k in _select(prediction, volume.shape[0])]
