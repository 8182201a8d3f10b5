"""Acute hemorrhage of the five subtypes, painted into the intracranial field with partial volume.

Each painter returns a blood *fraction* per voxel (0..1) in a box; the generator keeps one fraction
volume per subtype. The ground-truth mask of a subtype is ``fraction * intracranial fraction >= 0.5``
and the image there is at least half blood, so every mask voxel really is blood-dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from triage.phantom.anatomy import Head
from triage.phantom.geometry import F32, ramp

SIZE_CLASSES = ("tiny", "small", "medium", "large")


@dataclass
class Lesion:
    subtype: str
    sl: tuple[slice, ...]
    frac: np.ndarray
    hu: float
    info: dict
    edema: np.ndarray | None = None  # HU decrement in the same box (IPH)


def _box(h: Head, center: tuple[float, float, float], radii: tuple[float, float, float]):
    m = h.cv.geo.slice_thickness + 2
    return h.cv.geo.bbox(center, (radii[0] + m, radii[1] + m, radii[2] + m))


def _surface_point(h: Head, rng: np.random.Generator, *, lateral_bias: float = 0.7) -> tuple[float, float, float]:
    """A point on the inner table of the vault (above the skull base)."""
    p = h.p
    az = float(rng.uniform(-math.pi, math.pi))
    if rng.random() < lateral_bias:  # most convexity bleeds are fronto-temporo-parietal
        az = float(rng.choice([-1, 1]) * rng.uniform(0.15 * math.pi, 0.85 * math.pi))
    el = float(rng.uniform(-0.15, 0.95))
    cu, su = math.cos(az), math.sin(az)
    v = p.b * math.cos(el) * -cu
    a_eff = p.a * (1 + 0.07 * v / p.b)
    u = a_eff * math.cos(el) * su
    w = p.zc + (p.c_up if el > 0 else p.c_low) * math.sin(el)
    return float(u), float(v), float(w)


def _side(h: Head, s: float, sl: tuple[slice, ...]) -> np.ndarray:
    """Fraction of each voxel on side ``s`` of the falx (bleeds outside the brain do not cross it)."""
    u = h.cv.u[:, sl[1], sl[2]]
    return ramp((F32(s) * (u - F32(h.landmarks["falx_u"][0])) - F32(0.5)) / F32(h.cv.geo.pixel_spacing))


def epidural(h: Head, rng: np.random.Generator, size: str) -> Lesion | None:
    """Biconvex lens against the inner table, limited in extent (sutures)."""
    T, rho = {"tiny": (3.5, 8.0), "small": (6.0, 18.0), "medium": (14.0, 30.0), "large": (28.0, 45.0)}[size]
    T *= float(rng.uniform(0.8, 1.2))
    rho *= float(rng.uniform(0.85, 1.15))
    c = _surface_point(h, rng)
    sl = _box(h, c, (rho, rho, rho))
    if sl is None:
        return None
    u, v, w = h.cv.local(sl)
    g2 = (u - F32(c[0])) ** 2 + (v - F32(c[1])) ** 2 + (w - F32(c[2])) ** 2
    thick = F32(T) * np.clip(1 - g2 / F32(rho * rho), 0, 1)
    depth, edge = h.depth[sl], h.edge[sl]
    frac = ramp((thick - depth) / edge) * (thick > 0)
    frac *= _side(h, math.copysign(1.0, c[0]), sl) if abs(c[0]) > 10 else 1
    return Lesion("epidural", sl, frac.astype(F32), float(rng.uniform(58, 85)),
                  {"center": c, "thickness_mm": T, "radius_mm": rho})


def subdural(h: Head, rng: np.random.Generator, size: str) -> Lesion | None:
    """Crescent along the convexity, or a layer along the falx."""
    T, rho = {"tiny": (3.2, 10.0), "small": (4.0, 40.0), "medium": (9.0, 65.0), "large": (18.0, 90.0)}[size]
    T *= float(rng.uniform(0.8, 1.2))
    if rng.random() < 0.2 and size in ("tiny", "small", "medium"):
        return _falx_subdural(h, rng, T, rho)
    c = _surface_point(h, rng, lateral_bias=0.9)
    s = math.copysign(1.0, c[0] - h.landmarks["falx_u"][0])
    sl = _box(h, c, (rho, rho, rho))
    if sl is None:
        return None
    u, v, w = h.cv.local(sl)
    g2 = (u - F32(c[0])) ** 2 + (v - F32(c[1])) ** 2 + (w - F32(c[2])) ** 2
    q = np.clip(1 - g2 / F32(rho * rho), 0, 1)
    thick = F32(T) * np.sqrt(q) * (F32(1) - F32(0.3) * (1 - q))
    depth, edge = h.depth[sl], h.edge[sl]
    frac = ramp((thick - depth) / edge) * (thick > 0) * _side(h, s, sl)
    return Lesion("subdural", sl, frac.astype(F32), float(rng.uniform(55, 82)),
                  {"center": c, "thickness_mm": T, "extent_mm": rho, "where": "convexity"})


def _falx_subdural(h: Head, rng: np.random.Generator, T: float, rho: float) -> Lesion | None:
    p = h.p
    s = float(rng.choice([-1.0, 1.0]))
    fu = h.landmarks["falx_u"][0]
    T = min(T, 5.0)
    c = (fu + s * (0.5 + T / 2), float(rng.uniform(-0.5, 0.5)) * p.b, p.zc + float(rng.uniform(25, 45)))
    rv, rw = rho * 0.8, rho * 0.5
    sl = _box(h, c, (T, rv, rw))
    if sl is None:
        return None
    u, v, w = h.cv.local(sl)
    q = np.clip(1 - ((v - F32(c[1])) / F32(rv)) ** 2 - ((w - F32(c[2])) / F32(rw)) ** 2, 0, 1)
    thick = F32(T) * np.sqrt(q)
    du = F32(s) * (u - F32(fu)) - F32(0.5)
    frac = ramp(du / F32(h.cv.geo.pixel_spacing)) * ramp((thick - du) / F32(h.cv.geo.pixel_spacing)) * (thick > 0)
    frac = frac * ramp(h.depth[sl] / h.edge[sl] - 0.5)
    return Lesion("subdural", sl, frac.astype(F32), float(rng.uniform(55, 80)),
                  {"center": c, "thickness_mm": T, "extent_mm": rho, "where": "falx"})


def intraparenchymal(h: Head, rng: np.random.Generator, size: str) -> Lesion | None:
    """Irregular clot in the deep grey nuclei or a lobe, with a low-density oedema rim."""
    p = h.p
    r = {"tiny": 2.8, "small": 6.0, "medium": 14.0, "large": 30.0}[size] * float(rng.uniform(0.85, 1.15))
    deep = rng.random() < 0.55 or size == "large"
    s = float(rng.choice([-1.0, 1.0]))
    if deep:
        c = (s * float(rng.uniform(12, 26)) * p.a / 66, float(rng.uniform(-12, 14)), p.zc + float(rng.uniform(-8, 6)))
    else:
        for _ in range(20):
            pt = _surface_point(h, rng)
            k = float(rng.uniform(0.55, 0.8))
            c = (pt[0] * k, pt[1] * k, p.zc + (pt[2] - p.zc) * k)
            if abs(c[0]) > 8:
                break
    radii = (r * float(rng.uniform(0.8, 1.2)), r * float(rng.uniform(0.9, 1.4)), r * float(rng.uniform(0.7, 1.1)))
    rim = float(rng.uniform(2.0, 6.0)) * (0.3 if size == "tiny" else 1.0)
    big = max(radii) * 1.35 + rim
    sl = _box(h, c, (big, big, big))
    if sl is None:
        return None
    u, v, w = h.cv.local(sl)
    du, dv, dw = (u - F32(c[0])) / F32(radii[0]), (v - F32(c[1])) / F32(radii[1]), (w - F32(c[2])) / F32(radii[2])
    q = np.sqrt(du * du + dv * dv + dw * dw) + F32(1e-6)
    lobes = np.zeros_like(q)
    for _ in range(4):  # irregular outline: random low-order angular harmonics
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        f = float(rng.uniform(1.5, 3.5))
        lobes += F32(rng.uniform(0.05, 0.14)) * np.sin(F32(f) * (du * d[0] + dv * d[1] + dw * d[2]) / q * 2
                                                      + F32(rng.uniform(0, 6.3)))
    sdf = (q - 1 - lobes) * F32(min(radii))
    th = h.cv.geo.slice_thickness
    edge = F32(math.hypot(h.cv.geo.pixel_spacing, th * 0.6))
    frac = ramp(-sdf / edge) * (1 - h.ventricles[sl])
    edema = F32(rng.uniform(7, 13)) * ramp((F32(rim) - sdf) / F32(rim * 0.7 + 0.5)) * (sdf > 0)
    edema *= 1 - h.csf_spaces[sl]
    return Lesion("intraparenchymal", sl, frac.astype(F32), float(rng.uniform(60, 85)),
                  {"center": c, "radii_mm": radii, "location": "deep" if deep else "lobar", "edema_mm": rim},
                  edema=edema.astype(F32))


def intraventricular(h: Head, rng: np.random.Generator, size: str) -> Lesion | None:
    """Dependent layering in the occipital horns, or a cast of a ventricle."""
    p = h.p
    mode = "layering" if size in ("tiny", "small") or rng.random() < 0.5 else "cast"
    if mode == "layering":
        sides = [float(rng.choice([-1.0, 1.0]))] if size == "tiny" or rng.random() < 0.5 else [-1.0, 1.0]
        frac_all = None
        for s in sides:
            c = h.landmarks["occipital_horn_" + ("l" if s > 0 else "r")]
            tip_v = c[1] + 11 * p.b / 84 + 1.5 * p.ventricle_scale  # posterior end of the horn
            c = (c[0], tip_v - 15, c[2])
            rad = (14.0, 24.0, 12.0)
            sl = _box(h, c, rad)
            if sl is None:
                continue
            u, v, w = h.cv.local(sl)
            # dependent = posterior (patient supine): blood fills the back of the horns up to a level
            fill = {"tiny": 5.0, "small": 8.0, "medium": 16.0, "large": 24.0}[size] * float(rng.uniform(0.8, 1.2))
            level = ramp((v - F32(tip_v - fill)) / F32(h.cv.geo.pixel_spacing))
            side = ramp(F32(s) * u / F32(2.0))
            frac = h.ventricles[sl] * level * side
            if frac_all is None:
                frac_all, sl_all = frac, sl
            else:  # the two horns' boxes differ: merge into one covering box
                sl_all, frac_all = _merge(h, (sl_all, frac_all), (sl, frac))
        if frac_all is None:
            return None
        return Lesion("intraventricular", sl_all, frac_all.astype(F32), float(rng.uniform(55, 80)),
                      {"mode": mode, "sides": sides})
    which = "lateral" if size == "large" or rng.random() < 0.7 else str(rng.choice(["third", "fourth"]))
    if which == "lateral":
        s = float(rng.choice([-1.0, 1.0]))
        c = (s * 16 * p.a / 66, 5.0, p.zc + 4)
        sl = _box(h, c, (20.0, 60.0, 30.0))
        if sl is None:
            return None
        u = h.cv.u[:, sl[1], sl[2]]
        frac = h.ventricles[sl] * ramp(F32(s) * u / F32(2.0)) * F32(1.0)
        frac *= ramp((h.cv.w[sl] - F32(p.zc - 12)) / F32(2.0))  # not the temporal horn
    else:
        c = h.landmarks["third_ventricle" if which == "third" else "fourth_ventricle"]
        sl = _box(h, c, (8.0, 16.0, 12.0))
        if sl is None:
            return None
        u, v, w = h.cv.local(sl)
        near = ((v - F32(c[1])) / F32(16)) ** 2 + ((w - F32(c[2])) / F32(12)) ** 2 + ((u - F32(c[0])) / F32(8)) ** 2
        frac = h.ventricles[sl] * (near < 1)
    return Lesion("intraventricular", sl, frac.astype(F32), float(rng.uniform(58, 82)), {"mode": mode, "which": which})


def _merge(h: Head, a: tuple, b: tuple) -> tuple[tuple[slice, ...], np.ndarray]:
    (sa, fa), (sb, fb) = a, b
    sl = tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(sa, sb, strict=True))
    out = np.zeros(tuple(s.stop - s.start for s in sl), F32)
    for s_, f_ in ((sa, fa), (sb, fb)):
        sub = tuple(slice(x.start - o.start, x.stop - o.start) for x, o in zip(s_, sl, strict=True))
        np.maximum(out[sub], f_, out=out[sub])
    return sl, out


def subarachnoid(h: Head, rng: np.random.Generator, size: str) -> Lesion | None:
    """Blood in the sulci of a convexity region, or in the basal cisterns and Sylvian fissures."""
    p = h.p
    basal = size in ("medium", "large") and rng.random() < 0.6
    if basal:
        c = h.landmarks["suprasellar"]
        rho = {"medium": 22.0, "large": 38.0}[size] * float(rng.uniform(0.85, 1.15))
        c = (c[0], c[1] + 6, c[2] + 2)
    else:
        rho = {"tiny": 6.0, "small": 12.0, "medium": 25.0, "large": 45.0}[size] * float(rng.uniform(0.85, 1.15))
        pt = _surface_point(h, rng)
        k = 1 - 6.0 / (0.5 * (p.a + p.b))
        c = (pt[0] * k, pt[1] * k, p.zc + (pt[2] - p.zc) * k)
    sl = _box(h, c, (rho, rho, rho))
    if sl is None:
        return None
    u, v, w = h.cv.local(sl)
    g = np.sqrt((u - F32(c[0])) ** 2 + (v - F32(c[1])) ** 2 + (w - F32(c[2])) ** 2)
    region = ramp((F32(rho) - g) / F32(3.0))
    frac = h.csf_spaces[sl] * region * (1 - h.ventricles[sl])
    if not basal:
        frac *= ramp((F32(22.0) - h.depth[sl]) / F32(3.0))
    return Lesion("subarachnoid", sl, frac.astype(F32), float(rng.uniform(55, 78)),
                  {"center": c, "extent_mm": rho, "where": "basal" if basal else "convexity"})


PAINTERS = {
    "epidural": epidural,
    "subdural": subdural,
    "intraparenchymal": intraparenchymal,
    "intraventricular": intraventricular,
    "subarachnoid": subarachnoid,
}
