"""The in-memory CT volume shared by the node, the models and the report writers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """A CT series as a stack of axial slices in Hounsfield units.

    Slices are ordered by position along the slice normal (ascending: caudal -> cranial
    for a standard axial head CT), never by instance number or file name.

    ``hu``: float32 array (Z, Y, X). ``pixel_spacing``: (row, column) mm.
    ``positions``: (Z, 3) ImagePositionPatient of each slice. ``orientation``: the six
    direction cosines (ImageOrientationPatient). ``slice_spacing``: the median distance
    between neighbouring slices along the normal (mm). ``sop_instance_uids``: the source
    instance of each slice, same order. ``tilt_deg``: gantry tilt (0 if none).
    """

    hu: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    positions: np.ndarray
    orientation: tuple[float, float, float, float, float, float] = (1, 0, 0, 0, 1, 0)
    sop_instance_uids: list[str] = field(default_factory=list)
    slice_thickness: float | None = None
    tilt_deg: float = 0.0
    spacings: list[float] = field(default_factory=list)  # gaps between neighbours (Z-1)
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (mm^3 / 1000), using the median slice spacing."""
        return float(self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing) / 1000.0
