"""Normal head anatomy in Hounsfield units.

The intracranial space is an egg-shaped ellipsoid (the vault) cut from below by a height map of the
skull base (anterior, middle and posterior fossae, petrous ridges, clivus, foramen magnum). Every
tissue boundary is a partial-volume blend, so thick slices through the vertex or the skull base show
the gradual, blood-like intermediate densities that real scanners produce.

Brain contents: white matter with texture, a cortical grey-matter ribbon that follows sulci made from
level sets of a random field, deep grey nuclei, lateral/third/fourth ventricles, basal cisterns,
Sylvian and interhemispheric fissures, the falx and tentorium, brainstem and cerebellum with folia.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from triage.phantom.canvas import Canvas, capsule, capsule_box, ellipsoid, paint
from triage.phantom.geometry import F32, ramp, smooth_field

CSF, WM, GM = 7.0, 27.5, 37.5


@dataclass
class HeadParams:
    """Random but plausible head dimensions (mm) and tissue values."""

    a: float  # intracranial half-width
    b: float  # intracranial half-length
    c_up: float  # vault half-height above the equator
    c_low: float
    zc: float  # equator height above the posterior fossa floor
    skull: float  # vault thickness
    scalp: float
    csf_w: float  # subarachnoid space over the convexity
    sulcus_halfwidth: float
    sulcal_depth: float
    ventricle_scale: float
    third_ventricle_halfwidth: float
    wm: float
    gm: float
    csf: float
    diploe: float  # fraction of diploë (0 = solid cortical bone)
    falx_hu: float
    atrophy: float  # 0 young .. 1 old: sets the CSF spaces' widths

    @classmethod
    def sample(cls, rng: np.random.Generator, min_atrophy: float = 0.0) -> HeadParams:
        """Draw a head; ``min_atrophy`` > 0 rescales the atrophy draw into [min_atrophy, 1] (older
        brains: wider sulci reaching the surface, larger ventricles) without changing the random stream."""
        atrophy = float(rng.beta(1.6, 3.0))  # 0 young .. 1 old
        atrophy = min_atrophy + (1.0 - min_atrophy) * atrophy
        return cls(
            a=float(rng.uniform(63, 70)),
            b=float(rng.uniform(80, 87)),
            c_up=float(rng.uniform(62, 70)),
            c_low=float(rng.uniform(52, 60)),
            zc=float(rng.uniform(40, 47)),
            skull=float(rng.uniform(5.0, 7.5)),
            scalp=float(rng.uniform(4.0, 7.0)),
            csf_w=0.3 + 3.2 * atrophy,  # mean width; thin to absent in the young (gyri meet the table)
            sulcus_halfwidth=0.6 + 1.8 * atrophy,
            sulcal_depth=float(rng.uniform(13, 19)),
            ventricle_scale=float(0.75 + 1.1 * atrophy * rng.uniform(0.6, 1.4)),
            third_ventricle_halfwidth=1.0 + 3.0 * atrophy,
            wm=float(rng.uniform(25.5, 29.5)),
            gm=float(rng.uniform(35.5, 39.5)),
            csf=float(rng.uniform(4.0, 10.0)),
            diploe=float(rng.uniform(0.3, 0.85)),
            falx_hu=float(rng.uniform(40, 60)),
            atrophy=atrophy,
        )


@dataclass
class Head:
    """A sampled head on a canvas: fields needed by the hemorrhage painter and the composer."""

    cv: Canvas
    p: HeadParams
    depth: np.ndarray  # mm from the inner table (>0 inside the skull)
    edge: np.ndarray  # partial-volume edge width of ``depth`` (mm)
    f_ic: np.ndarray  # intracranial fraction
    floor: np.ndarray  # (1, n, n) skull-base height map (w, mm)
    brain: np.ndarray  # HU of the intracranial contents (no bone)
    ventricles: np.ndarray  # fraction
    csf_spaces: np.ndarray  # sulci, cisterns, fissures (fraction)
    cerebellum: np.ndarray  # fraction
    sulci_field: np.ndarray  # the random field whose level sets are sulci
    petrous: np.ndarray | None = None  # (1, n, n) closeness to the petrous ridges (1 on the ridge)
    landmarks: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    vessels: list[tuple[tuple[float, float, float], float]] = field(default_factory=list)


def _segment_distance(u: np.ndarray, v: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    au, av = p0
    bu, bv = p1
    du, dv = bu - au, bv - av
    L2 = du * du + dv * dv
    t = np.clip(((u - au) * du + (v - av) * dv) / L2, 0, 1)
    return np.sqrt((u - au - t * du) ** 2 + (v - av - t * dv) ** 2)


def skull_base(u: np.ndarray, v: np.ndarray, p: HeadParams, ps: float) -> tuple[np.ndarray, dict]:
    """Height (w, mm) of the floor of the intracranial space at each (u, v): fossae, ridges, clivus."""
    a, b = p.a, p.b
    au = np.abs(u)
    # signed position relative to the petrous ridge line (posterior > 0)
    ridge_lat, ridge_med = (0.82 * a, 0.10 * b), (0.16 * a, -0.16 * b)
    nu, nv = ridge_med[1] - ridge_lat[1], -(ridge_med[0] - ridge_lat[0])
    norm = math.hypot(nu, nv)
    side = ((au - ridge_lat[0]) * nu + (v - ridge_lat[1]) * nv) / norm
    side = -side if ((0 - ridge_lat[0]) * nu + (b - ridge_lat[1]) * nv) < 0 else side
    h_pf = 1.0 + 20.0 * ((u / (0.8 * a)) ** 2 + ((v - 0.42 * b) / (0.62 * b)) ** 2)
    h_mf = 11.0 + 16.0 * (((au - 0.55 * a) / (0.38 * a)) ** 2 + ((v + 0.05 * b) / (0.34 * b)) ** 2)
    h_af = 36.0 + 6.0 * (au / (0.6 * a)) ** 2 - 5.0 * np.exp(-((u / 6.0) ** 2))
    w_pf = 1 / (1 + np.exp(-side / 3.0))
    w_af = 1 / (1 + np.exp((v + 0.36 * b) / 3.0))
    h = w_pf * h_pf + (1 - w_pf) * (w_af * h_af + (1 - w_af) * h_mf)
    # petrous ridges (dense, high) and the sella / clivus in the midline
    d_ridge = _segment_distance(au, v, ridge_lat, ridge_med)
    h = np.maximum(h, 27.0 * np.exp(-((d_ridge / 7.0) ** 2)) + 4.0)
    clivus_v0, clivus_v1 = -0.14 * b, 0.20 * b
    t = np.clip((v - clivus_v0) / (clivus_v1 - clivus_v0), 0, 1)
    clivus_h = (30.0 - 30.0 * t) * np.exp(-((u / 11.0) ** 2)) * (v > clivus_v0 - 8)
    h = np.maximum(h, clivus_h)
    h = gaussian_filter(h.astype(F32)[0], 3.0 / ps)[None]
    # foramen magnum: a hole behind the clivus
    fm = (0.0, 0.30 * b)
    r_fm = np.sqrt((u - fm[0]) ** 2 + ((v - fm[1]) / 1.2) ** 2)
    h = np.where(r_fm < 15.0, h - 80.0 * np.clip((15.0 - r_fm) / 3.0, 0, 1), h)
    marks = {"foramen_magnum": (0.0, 0.30 * b, 0.0), "ridge_lat": ridge_lat, "ridge_med": ridge_med}
    return h.astype(F32), {"petrous_side": side.astype(F32), "petrous_distance": d_ridge.astype(F32), **marks}


def build_head(cv: Canvas, p: HeadParams, rng: np.random.Generator) -> Head:
    """Sample anatomy on the canvas and return the intracranial field (bone is added by :func:`compose`)."""
    g = cv.geo
    u, v, w = cv.u, cv.v, cv.w
    ps, th = g.pixel_spacing, g.slice_thickness
    a, b = p.a, p.b
    # --- vault: egg-shaped ellipsoid, wider behind, flatter in front
    a_eff = a * (1 + 0.07 * v / b)
    rxy2 = (u / a_eff) ** 2 + (v / b) ** 2
    wn = (w - p.zc) / np.where(w > p.zc, F32(p.c_up), F32(p.c_low))
    r = np.sqrt(rxy2 + wn * wn)
    scale = F32(0.5 * (a + b))
    d_vault = (1 - r) * scale
    dz = np.abs(wn) / (np.where(w > p.zc, F32(p.c_up), F32(p.c_low)) * np.maximum(r, F32(0.2))) * scale
    e_vault = np.sqrt(F32(ps * ps) + (F32(th) * dz) ** 2)
    floor, base = skull_base(u, v, p, ps)
    d_floor = w - floor
    e_floor = F32(math.hypot(ps, th * 0.9))
    use_floor = d_floor < d_vault
    depth = np.where(use_floor, d_floor, d_vault)
    edge = np.where(use_floor, e_floor, e_vault)
    f_ic = ramp(depth / edge)

    # --- white matter with texture, cortex, sulci
    nz, n = cv.shape[0], cv.shape[1]
    m = max(32, int(n * ps / 1.8))
    cps = ps * n / m  # coarse pixel size
    tex = smooth_field(rng, nz, m, 2.5 / cps, 1.0, n) * F32(1.3) + smooth_field(rng, nz, m, 0.8, 0.5, n) * F32(0.8)
    sigma_mm = 3.4
    fld = smooth_field(rng, nz, m, sigma_mm / cps, max(0.6, sigma_mm / g.slice_spacing), n)
    dfld = F32(ps / sigma_mm * 1.2)
    absf = np.abs(fld)
    # the CSF layer over the convexity is patchy: its width wanders 5-200 % of the mean over ~12 mm
    patch = smooth_field(rng, nz, m, 12.0 / cps, max(1.0, 12.0 / g.slice_spacing), n)
    csf_loc = F32(p.csf_w) * np.clip(F32(1) + F32(0.7) * patch, F32(0.05), F32(2.0))
    del patch
    dd = depth - csf_loc
    tau = np.clip(1 - dd / F32(p.sulcal_depth), 0, 1)
    thr = F32(p.sulcus_halfwidth / sigma_mm)
    sulc = ramp((thr * tau - absf) / dfld) * (tau > 0)
    tau_g = np.clip(1 - dd / F32(p.sulcal_depth + 3.0), 0, 1)
    gm_sulcal = ramp((F32(thr + 2.6 / sigma_mm) * np.sqrt(tau_g) - absf) / dfld) * (tau_g > 0)
    gm_occ = np.maximum(gm_sulcal, ramp((2.8 - dd) / ps))
    brain = F32(p.wm) + tex
    brain += gm_occ * F32(p.gm - p.wm)
    csf_spaces = np.maximum(sulc, ramp((csf_loc - depth) / edge))
    del absf, tau, tau_g, gm_occ, sulc, dd, csf_loc

    # --- cerebellum below the tentorium, behind the petrous ridges; folia from a finer field
    side = base["petrous_side"]
    tent = 28.0 + 18.0 * np.exp(-((u / (0.4 * a)) ** 2)) * np.clip((v + 0.05 * b) / (0.35 * b), 0, 1)
    cb_occ = ramp((tent - w) / F32(math.hypot(ps, th))) * (1 / (1 + np.exp(-(side - 2.0) / 2.0))).astype(F32)
    cb_occ *= ramp((v - 0.05 * b) / ps).astype(F32)
    folia = smooth_field(rng, nz, m, 1.3 / cps, 0.6, n)
    cb_hu = F32(0.5 * (p.gm + p.wm) + 2.0) + F32(2.0) * np.cos(folia * F32(2.4))
    cb_csf = ramp((F32(0.10) - np.abs(folia)) / F32(0.12)) * ramp((F32(8.0) - depth) / F32(3.0))
    cb_hu += cb_csf * (F32(p.csf) - cb_hu)
    brain += cb_occ * (cb_hu - brain)
    csf_spaces = np.maximum(csf_spaces, cb_occ * cb_csf)
    del folia, cb_hu, cb_csf
    # tentorium: a thin dense sheet on top of the cerebellum
    tent_occ = ramp((F32(0.8) - np.abs(tent - w)) / F32(math.hypot(ps, th * 0.5))) * ramp((side - 1.0) / 2.0)
    tent_occ *= ramp((np.abs(u) - 6.0) / 2.0)  # open incisura around the midbrain
    brain += tent_occ * F32(0.6) * (F32(p.falx_hu) - brain)

    head = Head(
        cv=cv, p=p, depth=depth, edge=edge, f_ic=f_ic, floor=floor, brain=brain,
        ventricles=np.zeros(cv.shape, F32), csf_spaces=csf_spaces, cerebellum=cb_occ, sulci_field=fld,
    )
    head.petrous = np.exp(-((base["petrous_distance"] / F32(8.0)) ** 2)).astype(F32)
    _deep_structures(head, rng)
    return head


def _deep_structures(h: Head, rng: np.random.Generator) -> None:
    """Fissures, falx, basal cisterns, brainstem, deep grey nuclei, ventricles (in painting order)."""
    cv, p = h.cv, h.p
    a, b, zc = p.a, p.b, p.zc
    sa, sb = a / 66.0, b / 84.0
    brain = h.brain

    def put(shape, center, radii, value, *, csf=False, vent=False, sub=1):
        got = cv.occupancy(shape, center, radii, sub=sub)
        if got is None:
            return
        sl, occ = got
        paint(brain, sl, occ, value)
        if csf:
            np.maximum(h.csf_spaces[sl], occ, out=h.csf_spaces[sl])
        else:
            h.csf_spaces[sl] *= 1 - occ
        if vent:
            np.maximum(h.ventricles[sl], occ, out=h.ventricles[sl])

    # interhemispheric fissure and falx: a midline sheet, deep in front and behind, stopping above the
    # corpus callosum in the middle
    falx_u0 = float(rng.normal(0, 0.8))
    u, v, w = cv.u, cv.v, cv.w
    bottom = zc + 20.0 - 38.0 * np.clip((np.abs(v + 5.0) - 30.0 * sb) / (18.0 * sb), 0, 1)
    fiss_w = 1.2 + 1.6 * p.atrophy
    du = np.abs(u - F32(falx_u0))
    below = ramp((w - bottom) / 3.0)
    fiss = ramp((F32(fiss_w) - du) / F32(cv.geo.pixel_spacing)) * below * (h.depth > 0)
    brain += fiss * (F32(p.csf) - brain)
    np.maximum(h.csf_spaces, fiss, out=h.csf_spaces)
    falx = ramp((F32(0.45) - du) / F32(cv.geo.pixel_spacing)) * below * (h.depth > 0.5)
    brain += falx * F32(0.75) * (F32(p.falx_hu) - brain)
    del du, below, fiss, falx
    h.landmarks["falx_u"] = (falx_u0, 0.0, 0.0)

    sv = p.ventricle_scale
    for s in (-1.0, 1.0):
        # Sylvian fissure: a sagittal cleft over the insula plus its stem to the lateral surface
        ins_u = s * 0.58 * a
        put(ellipsoid((ins_u, -0.08 * b, zc - 12), (1.2 + 0.8 * sv, 0.30 * b, 11)), (ins_u, -0.08 * b, zc - 12),
            (3, 0.3 * b, 11), p.csf, csf=True)
        p0, p1 = (s * 0.5 * a, -0.22 * b, zc - 16), (s * 0.97 * a, -0.26 * b, zc - 13)
        c, r = capsule_box(p0, p1, 2.5, (1, 1, 0.5))
        put(capsule(p0, p1, 1.2 + 0.6 * sv, 1.8 + 0.6 * sv, (1, 1, 0.5)), c, r, p.csf, csf=True)
        # insular cortex and deep grey nuclei (caudate head, lentiform nucleus, thalamus)
        put(ellipsoid((s * 0.52 * a, -0.06 * b, zc - 8), (2.5, 0.26 * b, 12)), (s * 0.52 * a, -0.06 * b, zc - 8),
            (3, 0.3 * b, 12), p.gm)
        put(ellipsoid((s * 23 * sa, -5 * sb, zc - 4), (5.5, 12.0, 8.0)), (s * 23 * sa, -5 * sb, zc - 4),
            (6, 12, 8), p.gm - 2.5)
        put(ellipsoid((s * (15 + 2 * sv) * sa, -17 * sb, zc + 4), (4.0, 8.0, 8.0)),
            (s * (15 + 2 * sv) * sa, -17 * sb, zc + 4), (4, 8, 8), p.gm - 1.0)
        put(ellipsoid((s * (9 + 1.5 * sv) * sa, 12 * sb, zc - 6), (7.0, 11.0, 8.0)),
            (s * (9 + 1.5 * sv) * sa, 12 * sb, zc - 6), (7, 11, 8), p.gm - 2.0)

    # basal cisterns around the brainstem; suprasellar, quadrigeminal, cisterna magna
    cis = 2.5 + 2.0 * p.atrophy
    mid_c, mid_r = (0.0, 6 * sb, zc - 22), (11.0, 10.0, 9.0)
    pons_c, pons_r = (0.0, 8 * sb, 15.0), (14.0, 11.0, 13.0)
    put(ellipsoid(mid_c, tuple(x + cis for x in mid_r)), mid_c, tuple(x + cis for x in mid_r), p.csf, csf=True)
    put(ellipsoid(pons_c, tuple(x + cis for x in pons_r)), pons_c, tuple(x + cis for x in pons_r), p.csf, csf=True)
    ss_c, ss_r = (0.0, -13 * sb, zc - 24), (12.0 + cis, 9.0 + cis, 4.0 + cis / 2)
    put(ellipsoid(ss_c, ss_r), ss_c, ss_r, p.csf, csf=True)
    q_c, q_r = (0.0, 24 * sb, zc - 17), (7.0 + cis, 4.0 + cis, 6.0)
    put(ellipsoid(q_c, q_r), q_c, q_r, p.csf, csf=True)
    cm_s = float(rng.uniform(4, 14))
    cm_c, cm_r = (0.0, 0.70 * b, 8.0), (cm_s, cm_s * 0.8, cm_s)
    put(ellipsoid(cm_c, cm_r), cm_c, cm_r, p.csf, csf=True)
    stem_hu = p.wm + 3.0
    put(ellipsoid(mid_c, mid_r), mid_c, mid_r, stem_hu)
    put(ellipsoid(pons_c, pons_r), pons_c, pons_r, stem_hu)
    med_c, med_r = (0.0, 0.26 * b, -2.0), (8.5, 8.0, 16.0)
    put(ellipsoid(med_c, med_r), med_c, med_r, stem_hu)
    h.landmarks.update(suprasellar=ss_c, quadrigeminal=q_c, midbrain=mid_c, pons=pons_c, cisterna_magna=cm_c)

    # ventricles: lateral (frontal horn, body, atrium, occipital and temporal horns), third, fourth
    for s in (-1.0, 1.0):
        path = [
            ((s * 6.5, -33, 4), 2.8),
            ((s * 7.5, -20, 9), 4.2),
            ((s * 9, -2, 14), 3.8),
            ((s * 13, 14, 12), 4.2),
            ((s * 21, 26, 4), 5.5),
            ((s * 18, 40, 4), 3.0),
            ((s * 14, 49, 6), 1.2),
        ]
        temporal = [((s * 23, 25, 2), 3.5), ((s * 28, 10, -14), 2.4), ((s * 27, -8, -19), 1.6)]
        for chain in (path, temporal):
            for (q0, r0), (q1, r1) in zip(chain[:-1], chain[1:], strict=True):
                p0 = (q0[0] * sa * (0.85 + 0.15 * sv), q0[1] * sb, zc + q0[2])
                p1 = (q1[0] * sa * (0.85 + 0.15 * sv), q1[1] * sb, zc + q1[2])
                sq = (1.0, 1.0, 0.55)
                c, r = capsule_box(p0, p1, max(r0, r1) * sv, sq)
                put(capsule(p0, p1, r0 * sv, r1 * sv, sq), c, r, p.csf, vent=True)
        h.landmarks[f"atrium_{'l' if s > 0 else 'r'}"] = (s * 22 * sa, 26 * sb, zc + 4)
        h.landmarks[f"occipital_horn_{'l' if s > 0 else 'r'}"] = (s * 18 * sa, 40 * sb, zc + 4)
    # septum pellucidum: the lateral ventricles never meet at the midline
    fu = F32(h.landmarks["falx_u"][0])
    septum = ramp((np.abs(cv.u - fu) - F32(0.8)) / F32(cv.geo.pixel_spacing))
    open_vent = h.ventricles * (1 - septum)  # ventricle fraction that is really septum
    brain += open_vent * (F32(p.wm + 2) - brain)
    h.ventricles -= open_vent
    t3 = p.third_ventricle_halfwidth
    put(ellipsoid((0.0, 4 * sb, zc - 10), (t3, 13.0, 10.0)), (0.0, 4 * sb, zc - 10), (t3, 13, 10), p.csf, vent=True)
    v4_c, v4_r = (0.0, 0.30 * b, 14.0), (5.0 + sv, 3.0, 6.0)
    put(ellipsoid(v4_c, v4_r), v4_c, v4_r, p.csf, vent=True)
    h.landmarks.update(third_ventricle=(0.0, 4 * sb, zc - 10), fourth_ventricle=v4_c, pineal=(0.0, 19 * sb, zc - 9))


def compose(h: Head, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add skull (tables and diploë), skull base bone with air cells, scalp and air around the brain."""
    cv, p = h.cv, h.p
    u, v, w = cv.u, cv.v, cv.w
    ps = cv.geo.pixel_spacing
    nz, n = cv.shape[0], cv.shape[1]
    # bone thickness: thinner over the temporal squama, thicker under the floor
    temporal = np.exp(-(((w - p.zc + 8) / 22.0) ** 2)) * np.clip((np.abs(u) / p.a - 0.6) / 0.3, 0, 1)
    tb = F32(p.skull) * (1 - F32(0.45) * temporal)
    vault_part = h.depth < (w - h.floor + 0.01)  # voxels whose nearest boundary is the vault
    # skull base: thin plates (orbital roofs, fossa floors), thick dense petrous bone
    pet = h.petrous if h.petrous is not None else F32(0)
    tb = np.where(vault_part, tb, F32(2.5) + F32(10.0) * pet)
    f_skull = ramp((h.depth + tb) / h.edge)
    # outer head surface: the vault ellipsoid grown by bone + scalp, continued downwards as face/neck
    a_eff = p.a * (1 + 0.07 * v / p.b)
    grow = p.skull + p.scalp
    r_out = np.sqrt((u / (a_eff + grow)) ** 2 + (v / (p.b + grow)) ** 2
                    + ((w - p.zc) / np.where(w > p.zc, F32(p.c_up + grow), F32(400.0))) ** 2)
    d_out = (1 - r_out) * F32(0.5 * (p.a + p.b) + grow)
    f_head = np.maximum(ramp(d_out / h.edge), f_skull)
    # bone: dense tables, diploë in the middle, porous texture; petrous bone denser with mastoid air
    m = max(32, int(n * ps / 1.8))
    pores = smooth_field(rng, nz, m, 0.9, 0.6, n)
    pos = np.clip(-h.depth / tb, 0, 1)
    dip = np.exp(-(((pos - 0.5) / 0.2) ** 2)) * F32(p.diploe)
    bone = F32(1750.0) - dip * (F32(950.0) + F32(250.0) * pores) * (1 - pet) + F32(350.0) * pet * (1 - dip)
    # extracranial deep tissue at the skull base (muscle), scalp fat under the skin, orbits
    soft = F32(38.0) + F32(3.0) * pores
    scalp_fat = ramp((F32(p.scalp * 0.3) - np.abs(d_out - F32(p.scalp * 0.45))) / F32(ps)) * F32(0.6)
    soft += scalp_fat * (F32(-90.0) - soft)
    soft = _orbits(h, soft)
    air_cells = _air_cells(h, rng, pores)
    hu = f_head * (soft + f_skull * (bone - soft)) + (1 - f_head) * F32(-1000.0)
    hu += h.f_ic * (brain - hu)
    hu += air_cells * (1 - h.f_ic) * (F32(-900.0) - hu)
    return hu


