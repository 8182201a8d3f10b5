"""Secondary Capture (RGB, highdicom ``SCImage``) of the overlay key images.

One instance per key image in one series. Burned-in annotation YES (legend and "NOT FOR
DIAGNOSTIC USE" are in the pixels), BodyPartExamined and all Patient/Study IE attributes copied
from the source, Source Image Sequence pointing at the CT slice shown.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from reports.dicom.common import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    SERIES_NUMBER,
    check_sources,
    copy_patient_study,
    series_description,
    software_versions,
)
from reports.dicom.keyimages import KeyImage, render_key_images
from reports.dicom.uids import object_uid, source_key
from triage.imaging.volume import Volume
from triage.models.types import BundleIdentity, Prediction

_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x / +y, -y / +z, -z (LPS patient axes)


def orientation_letters(direction: Sequence[float]) -> str:
    """Patient Orientation letters of a direction cosine, main axis first (PS3.3 C.7.6.1.1.1)."""
    v = np.asarray(direction, dtype=float)
    order = np.argsort(-np.abs(v))
    out = "".join(_LETTERS[i][0 if v[i] > 0 else 1] for i in order if abs(v[i]) > 0.1)
    return out or "L"


def build_sc(
    sources: Sequence[Dataset],
    volume: Volume,
    prediction: Prediction,
    identity: BundleIdentity,
    key_images: Sequence[KeyImage] | None = None,
) -> list[Dataset]:
    """Secondary Capture instances of the overlay key images (rendered here unless given)."""
    check_sources(sources, volume.shape[0])
    images = list(key_images) if key_images is not None else render_key_images(volume, prediction)
    ref = sources[0]
    series_uid = str(ref.SeriesInstanceUID)
    input_key = source_key(sources)
    iop = [float(v) for v in ref.get("ImageOrientationPatient", volume.orientation)]
    # highdicom accepts single letters; the precise (possibly oblique, e.g. "PF") letters are set after.
    precise = [orientation_letters(iop[:3]), orientation_letters(iop[3:])]
    orient = (precise[0][0], precise[1][0])
    out: list[Dataset] = []
    for i, ki in enumerate(images, start=1):
        src = sources[ki.slice_index]
        sc = hd.sc.SCImage(
            pixel_array=np.ascontiguousarray(ki.overlay_rgb, dtype=np.uint8),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=str(ref.StudyInstanceUID),
            series_instance_uid=object_uid(series_uid, identity.sha256, "sc/series"),
            series_number=SERIES_NUMBER["sc"],
            sop_instance_uid=object_uid(input_key, identity.sha256, f"sc/instance/{i}"),
            instance_number=i,
            manufacturer=MANUFACTURER,
            patient_orientation=orient,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description("sc", prediction),
        )
        copy_patient_study(ref, sc)
        sc.PatientOrientation = precise
        if "BodyPartExamined" in ref:
            sc.BodyPartExamined = ref.BodyPartExamined
        sc.BurnedInAnnotation = "YES"
        sc.RecognizableVisualFeatures = "NO"
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.ManufacturerModelName = identity.name[:64]
        sc.SoftwareVersions = software_versions(identity)
        sc.ImageComments = f"{ki.caption} - {NOT_FOR_DIAGNOSIS}"[:10240]
        sc.DerivationDescription = f"Key image of slice {ki.slice_index + 1} by {identity}"[:1024]
        item = Dataset()
        item.ReferencedSOPClassUID = src.SOPClassUID
        item.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = [item]
        out.append(sc)
    return out
