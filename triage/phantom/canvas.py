"""Painting primitives (ellipsoids, capsules) with partial volume, evaluated only inside their box."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from triage.phantom.geometry import F32, Geometry, ramp

Sdf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Vec = tuple[float, float, float]


@dataclass
class Canvas:
    """The anatomical coordinates of every voxel plus helpers to evaluate shapes locally."""

    geo: Geometry
    u: np.ndarray  # (1, n, n)
    v: np.ndarray  # (1, n, n)
    w: np.ndarray  # (nz, n, n)
    _sub_cache: dict = field(default_factory=dict)

    @classmethod
    def from_geometry(cls, geo: Geometry) -> Canvas:
        u, v, w = geo.anatomical_coords()
        return cls(geo, u, v, w)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.w.shape  # type: ignore[return-value]

    def local(self, sl: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ks, is_, js = sl
        return self.u[:, is_, js], self.v[:, is_, js], self.w[ks, is_, js]

    def occupancy(self, sdf: Sdf, center: Vec, radii: Vec, sub: int = 1) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Fraction of each voxel inside ``sdf < 0`` (in-plane edge = pixel size; ``sub`` samples through
        the slice thickness give the slice partial-volume that makes small dense objects look faint)."""
        margin = max(self.geo.pixel_spacing, self.geo.slice_thickness)
        sl = self.geo.bbox(center, (radii[0] + margin, radii[1] + margin, radii[2] + margin))
        if sl is None:
            return None
        u, v, w = self.local(sl)
        ps = F32(self.geo.pixel_spacing)
        if sub <= 1:
            occ = ramp(-sdf(u, v, w) / ps)
        else:
            th = self.geo.slice_thickness
            offs = (np.arange(sub) + 0.5) / sub * th - th / 2
            occ = np.zeros(np.broadcast_shapes(u.shape, w.shape), dtype=F32)
            for d in offs:
                occ += ramp(-sdf(u, v, w + F32(d)) / ps)
            occ /= F32(sub)
        if not occ.any():
            return None
        return sl, occ


def ellipsoid(c: Vec, r: Vec) -> Sdf:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid."""
    cu, cv, cw = (F32(x) for x in c)
    ru, rv, rw = (F32(x) for x in r)
    rmin = F32(min(r))

    def f(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        q = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 + ((w - cw) / rw) ** 2)
        return (q - 1) * rmin

    return f


def capsule(p0: Vec, p1: Vec, r0: float, r1: float, squash: Vec = (1.0, 1.0, 1.0)) -> Sdf:
    """Signed distance to a tapered capsule from p0 (radius r0) to p1 (radius r1).

    ``squash`` scales the axes before measuring (e.g. (1, 1, 0.6) makes it taller than wide).
    """
    a = np.array(p0, dtype=np.float64)
    b = np.array(p1, dtype=np.float64)
    s = np.array(squash, dtype=np.float64)
    ab = (b - a) * s
    L2 = float(ab @ ab) or 1e-9

    def f(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        du, dv, dw = (u - F32(a[0])) * F32(s[0]), (v - F32(a[1])) * F32(s[1]), (w - F32(a[2])) * F32(s[2])
        t = np.clip((du * F32(ab[0]) + dv * F32(ab[1]) + dw * F32(ab[2])) / F32(L2), 0, 1)
        d = np.sqrt((du - t * F32(ab[0])) ** 2 + (dv - t * F32(ab[1])) ** 2 + (dw - t * F32(ab[2])) ** 2)
        return d - (F32(r0) + (F32(r1) - F32(r0)) * t)

    return f


def capsule_box(p0: Vec, p1: Vec, r: float, squash: Vec = (1.0, 1.0, 1.0)) -> tuple[Vec, Vec]:
    """Centre and half-size of a box holding a capsule."""
    c = tuple((x + y) / 2 for x, y in zip(p0, p1, strict=True))
    h = tuple(abs(x - y) / 2 + r / s for x, y, s in zip(p0, p1, squash, strict=True))
    return c, h  # type: ignore[return-value]


def paint(target: np.ndarray, sl: tuple[slice, ...], occ: np.ndarray, value: float | np.ndarray) -> None:
    """Blend ``value`` into ``target`` with fraction ``occ`` inside the box (in place)."""
    t = target[sl]
    v = value[sl] if isinstance(value, np.ndarray) and value.shape == target.shape else value
    t += occ * (v - t)


def maxinto(target: np.ndarray, sl: tuple[slice, ...], occ: np.ndarray) -> None:
    """target[sl] = max(target[sl], occ) (in place)."""
    np.maximum(target[sl], occ, out=target[sl])
