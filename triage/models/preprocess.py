"""Preprocessing shared by training and inference.

HU volume -> intracranial mask (threshold + morphology, skull stripping as in PatchFCN) -> square
crop around the intracranial space -> in-plane resampling to the network size -> multi-window
channels (brain 40/80, subdural 80/200, soft tissue 40/380 as in the CNN-RNN papers) plus the brain
window of the neighbouring slices as context (PatchFCN's three-slice input).

Everything outside the (slightly dilated) intracranial space is set to zero in the network input, so
scalp haematoma, skull-base streaks and the face cannot drive a prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (40.0, 380.0))
# The input both DICOM (HU) and publishers' windowed 8-bit slices can give: one brain window.
BRAIN_WINDOW: tuple[tuple[float, float], ...] = ((40.0, 80.0),)
INPUTS = ("hu", "brain_window")
HEAD_LEVEL = 12  # uint8 brain-window level above which a pixel is head (about 4 HU), not air or fat
HEAD_MARGIN = 0.04  # crop margin around the head, as a share of its larger side


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters recorded in the bundle manifest so inference reproduces training exactly."""

    size: int = 96  # network grid
    base_size: int = 128  # grid of the windowing step (then area-resampled to ``size``)
    windows: tuple[tuple[float, float], ...] = WINDOWS
    context: int = 1  # neighbour slices on each side (brain window)
    margin_mm: float = 6.0
    bone_hu: float = 250.0
    blood_hu: tuple[float, float] = (40.0, 100.0)
    # Slices whose intracranial cross-section is smaller than this are left out (mask cleared): the
    # vertex and skull-base caps of thick slices are partial volume of the inner table (a real 5 mm
    # tilted CT reads 88 HU median over its 13 cm2 top slice), not readable brain.
    min_area_cm2: float = 20.0
    # "hu": skull-stripped multi-window input from HU (synthetic bundles). "brain_window": one brain
    # window, cropped around the head, not skull-stripped, computed from 8-bit windowed pixels only,
    # so a publisher's windowed PNG and the node's HU give the same tensor (:func:`brain_window_u8`).
    input: str = "hu"

    @property
    def channels(self) -> int:
        return len(self.windows) + 2 * self.context

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        d = dict(d)
        d["windows"] = tuple(tuple(w) for w in d.get("windows", WINDOWS))
        d["blood_hu"] = tuple(d.get("blood_hu", (40.0, 100.0)))
        d.setdefault("min_area_cm2", 0.0)  # bundles from before the rule keep every slice
        d.setdefault("input", "hu")
        if d["input"] not in INPUTS:
            raise ValueError(f"unknown preprocessing input {d['input']!r} (known: {', '.join(INPUTS)})")
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Prepared:
    """A volume ready for the network plus what is needed to map outputs back."""

    windows: np.ndarray  # uint8 (Z, W, S, S): windowed, skull-stripped, resampled
    brain_small: np.ndarray  # bool (Z, S, S) intracranial mask on the network grid
    brain_mask: np.ndarray  # bool (Z, Y, X) intracranial mask on the original grid
    box: tuple[int, int, int, int]  # y0, y1, x0, x1 of the crop in the original grid
    shape: tuple[int, int, int]
    extra: dict = field(default_factory=dict)