def _orbits(h: Head, soft: np.ndarray) -> np.ndarray:
    """Orbits in front of the anterior fossa: a fat cone with the globe (vitreous, lens) inside."""
    cv, p = h.cv, h.p
    from triage.phantom.canvas import ellipsoid as ell

    for s in (-1.0, 1.0):
        c_fat, r_fat = (s * 0.45 * p.a, -0.93 * p.b, 24.0), (17.0, 22.0, 15.0)
        got = cv.occupancy(ell(c_fat, r_fat), c_fat, r_fat)
        if got is not None:
            sl, occ = got
            paint(soft, sl, occ, -85.0)
        c_g, r_g = (s * 0.47 * p.a, -p.b - 2.0, 25.0), (11.5, 11.5, 11.5)
        got = cv.occupancy(ell(c_g, r_g), c_g, r_g)
        if got is not None:
            sl, occ = got
            paint(soft, sl, occ, 12.0)
        c_l, r_l = (s * 0.47 * p.a, -p.b - 12.0, 25.0), (4.0, 1.8, 4.0)
        got = cv.occupancy(ell(c_l, r_l), c_l, r_l)
        if got is not None:
            sl, occ = got
            paint(soft, sl, occ, 95.0)
    return soft


def _air_cells(h: Head, rng: np.random.Generator, pores: np.ndarray) -> np.ndarray:
    """Sphenoid sinus, mastoid air cells, nasopharynx, orbits' surroundings: air below the skull base."""
    cv, p = h.cv, h.p
    air = np.zeros(cv.shape, F32)
    b = p.b
    blobs = [((0.0, -0.30 * b, 18.0), (11.0, 10.0, 9.0), False)]  # sphenoid sinus
    for s in (-1.0, 1.0):
        blobs.append(((s * 0.80 * p.a, 0.16 * b, 10.0), (10.0, 12.0, 11.0), True))  # mastoid air cells
        blobs.append(((s * 0.22 * p.a, -0.97 * b, 26.0), (8.0, 6.0, 9.0), True))  # ethmoid cells
    blobs.append(((0.0, -0.08 * b, -8.0), (12.0, 8.0, 10.0), False))  # nasopharynx
    for c, r, cells in blobs:
        got = cv.occupancy(ellipsoid(c, r), c, r)
        if got is None:
            continue
        sl, occ = got
        if cells:  # honeycomb of small cells with bony septa
            occ = occ * ramp((pores[sl] - F32(0.2)) / F32(0.25))
        np.maximum(air[sl], occ, out=air[sl])
    return air
