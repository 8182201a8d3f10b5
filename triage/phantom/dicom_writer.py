"""Write a synthetic study as DICOM CT series (plus optional extra series) with realistic headers.

Every identifier is clearly synthetic (``SYNTH^0001``, accession ``SYN0001``) and every UID is
derived from the study seed, so writing the same study twice gives byte-identical files.
Like scanners, every image carries ImagesInAcquisition (0020,1002), the number of images of its
series (one reconstruction of acquisition 1), which lets the node complete a series early.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from triage.phantom.generator import SyntheticStudy

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
    "rle": RLELossless,
}
SERIES_KINDS = ("head", "bone", "localizer", "chest", "contrast")
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1455.1"  # fixed, names this writer


def uid(seed: int, *parts: object) -> str:
    """Deterministic UID (2.25 form: a 128-bit integer) from the study seed and a role."""
    digest = hashlib.sha256("|".join(["triage-phantom", str(seed), *map(str, parts)]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@dataclass(frozen=True)
class Identity:
    """Patient/study identifiers of one synthetic study."""

    index: int  # 1-based position in the generated set
    seed: int

    @property
    def patient_name(self) -> str:
        return f"SYNTH^{self.index:04d}"

    @property
    def patient_id(self) -> str:
        return f"SYNTH{self.index:04d}"

    @property
    def accession(self) -> str:
        return f"SYN{self.index:04d}"

    @property
    def study_uid(self) -> str:
        return uid(self.seed, "study")

    @property
    def when(self) -> dt.datetime:
        base = dt.datetime(2026, 1, 1, 7, 0, 0)
        return base + dt.timedelta(days=self.seed % 300, minutes=(self.seed * 37) % 720)


def _base(ident: Identity, study: SyntheticStudy, series_uid: str, number: int, description: str) -> Dataset:
    ds = Dataset()
    when = ident.when
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = (when + dt.timedelta(minutes=2)).strftime("%H%M%S")
    ds.AccessionNumber = ident.accession
    ds.Modality = "CT"
    ds.Manufacturer = "TRIAGE PHANTOM"
    ds.ManufacturerModelName = "Synthetic head CT"
    ds.SoftwareVersions = f"triage.phantom v{study.meta.get('version', 1)}"
    ds.InstitutionName = "SYNTHETIC"
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = description
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = f"{40 + ident.seed % 50:03d}Y"
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ident.accession
    ds.SeriesNumber = number
    ds.FrameOfReferenceUID = uid(ident.seed, "frame", number)
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _finish(ds: Dataset, sop_uid: str, pixels: np.ndarray, syntax: str) -> Dataset:
    ds.SOPInstanceUID = sop_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "TRIAGE_PHANTOM"
    ds.file_meta = meta
    ds.Rows, ds.Columns = pixels.shape
    stored = np.clip(np.rint(pixels) + 1024, 0, 4095).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, stored, generate_instance_uid=False)
    return ds


def axial_series(
    study: SyntheticStudy, ident: Identity, out: Path, *, kind: str = "head", syntax: str = ExplicitVRLittleEndian
) -> list[Path]:
    """Write the axial stack as one file per slice (head, bone-kernel or contrast variant)."""
    geo = study.geometry
    number = {"head": 2, "bone": 3, "contrast": 5}[kind]
    hu = study.hu
    if kind == "bone":
        from scipy.ndimage import gaussian_filter

        # sharper kernel: unsharp masking raises edges and noise, as a bone algorithm does
        hu = hu + 1.5 * (hu - gaussian_filter(hu, (0, 1.2, 1.2)))
    elif kind == "contrast":
        hu = hu + (study.brain_mask & (hu > 20) & (hu < 60)) * 4.0  # mild parenchymal enhancement
    thickness = study.slice_thickness
    desc = {
        "head": f"HEAD {thickness:g}mm STD",
        "bone": f"HEAD {thickness:g}mm BONE",
        "contrast": f"HEAD {thickness:g}mm W CONTRAST",
    }[kind]
    series_uid = uid(ident.seed, "series", kind)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    positions = geo.positions()
    normal = geo.normal
    for k in range(hu.shape[0]):
        ds = _base(ident, study, series_uid, number, desc)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "HEAD"
        ds.ProtocolName = "ROUTINE HEAD"
        ds.ConvolutionKernel = {"head": "H30s", "bone": "H70h", "contrast": "H30s"}[kind]
        ds.InstanceNumber = k + 1
        ds.ImagesInAcquisition = hu.shape[0]  # this reconstruction's images, as scanners write it
        ds.ImagePositionPatient = [round(float(x), 4) for x in positions[k]]
        ds.ImageOrientationPatient = [round(float(x), 6) for x in (*geo.row_dir, *geo.col_dir)]
        ds.SliceLocation = round(float(positions[k] @ normal), 4)
        ds.PixelSpacing = [round(study.pixel_spacing[0], 6), round(study.pixel_spacing[1], 6)]
        ds.SliceThickness = round(thickness, 3)
        ds.SpacingBetweenSlices = round(study.slice_spacing, 4)
        ds.GantryDetectorTilt = round(geo.tilt_deg, 2)
        ds.WindowCenter, ds.WindowWidth = ("500", "2000") if kind == "bone" else ("40", "80")
        ds.WindowCenterWidthExplanation = "BONE" if kind == "bone" else "BRAIN"
        if kind == "contrast":
            ds.ContrastBolusAgent = "IOHEXOL 350"
            ds.StudyDescription = "CT HEAD W CONTRAST"
        ds = _finish(ds, uid(ident.seed, "sop", kind, k), hu[k], syntax)
        p = out / f"{kind}-{k + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def localizer(study: SyntheticStudy, ident: Identity, out: Path, syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    """A lateral scout: attenuation summed across the head, one 2-D image (ImageType LOCALIZER)."""
    mu = np.clip(study.hu + 1000.0, 0, None).sum(axis=2) * study.pixel_spacing[1] / 1000.0  # (Z, Y)
    img = np.flipud(mu)  # superior at the top
    z_mm = study.slice_spacing * img.shape[0]
    rows = max(16, int(round(z_mm / study.pixel_spacing[0] / 2)))
    from PIL import Image

    resized = np.asarray(Image.fromarray(img.astype(np.float32)).resize((img.shape[1] // 2, rows), Image.BILINEAR))
    scaled = (resized / max(float(resized.max()), 1e-6)) * 1500.0 - 1000.0
    series_uid = uid(ident.seed, "series", "localizer")
    ds = _base(ident, study, series_uid, 1, "TOPOGRAM LAT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.BodyPartExamined = "HEAD"
    ds.InstanceNumber = 1
    ds.ImagesInAcquisition = 1
    ps = study.pixel_spacing[0] * 2
    top = study.geometry.positions()[-1]
    ds.ImagePositionPatient = [0.0, round(float(study.geometry.origin[1]), 3), round(float(top[2]), 3)]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.PixelSpacing = [round(z_mm / rows, 5), round(ps, 5)]
    ds.SliceThickness = "1"
    ds.WindowCenter, ds.WindowWidth = "0", "1500"
    ds.ConvolutionKernel = "T20s"
    ds = _finish(ds, uid(ident.seed, "sop", "localizer"), scaled, syntax)
    out.mkdir(parents=True, exist_ok=True)
    p = out / "localizer-0001.dcm"
    ds.save_as(p, enforce_file_format=True)
    return [p]


def chest_series(ident: Identity, study: SyntheticStudy, out: Path, syntax: str = ExplicitVRLittleEndian,
                 slices: int = 20) -> list[Path]:
    """A non-head CT series (chest) in the same study: must not be selected for ICH inference."""
    rng = np.random.default_rng(ident.seed + 7)
    n = 512
    ps = 0.78
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) - n / 2 + 0.5
    x *= ps
    y *= ps
    body = (x / 170) ** 2 + (y / 120) ** 2 < 1
    lungs = ((np.abs(x) - 75) / 55) ** 2 + (y / 85) ** 2 < 1
    heart = ((x - 20) / 55) ** 2 + ((y + 15) / 50) ** 2 < 1
    spine = (x / 18) ** 2 + ((y - 85) / 18) ** 2 < 1
    base = np.full((n, n), -1000.0, np.float32)
    base[body] = 40.0
    base[lungs] = -850.0
    base[heart] = 45.0
    base[spine] = 700.0
    series_uid = uid(ident.seed, "series", "chest")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(slices):
        img = base + rng.normal(0, 12, base.shape).astype(np.float32)
        ds = _base(ident, study, series_uid, 6, "CHEST 5mm")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"
        ds.ProtocolName = "CHEST"
        ds.ConvolutionKernel = "B30f"
        ds.InstanceNumber = k + 1
        ds.ImagesInAcquisition = slices
        ds.ImagePositionPatient = [-n / 2 * ps, -n / 2 * ps, -400.0 + 5.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = -400.0 + 5.0 * k
        ds.PixelSpacing = [ps, ps]
        ds.SliceThickness = "5"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds = _finish(ds, uid(ident.seed, "sop", "chest", k), img, syntax)
        p = out / f"chest-{k + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_study(
    study: SyntheticStudy, ident: Identity, out: Path, *, series: tuple[str, ...] = ("head",),
    syntax: str = ExplicitVRLittleEndian,
) -> dict[str, list[Path]]:
    """Write the requested series under ``out/<kind>/``; returns the files per series kind."""
    written: dict[str, list[Path]] = {}
    for kind in series:
        if kind not in SERIES_KINDS:
            raise ValueError(f"unknown series kind {kind!r} (known: {', '.join(SERIES_KINDS)})")
        d = out / kind
        if kind in ("head", "bone", "contrast"):
            written[kind] = axial_series(study, ident, d, kind=kind, syntax=syntax)
        elif kind == "localizer":
            written[kind] = localizer(study, ident, d, syntax)
        else:
            written[kind] = chest_series(ident, study, d, syntax)
    return written


def nifti_affine(study: SyntheticStudy) -> np.ndarray:
    """RAS affine for a NIfTI array laid out (column, row, slice) = ``hu.transpose(2, 1, 0)``."""
    geo = study.geometry
    a = np.eye(4)
    a[:3, 0] = geo.row_dir * study.pixel_spacing[1]
    a[:3, 1] = geo.col_dir * study.pixel_spacing[0]
    a[:3, 2] = np.array([0.0, 0.0, geo.table_step])
    a[:3, 3] = geo.positions()[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a

