"""Scan geometry and small numerical helpers for the phantom.

Three coordinate systems are used:

* index space ``(k, i, j)``: slice, row, column of the output volume;
* patient space ``(x, y, z)`` in mm, DICOM LPS (x to the patient's left, y posterior, z superior);
* anatomical space ``(u, v, w)`` in mm: the head's own frame (u lateral, v posterior, w superior),
  rotated from patient space by the head's yaw and roll. ``w = 0`` lies near the floor of the
  posterior fossa, ``u = v = 0`` on the head's centre line.

Gantry tilt follows the GE/Siemens convention seen in real data: the image column direction is
``(0, cos t, -sin t)`` and the table moves along z, so slices are sheared, not rotated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F32 = np.float32


@dataclass
class Geometry:
    """Where every voxel lies, in patient and anatomical space."""

    n: int  # rows = columns
    nz: int
    pixel_spacing: float  # mm
    table_step: float  # mm between slice origins along z
    slice_thickness: float  # nominal reconstructed thickness (mm)
    tilt_deg: float
    yaw_deg: float
    roll_deg: float
    origin: tuple[float, float, float]  # IPP of slice 0 (x0, y0, z0)
    center: tuple[float, float, float]  # patient position of the anatomical origin

    @property
    def slice_spacing(self) -> float:
        """Distance between slices along the slice normal (mm)."""
        return self.table_step * math.cos(math.radians(self.tilt_deg))

    @property
    def row_dir(self) -> np.ndarray:
        return np.array([1.0, 0.0, 0.0])

    @property
    def col_dir(self) -> np.ndarray:
        t = math.radians(self.tilt_deg)
        return np.array([0.0, math.cos(t), -math.sin(t)])

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def coarsened(self, f: int) -> Geometry:
        """The same scan on an f-times coarser in-plane grid whose pixels tile this one's exactly."""
        if f == 1:
            return self
        ps = self.pixel_spacing
        shift = (f - 1) / 2 * ps
        t = math.radians(self.tilt_deg)
        origin = (self.origin[0] + shift, self.origin[1] + shift * math.cos(t), self.origin[2] - shift * math.sin(t))
        return Geometry(
            n=self.n // f, nz=self.nz, pixel_spacing=ps * f, table_step=self.table_step,
            slice_thickness=self.slice_thickness, tilt_deg=self.tilt_deg, yaw_deg=self.yaw_deg,
            roll_deg=self.roll_deg, origin=origin, center=self.center,
        )

    def positions(self) -> np.ndarray:
        """ImagePositionPatient of each slice, shape (nz, 3)."""
        x0, y0, z0 = self.origin
        ks = np.arange(self.nz, dtype=np.float64)
        return np.stack([np.full(self.nz, x0), np.full(self.nz, y0), z0 + ks * self.table_step], axis=1)

    def anatomical_coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """u, v, w for every voxel: u and v have shape (1, n, n), w (nz, n, n) (float32).

        Yaw rotates the head about z; roll (small) is applied as a shear of w along u.
        """
        x0, y0, z0 = self.origin
        ps = self.pixel_spacing
        t = math.radians(self.tilt_deg)
        a, r = math.radians(self.yaw_deg), math.radians(self.roll_deg)
        j = np.arange(self.n, dtype=np.float64)
        x = (x0 + j * ps - self.center[0])[None, None, :]
        y = (y0 + j * ps * math.cos(t) - self.center[1])[None, :, None]
        z_row = -(j * ps * math.sin(t))[None, :, None]
        zk = (z0 + np.arange(self.nz) * self.table_step - self.center[2])[:, None, None]
        u = (math.cos(a) * x + math.sin(a) * y).astype(F32)
        v = (-math.sin(a) * x + math.cos(a) * y).astype(F32)
        w = (zk + z_row - math.sin(r) * u).astype(F32)
        return u, v, w

    def anat_to_index(self, p: tuple[float, float, float]) -> tuple[float, float, float]:
        """(k, i, j) of an anatomical point (inverse of :meth:`anatomical_coords`)."""
        u, v, w = p
        a, r = math.radians(self.yaw_deg), math.radians(self.roll_deg)
        x = math.cos(a) * u - math.sin(a) * v
        y = math.sin(a) * u + math.cos(a) * v
        t = math.radians(self.tilt_deg)
        ps = self.pixel_spacing
        j = (x + self.center[0] - self.origin[0]) / ps
        i = (y + self.center[1] - self.origin[1]) / (ps * math.cos(t))
        z = w + math.sin(r) * u + i * ps * math.sin(t)
        k = (z + self.center[2] - self.origin[2]) / self.table_step
        return k, i, j

    def bbox(self, center: tuple[float, float, float], radii: tuple[float, float, float]) -> tuple[slice, ...] | None:
        """Conservative index box (slices) covering an anatomical box; None if outside the volume."""
        r_ij = math.hypot(radii[0], radii[1]) / self.pixel_spacing + 2
        k, i, j = self.anat_to_index(center)
        t = math.radians(self.tilt_deg)
        shear = r_ij * self.pixel_spacing * abs(math.sin(t)) + abs(math.sin(math.radians(self.roll_deg))) * r_ij * (
            self.pixel_spacing
        )
        r_k = (radii[2] + shear) / self.table_step + 1.5
        k0, k1 = max(0, math.floor(k - r_k)), min(self.nz, math.ceil(k + r_k) + 1)
        i0, i1 = max(0, math.floor(i - r_ij / math.cos(t))), min(self.n, math.ceil(i + r_ij / math.cos(t)) + 1)
        j0, j1 = max(0, math.floor(j - r_ij)), min(self.n, math.ceil(j + r_ij) + 1)
        if k0 >= k1 or i0 >= i1 or j0 >= j1:
            return None
        return slice(k0, k1), slice(i0, i1), slice(j0, j1)


