"""DICOM result objects: SEG, TID 1500 SR and Secondary Captures, with deterministic UIDs.

See docs/results-format.md for the layout of each object.
"""

from reports.dicom.keyimages import KeyImage, render_key_images
from reports.dicom.sc import build_sc
from reports.dicom.seg import build_seg
from reports.dicom.sr import build_sr

__all__ = ["KeyImage", "build_sc", "build_seg", "build_sr", "render_key_images"]
