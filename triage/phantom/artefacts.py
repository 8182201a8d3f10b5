"""Scanner effects: calcifications that mimic blood, beam-hardening streaks and cupping at the skull
base, head holder, and the reconstruction (kernel blur plus correlated, ramp-shaped quantum noise)."""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sfft

from triage.phantom.anatomy import Head
from triage.phantom.canvas import ellipsoid
from triage.phantom.geometry import F32, ramp


def calcifications(h: Head, brain: np.ndarray, rng: np.random.Generator, hard: bool) -> list[dict]:
    """Paint calcifications into the intracranial field (in place); return what was painted.

    Normal ones (pineal, choroid plexus) are common; ``hard`` adds dural/falx plaques, basal-ganglia
    and dystrophic specks, small enough that slice partial volume brings them to blood-like 50-100 HU.
    """
    p, lm = h.p, h.landmarks
    out: list[dict] = []

    def put(kind: str, c: tuple[float, float, float], r: tuple[float, float, float], hu: float) -> None:
        got = h.cv.occupancy(ellipsoid(c, r), c, r, sub=4)
        if got is None:
            return
        sl, occ = got
        occ = occ * h.f_ic[sl]
        t = brain[sl]
        t += occ * (F32(hu) - t)
        out.append({"kind": kind, "center": [round(x, 1) for x in c], "radius_mm": round(max(r), 2), "hu": round(hu)})

    if rng.random() < (0.9 if hard else 0.55):
        c = lm["pineal"]
        r = float(rng.uniform(1.2, 4.0))
        put("pineal", c, (r, r * 1.2, r), float(rng.uniform(120, 600)))
    if rng.random() < (0.9 if hard else 0.5):
        r = float(rng.uniform(1.5, 4.5))
        hu = float(rng.uniform(90, 350))
        for key in ("atrium_l", "atrium_r"):
            c = lm[key]
            put("choroid_plexus", (c[0], c[1] + 2, c[2]), (r, r * 1.4, r), hu * float(rng.uniform(0.8, 1.2)))
    if not hard:
        return out
    fu = lm["falx_u"][0]
    for _ in range(int(rng.integers(1, 4))):  # falx / dural plaques: mimic falcine SDH
        c = (fu, float(rng.uniform(-0.6, 0.6)) * p.b, p.zc + float(rng.uniform(15, 55)))
        put("falx", c, (0.8, float(rng.uniform(2, 9)), float(rng.uniform(1.5, 5))), float(rng.uniform(200, 900)))
    if rng.random() < 0.5:  # globus pallidus, bilateral and faint
        r = float(rng.uniform(1.5, 3.5))
        for s in (-1.0, 1.0):
            put("basal_ganglia", (s * 19 * p.a / 66, -3.0, p.zc - 4), (r, r * 1.5, r), float(rng.uniform(80, 180)))
    for _ in range(int(rng.integers(2, 7))):  # dystrophic specks (old infarct), tiny: partial-volumed
        az, el = float(rng.uniform(-math.pi, math.pi)), float(rng.uniform(0.0, 0.8))
        k = float(rng.uniform(0.5, 0.85))
        c = (p.a * k * math.cos(el) * math.sin(az), -p.b * k * math.cos(el) * math.cos(az),
             p.zc + p.c_up * k * math.sin(el))
        r = float(rng.uniform(0.5, 1.4))
        put("dystrophic", c, (r, r, r), float(rng.uniform(150, 500)))
    return out


def streaks(h: Head, hu: np.ndarray, rng: np.random.Generator, strength: float) -> dict:
    """Beam-hardening dark band between the petrous bones and fine bright/dark streaks from dense bone
    in skull-base slices (in place). ``strength`` 0..2."""
    cv, p = h.cv, h.p
    ps = cv.geo.pixel_spacing
    n = cv.shape[1]
    u, v = cv.u[0], cv.v[0]
    c = n // 2
    hits = 0
    angles = rng.uniform(0, math.pi, size=8)
    amps = rng.normal(0, 1, size=8)
    for k in range(cv.shape[0]):
        wk = float(cv.w[k, c, c])  # height of this slice at the head's centre
        if not -8.0 < wk < 34.0:
            continue
        dense = float(np.clip(min(wk + 8.0, 34.0 - wk) / 10.0, 0, 1))
        amp = F32(dense * strength)
        # Hounsfield bar: a dark band across the posterior fossa between the petrous apices
        vb = 0.12 * p.b + float(rng.normal(0, 3))
        band = np.exp(-(((v - F32(vb)) / F32(6.0)) ** 2)) * np.exp(-((u / F32(0.9 * p.a)) ** 4))
        hu[k] -= amp * F32(rng.uniform(15, 35)) * band
        for ang, a0 in zip(angles, amps, strict=True):  # thin streaks through the centre
            ang = ang + float(rng.normal(0, 0.05))
            d = u * F32(math.sin(ang)) - (v - F32(vb)) * F32(math.cos(ang))
            hu[k] += amp * F32(a0 * 7.0) * np.exp(-((d / F32(ps * 1.2)) ** 2))
        hits += 1
    return {"streak_slices": hits, "strength": round(strength, 2)}