def ramp(x: np.ndarray) -> np.ndarray:
    """Partial-volume fraction from a signed distance in units of the edge width (>0 inside)."""
    return np.clip(x + F32(0.5), F32(0), F32(1), dtype=F32)


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation matrix (n_out, n_in) mapping a coarse axis onto a fine one (same extent)."""
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = pos - i0
    m = np.zeros((n_out, n_in), dtype=F32)
    m[np.arange(n_out), i0] += 1 - f
    m[np.arange(n_out), i1] += f
    return m


def _upsample_axis(a: np.ndarray, f: int, axis: int) -> np.ndarray:
    """Linear interpolation by an integer factor along ``axis`` (pixel centres aligned, edges clamped)."""
    a = np.moveaxis(a, axis, -1)
    prev = np.concatenate([a[..., :1], a[..., :-1]], axis=-1)
    nxt = np.concatenate([a[..., 1:], a[..., -1:]], axis=-1)
    out = np.empty((*a.shape[:-1], a.shape[-1] * f), dtype=F32)
    for r in range(f):
        o = (r + 0.5) / f - 0.5
        other = prev if o < 0 else nxt
        out[..., r::f] = a * F32(1 - abs(o)) + other * F32(abs(o))
    return np.moveaxis(out, -1, axis)


def upsample(coarse: np.ndarray, n: int) -> np.ndarray:
    """Bilinear in-plane upsampling of (Z, m, m) to (Z, n, n) (same field of view, pixel centres aligned)."""
    m = coarse.shape[-1]
    if n == m:
        return coarse.astype(F32, copy=False)
    if n % m == 0:
        f = n // m
        return np.ascontiguousarray(_upsample_axis(_upsample_axis(coarse.astype(F32, copy=False), f, 2), f, 1))
    z = coarse.shape[0]
    a = interp_matrix(n, m)
    t = (np.ascontiguousarray(coarse, dtype=F32).reshape(z * m, m) @ a.T).reshape(z, m, n)
    t = (a @ t.transpose(1, 0, 2).reshape(m, z * n)).reshape(n, z, n)
    return np.ascontiguousarray(t.transpose(1, 0, 2))


def smooth_field(
    rng: np.random.Generator, nz: int, m: int, sigma_xy: float, sigma_z: float, n_out: int
) -> np.ndarray:
    """Band-limited Gaussian random field with unit SD: made on an (nz, m, m) grid, upsampled to n_out.

    ``sigma_xy`` is in coarse pixels, ``sigma_z`` in slices.
    """
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal((nz, m, m)).astype(F32), (sigma_z, sigma_xy, sigma_xy), mode="wrap")
    f /= f.std() + 1e-6
    return upsample(f, n_out) if n_out != m else f
