"""Small synthetic CT series and predictions for tests and benchmarks of the result objects.

Not a phantom for the model: the headers are realistic (Patient, Study, Series, Frame of
Reference, Equipment, Image Plane and Pixel modules of a CT Image), the pixels a simple head.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from reports.dicom.uids import derive_uid
from triage.imaging.volume import Volume
from triage.labels import LABELS, SUBTYPES
from triage.models.types import BundleIdentity, Prediction

IDENTITY = BundleIdentity(name="ich-test-bundle", version="0.0.1", sha256="ab" * 32)


def make_series(
    n_slices: int = 12,
    size: int = 128,
    *,
    tilt_deg: float = 0.0,
    spacing: float = 5.0,
    pixel_spacing: float = 1.8,
    seed: str = "test",
    with_pixels: bool = True,
) -> tuple[list[Dataset], Volume]:
    """Headers (in slice order) and the matching :class:`Volume` of a synthetic head CT."""
    t = math.radians(tilt_deg)
    iop = [1.0, 0.0, 0.0, 0.0, round(math.cos(t), 7), round(-math.sin(t), 7)]
    study_uid = derive_uid("synthetic", seed, "study")
    series_uid = derive_uid("synthetic", seed, "series")
    for_uid = derive_uid("synthetic", seed, "for")
    yy, xx = np.ogrid[0:size, 0:size]
    c = (size - 1) / 2
    r = np.hypot((yy - c) / (0.42 * size), (xx - c) / (0.36 * size))
    head = np.full((size, size), -1000.0, dtype=np.float32)
    head[r < 1.0] = 1200.0  # skull
    head[r < 0.92] = 32.0  # brain
    head[(r < 0.25) & (np.abs(xx - c) > 3)] = 6.0  # ventricles
    hu = np.repeat(head[None], n_slices, axis=0)
    positions = []
    sources = []
    origin = np.array([-c * pixel_spacing, -c * pixel_spacing, 0.0])
    for k in range(n_slices):
        # Gantry tilt: slices advance along z (table) while the image plane is tilted.
        ipp = origin + np.array([0.0, 0.0, k * spacing / math.cos(t)])
        positions.append(ipp)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop = derive_uid("synthetic", seed, "sop", str(k))
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = "20260102"
        ds.SeriesDate = "20260102"
        ds.ContentDate = "20260102"
        ds.StudyTime = "031500"
        ds.SeriesTime = "031600"
        ds.ContentTime = "031600"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "SYNTH"
        ds.InstitutionName = "Test Hospital"
        ds.ReferringPhysicianName = "Ref^Doctor"
        ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
        ds.SeriesDescription = "HEAD 5mm"
        ds.ManufacturerModelName = "Synth CT"
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "PID0001"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "F"
        ds.PatientAge = "076Y"
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = f"{spacing:g}"
        ds.KVP = "120"
        ds.GantryDetectorTilt = f"{tilt_deg:g}"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.7f}" for v in iop]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{ipp[2]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.PixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        if with_pixels:
            ds.PixelData = (hu[k] + 1024).astype(np.int16).tobytes()
        sources.append(ds)
    # With a tilt the table step is spacing / cos(t), so the distance along the normal stays ``spacing``.
    normal_spacing = spacing
    vol = Volume(
        hu=hu,
        pixel_spacing=(pixel_spacing, pixel_spacing),
        slice_spacing=normal_spacing,
        positions=np.array(positions),
        orientation=tuple(iop),  # type: ignore[arg-type]
        sop_instance_uids=[str(s.SOPInstanceUID) for s in sources],
        slice_thickness=spacing,
        tilt_deg=tilt_deg,
        spacings=[normal_spacing] * (n_slices - 1),
    )
    return sources, vol


def make_prediction(
    volume: Volume, *, positive: bool = True, subtypes: tuple[str, ...] = ("intraparenchymal", "subdural")
) -> Prediction:
    """A hand-made prediction: blobs for ``subtypes`` when positive, nothing otherwise."""
    z, y, x = volume.shape
    zz, yy, xx = np.ogrid[0:z, 0:y, 0:x]
    masks: dict[str, np.ndarray] = {}
    heat: dict[str, np.ndarray] = {}
    if positive:
        for i, label in enumerate(subtypes):
            cz, cy, cx = z // 2, int(y * (0.38 + 0.2 * i)), int(x * (0.40 + 0.15 * i))
            m = ((zz - cz) / max(z / 6, 1)) ** 2 + ((yy - cy) / (y / 12)) ** 2 + ((xx - cx) / (x / 10)) ** 2 <= 1.0
            masks[label] = m
            d = np.sqrt(((zz - cz) / max(z / 4, 1)) ** 2 + ((yy - cy) / (y / 6)) ** 2 + ((xx - cx) / (x / 6)) ** 2)
            heat[label] = np.clip(1.0 - d, 0.0, 1.0).astype(np.float32)
    any_mask = np.zeros(volume.shape, dtype=bool)
    for m in masks.values():
        any_mask |= m
    if positive:
        heat["any"] = np.maximum.reduce([heat[s] for s in subtypes]) if subtypes else np.zeros(volume.shape, np.float32)
    vox = volume.voxel_volume_ml
    present = {lab: False for lab in LABELS}
    probs = {lab: 0.02 for lab in LABELS}
    for lab in subtypes if positive else ():
        present[lab] = True
        probs[lab] = 0.91
    present["any"] = positive
    probs["any"] = 0.97 if positive else 0.04
    volumes = {lab: float(masks[lab].sum() * vox) if lab in masks else 0.0 for lab in SUBTYPES}
    volumes["any"] = float(any_mask.sum() * vox)
    abc2 = {lab: round(v * 1.1, 3) for lab, v in volumes.items()}
    slice_probs = np.full((z, len(LABELS)), 0.02, dtype=np.float32)
    key: dict[str, list[int]] = {}
    for lab, m in masks.items():
        per_slice = m.reshape(z, -1).sum(1)
        slice_probs[:, LABELS.index(lab)] = np.where(per_slice > 0, 0.9, 0.02)
        key[lab] = [int(i) for i in np.argsort(-per_slice)[:3]]
    slice_probs[:, 0] = slice_probs[:, 1:].max(1)
    if positive:
        key["any"] = [int(i) for i in np.argsort(-any_mask.reshape(z, -1).sum(1))[:3]]
    else:
        slice_probs[z // 3, 0] = 0.2  # the "most suspicious" slice of a negative exam
    return Prediction(
        exam_probs=probs,
        thresholds={lab: 0.5 for lab in LABELS},
        present=present,
        slice_probs=slice_probs,
        masks=masks,
        volumes_ml=volumes,
        abc2_ml=abc2,
        heatmaps=heat,
        key_slices=key,
        brain_mask=volume.hu > 0,
        timings={},
        bundle=IDENTITY,
    )
