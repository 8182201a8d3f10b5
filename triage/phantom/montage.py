"""Montage PNGs of a study (brain window by default) with optional ground-truth outlines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# outline colours per subtype (RGB)
COLOURS = {
    "epidural": (255, 64, 64),
    "intraparenchymal": (255, 200, 0),
    "intraventricular": (0, 200, 255),
    "subarachnoid": (64, 255, 64),
    "subdural": (255, 0, 255),
}


def window(hu: np.ndarray, center: float = 40.0, width: float = 80.0) -> np.ndarray:
    lo = center - width / 2
    return (np.clip((hu - lo) / width, 0, 1) * 255).astype(np.uint8)


def _edges(m: np.ndarray) -> np.ndarray:
    e = np.zeros_like(m)
    e[1:, :] |= m[1:, :] != m[:-1, :]
    e[:, 1:] |= m[:, 1:] != m[:, :-1]
    return e & m


def montage(
    hu: np.ndarray,
    masks: dict[str, np.ndarray] | None = None,
    *,
    columns: int = 6,
    slices: list[int] | None = None,
    center: float = 40.0,
    width: float = 80.0,
    tile: int = 256,
) -> Image.Image:
    """Grid of axial slices (every slice, or ``slices``), outlines of ``masks`` in colour."""
    idx = list(range(hu.shape[0])) if slices is None else slices
    rows = (len(idx) + columns - 1) // columns
    out = Image.new("RGB", (columns * tile, rows * tile))
    for n, k in enumerate(idx):
        g = window(hu[k], center, width)
        rgb = np.repeat(g[:, :, None], 3, axis=2)
        for name, m in (masks or {}).items():
            if m[k].any():
                rgb[_edges(m[k])] = COLOURS.get(name, (255, 255, 255))
        img = Image.fromarray(rgb).resize((tile, tile), Image.Resampling.LANCZOS)
        out.paste(img, ((n % columns) * tile, (n // columns) * tile))
    return out


def save_montage(path: str | Path, hu: np.ndarray, masks: dict[str, np.ndarray] | None = None, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    montage(hu, masks, **kw).save(path, optimize=True)
    return path