def disk(r: int) -> np.ndarray:
    """A 2D disk structuring element of radius ``r`` pixels, shape (2r+1, 2r+1)."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy * yy + xx * xx <= r * r


def _plane(r: int) -> np.ndarray:
    """An in-plane disk structuring element of radius r, shape (1, 2r+1, 2r+1)."""
    return disk(r)[None]


def _close_disk(img: np.ndarray, r: int) -> np.ndarray:
    """Binary closing of a 2D mask by a disk of radius ``r`` pixels (outside the image counts as
    background), through two Euclidean distance transforms: the cost does not grow with ``r``."""
    pad = np.pad(img, r + 1)
    dilated = ndimage.distance_transform_edt(~pad) <= r
    closed = ndimage.distance_transform_edt(dilated) > r
    return closed[r + 1 : -(r + 1), r + 1 : -(r + 1)]


SEAL_MM = (3.0, 6.0, 12.0)  # closing radii (mm) that seal the bone ring, narrowest first


# A skull open over a wide arc (craniectomy, a large fracture or burr-hole flap) that no closing seals:
# measured on real post-operative slices (bhsd-mini, mbhseg25-mini: the sealed cavity was empty on 13 of
# 72) against the skull base of the real normal CT (whose hull holds air, bone and face: brain-dense
# tissue 0.20-0.48 of it, never taken).
OPEN_SKULL = {"max_cavity_cm2": 50.0, "min_hull_cm2": 80.0, "min_brain_share": 0.55, "max_bone_share": 0.25,
              "median_hu": (10.0, 45.0), "min_cavity_share": 0.35, "max_deep_bone_share": 0.05}
_SECTORS = 72  # 5-degree sectors around the hull's centre: where the skull is, and where it is missing


def fill_convex_hull(mask: np.ndarray) -> np.ndarray:
    """Bool (Y, X): the filled convex hull of a 2-D mask (empty where it has under 3 points)."""
    from PIL import Image, ImageDraw
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(mask)
    out = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    if len(xs) >= 3:
        pts = np.stack([xs, ys], axis=1).astype(np.float64)
        try:
            hull = ConvexHull(pts)
        except QhullError:  # collinear points: no area
            return np.zeros(mask.shape, bool)
        ImageDraw.Draw(out).polygon([(float(pts[i, 0]), float(pts[i, 1])) for i in hull.vertices], fill=1, outline=1)
    return np.array(out, bool)


def open_skull_cavity(h: np.ndarray, px: float, filled: np.ndarray | None = None) -> np.ndarray | None:
    """The cranial cavity of one slice (HU, ``px`` mm pixels) whose bone ring is open over a wide arc,
    or None where the slice does not look like one.

    The head is the largest piece of tissue denser than 5 HU, holes filled, opened by a 2 mm disk
    (head-holder arcs and bands go). The skull's pieces inside it (bone opened by a 1 mm disk; pieces
    of at least a fifth of the largest) span a convex hull, which (3 mm in from its edge) must be
    large, mostly brain-dense tissue (5-80 HU) with little bone (almost none 12 mm in from its
    edge), and of brain's median density (10-45 HU; muscle reads 40-60): a skull-base slice's hull
    takes in sinuses, mastoid air, petrous bone and the face, a neck slice's muscle, and both are
    refused (measured: deep bone 0.00-0.03 of the hull on 15 real post-craniectomy slices, 0.10-0.49
    on skull-base slices). The cavity is the hull less the
    bone and, in the sectors (seen from the hull's centre) where no skull is, the head less 4 mm of
    scalp: where the flap is missing, the brain and any collection under the scalp stay in (the
    hull's chord would cut them off), and where the skull is, nothing outside it comes in."""
    plane = ndimage.binary_fill_holes(h > 5.0, structure=np.ones((3, 3), bool)) if filled is None else filled
    plane = ndimage.binary_opening(plane, structure=disk(max(1, int(round(2.0 / px)))))
    lab, n = ndimage.label(plane)
    if n == 0:
        return None
    head = lab == 1 + int(np.argmax(ndimage.sum_labels(plane, lab, index=np.arange(1, n + 1))))
    bone = (h > 250.0) & head
    pieces = ndimage.binary_opening(bone, structure=disk(max(1, int(round(1.0 / px)))))
    lab, n = ndimage.label(pieces)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(pieces, lab, index=np.arange(1, n + 1))
    skull = np.isin(lab, 1 + np.flatnonzero(sizes >= 0.2 * sizes.max()))
    hull = fill_convex_hull(skull)
    if hull.sum() * px * px / 100.0 < OPEN_SKULL["min_hull_cm2"]:
        return None
    inner = ndimage.binary_erosion(hull, iterations=max(1, int(round(3.0 / px))))
    n_inner = max(1, int(inner.sum()))
    brain = float(((h > 5.0) & (h < 80.0) & inner).sum()) / n_inner
    dense = float((bone & inner).sum()) / n_inner
    tissue = h[inner & (h > -50.0) & (h < 100.0)]
    lo, hi = OPEN_SKULL["median_hu"]
    if (brain < OPEN_SKULL["min_brain_share"] or dense > OPEN_SKULL["max_bone_share"] or not tissue.size
            or not lo <= float(np.median(tissue)) <= hi):
        return None
    # bone deep inside the hull (petrous ridges, sphenoid, septum) is a skull base, not a missing flap
    deep = ndimage.binary_erosion(hull, iterations=max(1, int(round(12.0 / px))))
    if float((bone & deep).sum()) > OPEN_SKULL["max_deep_bone_share"] * max(1, int(deep.sum())):
        return None
    ys, xs = np.nonzero(hull)
    yy, xx = np.indices(h.shape)
    sector = ((np.arctan2(yy - ys.mean(), xx - xs.mean()) + np.pi) / (2 * np.pi) * _SECTORS).astype(int) % _SECTORS
    covered = np.zeros(_SECTORS, bool)
    covered[np.unique(sector[skull])] = True
    under_scalp = ndimage.binary_erosion(head, iterations=max(1, int(round(4.0 / px))))
    return (hull | (under_scalp & ~covered[sector])) & ~ndimage.binary_dilation(bone)


def intracranial_mask(hu: np.ndarray, pixel_spacing: tuple[float, float] = (0.5, 0.5),
                      bone_hu: float = 250.0) -> np.ndarray:
    """Boolean (Z, Y, X) mask of the space inside the skull (brain, CSF, blood; bone excluded).

    Per slice: bone by threshold, closed to seal sutures and foramina, holes filled to get the
    cranial cavity, bone and air removed, opened to cut thin bridges; then the largest 3D
    connected component. Works on a 2x down-sampled grid for speed when the slices are large.

    Skull-base slices, above all tilted ones, cut the foramen magnum, jugular foramina and mastoid
    air cells, and a 3 mm closing leaves their bone ring open (the real GE CT lost its posterior
    fossa that way). A slice whose cavity is less than half what a wider closing finds takes the
    smallest wider closing (:data:`SEAL_MM`) that reaches that half. A slice still left with a small
    cavity may be a skull open over a wide arc (craniectomy: the patients a bleed most often brings
    back): :func:`open_skull_cavity` takes the skull's convex hull there.
    """
    hu = np.asarray(hu, dtype=np.float32)
    z, y, x = hu.shape
    step = 2 if min(y, x) >= 384 else 1
    h = hu[:, ::step, ::step]
    px = float(np.mean(pixel_spacing)) * step
    open_r = max(1, int(round(2.0 / px)))
    bone = h > bone_hu
    plane8 = np.zeros((3, 3, 3), bool)
    plane8[1] = True

    def cavity_of(b: np.ndarray, mm: float, pixel: float) -> np.ndarray:
        r = max(1, int(round(mm / pixel)))
        if r <= 4:
            sealed = ndimage.binary_closing(b, structure=_plane(r), border_value=0)
        else:
            sealed = np.stack([_close_disk(sl, r) for sl in b]) if len(b) else b
        return ndimage.binary_fill_holes(sealed, structure=plane8) & ~sealed

    cavity = cavity_of(bone, SEAL_MM[0], px)
    area = cavity.sum(axis=(1, 2))
    # the widest seal, on a grid twice as coarse: only its area is needed, to find open rings
    wide_area = cavity_of(bone[:, ::2, ::2], SEAL_MM[-1], 2 * px).sum(axis=(1, 2)) * 4
    open_ring = np.flatnonzero(area < 0.5 * wide_area)
    for mm in SEAL_MM[1:]:
        if not len(open_ring):
            break
        cav = cavity_of(bone[open_ring], mm, px)
        sealed_now = cav.sum(axis=(1, 2)) >= 0.5 * wide_area[open_ring]
        cavity[open_ring[sealed_now]] = cav[sealed_now]
        open_ring = open_ring[~sealed_now]
    soft = (h > -100) & (h < 200)
    # open-skull candidates: a small cavity, or one small for its head (a seal that closed on the
    # gap between the scalp and a head-holder band instead of the missing flap)
    cav_cm2 = cavity.sum(axis=(1, 2)) * px * px / 100.0
    filled = ndimage.binary_fill_holes(h > 5.0, structure=plane8)  # per slice: the head, holes filled
    head_cm2 = filled.sum(axis=(1, 2)) * px * px / 100.0
    small = (cav_cm2 < OPEN_SKULL["max_cavity_cm2"]) | (cav_cm2 < OPEN_SKULL["min_cavity_share"] * head_cm2)
    for zi in np.flatnonzero(small):
        opened = open_skull_cavity(h[zi], px, filled[zi])
        if opened is not None:
            cavity[zi] = opened
    inside = ndimage.binary_opening(cavity & soft, structure=_plane(open_r))
    lab, n = ndimage.label(inside)
    if n == 0:
        return np.zeros(hu.shape, bool)
    sizes = ndimage.sum_labels(inside, lab, index=np.arange(1, n + 1))
    keep = lab == (int(np.argmax(sizes)) + 1)
    keep = ndimage.binary_fill_holes(keep, structure=plane8)
    if step > 1:
        keep = np.repeat(np.repeat(keep, step, axis=1), step, axis=2)[:, :y, :x]
    return keep


def crop_box(mask: np.ndarray, pixel_spacing: tuple[float, float], margin_mm: float) -> tuple[int, int, int, int]:
    """Square (in mm) crop around the union of the mask over all slices, clamped to the image."""
    _, ny, nx = mask.shape
    proj = mask.any(axis=0)
    if not proj.any():
        return 0, ny, 0, nx
    ys, xs = np.nonzero(proj)
    sy, sx = float(pixel_spacing[0]), float(pixel_spacing[1])
    cy, cx = (ys.min() + ys.max() + 1) / 2.0, (xs.min() + xs.max() + 1) / 2.0
    half_mm = max((ys.max() + 1 - ys.min()) * sy, (xs.max() + 1 - xs.min()) * sx) / 2.0 + margin_mm
    hy, hx = half_mm / sy, half_mm / sx
    y0, y1 = int(max(0, np.floor(cy - hy))), int(min(ny, np.ceil(cy + hy)))
    x0, x1 = int(max(0, np.floor(cx - hx))), int(min(nx, np.ceil(cx + hx)))
    return y0, y1, x0, x1


def resample(arr: np.ndarray | torch.Tensor, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Resample (Z, [C,] H, W) in-plane to ``size``; returns a float32 tensor of the same rank."""
    t = torch.as_tensor(np.asarray(arr, dtype=np.float32) if isinstance(arr, np.ndarray) else arr).float()
    squeeze = t.dim() == 3
    if squeeze:
        t = t[:, None]
    if mode == "area" and (t.shape[-2] < size[0] or t.shape[-1] < size[1]):
        mode = "bilinear"
    kw = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(t, size=size, mode=mode, **kw)
    return out[:, 0] if squeeze else out


def window(hu: np.ndarray | torch.Tensor, center: float, width: float) -> torch.Tensor:
    t = torch.as_tensor(hu)
    return ((t - (center - width / 2.0)) / width).clamp_(0.0, 1.0)


def brain_window_u8(hu: np.ndarray, window_setting: tuple[float, float] = BRAIN_WINDOW[0]) -> np.ndarray:
    """(Z, Y, X) HU -> uint8 brain window at the original resolution, rounded as a publisher's PNG is.

    Everything of the ``brain_window`` input is computed from this array, so a slice given as an
    8-bit PNG in the same window (read back as HU by :func:`pixels_to_hu`) yields the same tensor."""
    centre, width = window_setting
    t = (np.asarray(hu, np.float32) - (centre - width / 2.0)) / width
    return np.round(np.clip(t, 0.0, 1.0) * 255.0).astype(np.uint8)


def pixels_to_hu(pixels: np.ndarray, window_setting: tuple[float, float]) -> np.ndarray:
    """8-bit pixels of a windowed image -> the HU each level stands for (float32): the inverse of the
    window inside its range (saturated levels read as the window's ends)."""
    centre, width = window_setting
    return (np.asarray(pixels, np.float32) / 255.0 * width + (centre - width / 2.0)).astype(np.float32)


def head_mask(win_u8: np.ndarray) -> np.ndarray:
    """Bool (Z, Y, X): the head (skin, skull, brain) in a uint8 brain window, without air, fat, the
    table or head-holder arcs: above :data:`HEAD_LEVEL`, holes filled per slice, opened by a disk of
    about 9 mm diameter (an arc or a cushion edge is thinner; a head is not), then the largest 3D
    component. Computed on a 2x coarser grid for large slices."""
    z, y, x = win_u8.shape
    step = 2 if min(y, x) >= 384 else 1
    plane8 = np.zeros((3, 3, 3), bool)
    plane8[1] = True
    fg = ndimage.binary_fill_holes(win_u8[:, ::step, ::step] > HEAD_LEVEL, structure=plane8)
    r = max(1, int(round(10 / step)))  # pixels of a 512 px slice (~0.45 mm)
    fg = ndimage.binary_opening(fg, structure=_plane(r))
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(win_u8.shape, bool)
    sizes = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
    keep = lab == (int(np.argmax(sizes)) + 1)
    if step > 1:
        keep = np.repeat(np.repeat(keep, step, axis=1), step, axis=2)[:, :y, :x]
    return keep


def head_box(mask: np.ndarray, margin: float = HEAD_MARGIN) -> tuple[int, int, int, int]:
    """Square crop (in pixels) around the union of the head mask, with ``margin`` of its larger side;
    it may reach outside the image (the outside reads as air)."""
    _, ny, nx = mask.shape
    proj = mask.any(axis=0)
    if not proj.any():
        return 0, ny, 0, nx
    ys, xs = np.nonzero(proj)
    cy, cx = (ys.min() + ys.max() + 1) / 2.0, (xs.min() + xs.max() + 1) / 2.0
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * (0.5 + margin)
    return (int(np.floor(cy - half)), int(np.ceil(cy + half)), int(np.floor(cx - half)), int(np.ceil(cx + half)))


def crop_padded(arr: np.ndarray, box: tuple[int, int, int, int], fill: float = 0) -> np.ndarray:
    """``arr[..., y0:y1, x0:x1]`` where the box may reach outside the array (filled with ``fill``)."""
    y0, y1, x0, x1 = box
    ny, nx = arr.shape[-2:]
    out = np.full(arr.shape[:-2] + (y1 - y0, x1 - x0), fill, dtype=arr.dtype)
    sy0, sy1, sx0, sx1 = max(0, y0), min(ny, y1), max(0, x0), min(nx, x1)
    if sy1 > sy0 and sx1 > sx0:
        out[..., sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[..., sy0:sy1, sx0:sx1]
    return out


def needs_intracranial(hu: np.ndarray, cfg: PreprocessConfig) -> bool:
    """Whether a ``brain_window`` volume's output mask comes from HU (:func:`intracranial_mask`): it
    holds bone (the node's DICOM, HU-valued slice sets); a brain-windowed PNG has no bone HU."""
    return cfg.input == "brain_window" and bool((hu > cfg.bone_hu).any())


def with_intracranial(prep: Prepared, brain_mask: np.ndarray) -> Prepared:
    """``prep`` with the HU intracranial mask as its ``brain_mask`` and each slice's intracranial
    area (cm², ``extra["intracranial_cm2"]``)."""
    ps = prep.extra["pixel_spacing"]
    area = brain_mask.sum(axis=(1, 2)) * float(ps[0]) * float(ps[1]) / 100.0
    return replace(prep, brain_mask=brain_mask, extra={**prep.extra, "intracranial_cm2": area})


def prepare_brain_window(hu: np.ndarray, pixel_spacing: tuple[float, float], cfg: PreprocessConfig,
                         brain_mask: np.ndarray | None = None, intracranial: bool = True) -> Prepared:
    """The ``brain_window`` input: uint8 brain window -> head crop -> area resampling.

    ``brain_mask`` (for the output masks) is the HU intracranial mask when the volume holds bone
    (:func:`needs_intracranial`), else the head mask. ``brain_small`` is the head on the network
    grid. ``extra["intracranial_cm2"]`` (Z,) is each slice's intracranial area where the mask comes
    from HU (NaN otherwise). ``intracranial`` False leaves the head mask in place: the caller
    computes the HU mask beside the network (it is needed only after it) and joins it with
    :func:`with_intracranial`."""
    u8 = brain_window_u8(hu, cfg.windows[0])
    head = head_mask(u8)
    box = head_box(head)
    s = (cfg.base_size, cfg.base_size)
    crop = torch.from_numpy(crop_padded(u8, box).astype(np.float32) / 255.0)
    small = resample(crop, s)
    frac = resample(torch.from_numpy(crop_padded(head, box).astype(np.float32)), s)
    win_u8 = (small * 255.0).round().clamp_(0, 255).to(torch.uint8).numpy()[:, None]
    win_u8, small_mask, _ = downsize(win_u8, (frac > 0.5).numpy(), None, cfg.size)
    prep = Prepared(win_u8, small_mask, head if brain_mask is None else brain_mask, box, tuple(hu.shape),
                    {"intracranial_cm2": np.full(hu.shape[0], np.nan, np.float32),
                     "pixel_spacing": tuple(float(v) for v in pixel_spacing)})
    if brain_mask is None and intracranial and needs_intracranial(hu, cfg):
        return with_intracranial(prep, intracranial_mask(hu, pixel_spacing, cfg.bone_hu))
    return prep


def prepare(hu: np.ndarray, pixel_spacing: tuple[float, float], cfg: PreprocessConfig,
            brain_mask: np.ndarray | None = None, intracranial: bool = True) -> Prepared:
    """Run the full preprocessing on a (Z, Y, X) HU array (``intracranial``: see
    :func:`prepare_brain_window`)."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3 or hu.shape[0] < 1:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {hu.shape}")
    if cfg.input == "brain_window":
        return prepare_brain_window(hu, pixel_spacing, cfg, brain_mask, intracranial)
    if brain_mask is None:
        brain_mask = intracranial_mask(hu, pixel_spacing, cfg.bone_hu)
    if cfg.min_area_cm2 > 0:
        area = brain_mask.sum(axis=(1, 2)) * float(pixel_spacing[0]) * float(pixel_spacing[1]) / 100.0
        small_caps = area < cfg.min_area_cm2
        if small_caps.any():
            brain_mask = brain_mask.copy()
            brain_mask[small_caps] = False
    y0, y1, x0, x1 = crop_box(brain_mask, pixel_spacing, cfg.margin_mm)
    s = (cfg.base_size, cfg.base_size)
    crop = torch.from_numpy(np.ascontiguousarray(hu[:, y0:y1, x0:x1]))
    mcrop = torch.from_numpy(np.ascontiguousarray(brain_mask[:, y0:y1, x0:x1])).float()
    # Skull strip before resampling so bone never leaks into the intracranial border by interpolation
    # (a bright rim there would look like a subdural crescent).
    stripped = torch.where(mcrop > 0, crop, torch.full_like(crop, -1000.0))
    small = resample(stripped, s)
    frac = resample(mcrop, s)
    brain_small = frac > 0.5
    chans = [window(small, c, w) for c, w in cfg.windows]
    win = torch.stack(chans, dim=1)  # (Z, W, S, S)
    win = torch.where(frac[:, None] > 0.25, win, torch.zeros_like(win))
    win_u8 = (win * 255.0).round().to(torch.uint8).numpy()
    win_u8, small_mask, _ = downsize(win_u8, brain_small.numpy(), None, cfg.size)
    return Prepared(win_u8, small_mask, brain_mask, (y0, y1, x0, x1), tuple(hu.shape),
                    {"pixel_spacing": tuple(float(v) for v in pixel_spacing)})


def downsize(windows_u8: np.ndarray, brain_small: np.ndarray, target_u8: np.ndarray | None,
             size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Area-resample base-grid arrays (windows, intracranial mask, soft targets) to the network grid.

    Training caches hold the base grid; inference goes through this same function, so both see
    identical inputs.
    """
    if windows_u8.shape[-1] == size:
        return windows_u8, brain_small, target_u8
    mask = (resample(brain_small.astype(np.float32), (size, size)) > 0.5).numpy()
    tgt = None if target_u8 is None else resize_u8(target_u8, size)
    return resize_u8(windows_u8, size), mask, tgt


def resize_u8(arr: np.ndarray, size: int) -> np.ndarray:
    """Area-resample a uint8 (Z, C, H, W) array in-plane to (Z, C, size, size)."""
    if arr.shape[-1] == size:
        return arr
    z, c = arr.shape[:2]
    t = resample(torch.from_numpy(arr).float().reshape(z * c, *arr.shape[-2:]), (size, size))
    return t.round().clamp_(0, 255).to(torch.uint8).reshape(z, c, size, size).numpy()


def network_input(windows_u8: np.ndarray | torch.Tensor, context: int = 1) -> torch.Tensor:
    """(Z, W, S, S) uint8 windows -> (Z, W + 2*context, S, S) float input with neighbour slices.

    Neighbours use the brain window (channel 0); edges repeat the first/last slice.
    """
    w = torch.as_tensor(windows_u8).float().div_(255.0)
    z = w.shape[0]
    chans = [w]
    for d in range(1, context + 1):
        below = torch.clamp(torch.arange(z) - d, 0, z - 1)
        above = torch.clamp(torch.arange(z) + d, 0, z - 1)
        chans.append(w[below, :1])
        chans.append(w[above, :1])
    return torch.cat(chans, dim=1).contiguous()


def key_slice_input(windows_u8: np.ndarray | torch.Tensor, context: int, slices: Sequence[int]) -> torch.Tensor:
    """The rows ``slices`` of :func:`network_input` without building the
    whole volume's input (Grad-CAM's key slices, training batches): (N, W + 2*context, S, S)
    float, neighbours from the brain window."""
    w = torch.as_tensor(windows_u8)
    z = w.shape[0]
    idx = torch.as_tensor(list(slices), dtype=torch.long)
    chans = [w[idx]]
    for d in range(1, context + 1):
        chans.append(w[torch.clamp(idx - d, 0, z - 1), :1])
        chans.append(w[torch.clamp(idx + d, 0, z - 1), :1])
    return torch.cat(chans, dim=1).float().div_(255.0).contiguous()


def to_network_grid(mask: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Bool (Z, Y, X) on the original grid -> float32 area fraction (Z, S, S) on a ``size`` grid."""
    crop = np.ascontiguousarray(crop_padded(np.asarray(mask, np.float32), box))
    return resample(crop, (size, size)).numpy()


def from_network_grid(prob: torch.Tensor | np.ndarray, box: tuple[int, int, int, int],
                      shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, S, S) probabilities -> float32 (Z, Y, X) on the original grid (zero outside the crop)."""
    y0, y1, x0, x1 = box
    t = torch.as_tensor(prob).float()
    up = F.interpolate(t[:, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[:, 0].numpy()
    out = np.zeros(shape, np.float32)
    ny, nx = shape[-2:]
    sy0, sy1, sx0, sx1 = max(0, y0), min(ny, y1), max(0, x0), min(nx, x1)  # a head crop may reach outside
    if sy1 > sy0 and sx1 > sx0:
        out[:, sy0:sy1, sx0:sx1] = up[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    return out


def seg_probs_on_input_grid(logits: np.ndarray, brain_small: np.ndarray) -> torch.Tensor:
    """(N, G, G) segmentation logits on a stem network's U-Net grid -> (N, S, S) float32
    probabilities on the input grid, zero outside its intracranial mask ``brain_small`` (N, S, S).

    The logits are up-sampled, then squashed: exactly what the network's own full-grid output gives,
    computed only for the slices that need it (masks, Grad-CAM fallbacks).
    """
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    if t.shape[-2:] != brain_small.shape[-2:]:
        t = F.interpolate(t[:, None], size=brain_small.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return torch.sigmoid(t) * torch.from_numpy(np.ascontiguousarray(brain_small))