def cupping_and_pseudo_enhancement(h: Head, hu: np.ndarray, rng: np.random.Generator, strength: float) -> dict:
    """Residual cupping (darker centre) and the bright rim of brain under the inner table (in place)."""
    p = h.p
    cup = F32(rng.uniform(1.0, 5.0) * strength)
    rr = (h.cv.u / F32(p.a)) ** 2 + (h.cv.v / F32(p.b)) ** 2
    hu += h.f_ic * cup * (rr - F32(0.5))
    rim = F32(rng.uniform(2.0, 7.0) * strength)
    hu += h.f_ic * rim * ramp((F32(4.0) - h.depth) / F32(3.0)) * (h.depth > 0)
    return {"cupping_hu": round(float(cup), 1), "rim_hu": round(float(rim), 1)}


def bone_glare(h: Head, hu: np.ndarray, rng: np.random.Generator, peak_hu: float) -> dict:
    """Glare under the inner table (in place): scatter and the long tail of a real scanner's
    point-spread function carry some of the skull's density a few millimetres into the brain.

    Measured on the real head CT in ``../shared/real-ct/`` (median HU by distance from the
    intracranial mask's edge, slices through the vault): about +25 HU over the phantom at 1 mm,
    +15 at 2 mm and +5 at 3.5 mm. That smooth band of 50-90 HU along the convexity is what a thin
    subdural collection looks like to a model that never saw it; the default phantom (Gaussian
    kernel, no scatter) has almost none. The band is ``a * exp(-depth / lam)`` with ``a`` drawn in
    [0.6, 1.2] x ``peak_hu`` and ``lam`` in [1.5, 2.5] mm, inside the skull only.
    """
    a = F32(peak_hu * rng.uniform(0.6, 1.2))
    lam = F32(rng.uniform(1.5, 2.5))
    hu += h.f_ic * a * np.exp(-np.maximum(h.depth, F32(0.0)) / lam)
    return {"glare_hu": round(float(a), 1), "glare_mm": round(float(lam), 2)}


def head_holder(h: Head, hu: np.ndarray, rng: np.random.Generator) -> None:
    """A carbon/plastic arc behind the occiput (in place; outside the head only)."""
    p = h.p
    gap = float(rng.uniform(2, 10))
    r0 = 0.5 * (p.a + p.b) + p.skull + p.scalp + gap
    rr = np.sqrt((h.cv.u * F32(1.05)) ** 2 + (h.cv.v * F32(0.95)) ** 2)
    arc = ramp((F32(2.0) - np.abs(rr - F32(r0 + 2))) / F32(h.cv.geo.pixel_spacing)) * (h.cv.v > 0.35 * p.b)
    mask = np.broadcast_to(arc, hu.shape) * (hu < -500)
    hu += mask * (F32(rng.uniform(80, 250)) - hu)


def kernel_mtf(n: int, ps: float) -> tuple[np.ndarray, np.ndarray]:
    """(MTF, radial frequency) on the rfft2 grid of an n x n slice with pixel size ``ps`` (mm)."""
    fy = sfft.fftfreq(n, d=ps)[:, None]
    fx = sfft.rfftfreq(n, d=ps)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f50 = 0.42  # lp/mm at 50% MTF (soft-tissue head kernel)
    return np.exp(-np.log(2) * (f / f50) ** 2).astype(F32), f.astype(F32)


def blur(vol: np.ndarray, ps: float) -> np.ndarray:
    """The reconstruction kernel's blur alone (used to measure bone spill into the ground truth)."""
    n = vol.shape[-1]
    mtf, _ = kernel_mtf(n, ps)
    return sfft.irfft2(sfft.rfft2(vol, axes=(1, 2), workers=1) * mtf, s=(n, n), axes=(1, 2), workers=1)


def reconstruct(hu: np.ndarray, ps: float, slice_thickness: float, rng: np.random.Generator, noise_sd: float) -> None:
    """Kernel blur (Gaussian MTF) plus noise whose power spectrum is ramp x MTF^2, as filtered
    back-projection with a standard head kernel gives (in place; one FFT pair per slice).

    The noise is drawn directly in frequency space; slices through the skull base get more of it
    (photon starvation behind dense bone)."""
    nz, n, _ = hu.shape
    mtf, f = kernel_mtf(n, ps)
    shaped = np.sqrt(f * mtf).astype(F32)
    # expected SD of irfft2(white complex spectrum * shaped): sqrt(sum |shaped|^2 over the full grid) / n^2
    full = np.concatenate([shaped, shaped[:, 1:(n + 1) // 2 if n % 2 else n // 2][:, ::-1]], axis=1)
    unit_sd = float(np.sqrt((full.astype(np.float64) ** 2).sum())) / (n * n)
    dense = np.clip((hu[:, n // 4: 3 * n // 4: 4, n // 4: 3 * n // 4: 4] > 600).mean(axis=(1, 2)) * 4, 0, 1)
    gain = (F32(noise_sd / unit_sd) * (1 + 0.6 * dense.astype(F32)))[:, None, None]
    spec = sfft.rfft2(hu, axes=(1, 2), workers=1)
    spec *= mtf
    for k in range(nz):  # slice by slice keeps the temporary arrays small
        re = rng.standard_normal(shaped.shape, dtype=F32)
        im = rng.standard_normal(shaped.shape, dtype=F32)
        spec[k] += (re + 1j * im) * (shaped * gain[k] * F32(np.sqrt(0.5)))
    hu[:] = sfft.irfft2(spec, s=(n, n), axes=(1, 2), workers=1)
