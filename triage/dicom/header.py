"""Header parsing for received instances: metadata without decoding pixels.

The receiver keeps the encoded bytes it was sent; it only reads the header (up to the pixel
data element) to fill the database rows and to check that the object is complete.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float, Double Float Pixel Data


class HeaderError(ValueError):
    """The dataset cannot be used; ``status`` is the C-STORE failure status to return."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# C-STORE failure statuses (0xC000 range: "cannot understand") used by the receiver.
STATUS_UNPARSEABLE = 0xC210
STATUS_TRUNCATED = 0xC211
STATUS_NO_PIXELS = 0xC212
STATUS_MISSING_UID = 0xC213


def is_image_class(sop_class_uid: str) -> bool:
    """True for storage classes whose instances must carry pixel data (images)."""
    uid = UID(sop_class_uid)
    name = uid.name.lower()
    return "image storage" in name and "presentation state" not in name


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class Header:
    """What the receiver records about one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    instance_number: int | None
    study: dict[str, str]  # Study row columns (PHI included: only for the database)
    series: dict[str, Any]  # Series row columns
    meta: dict[str, Any] = field(default_factory=dict)  # Instance.meta (no PHI)
    has_pixels: bool = False


def _geometry(ds: Dataset, meta: dict[str, Any]) -> None:
    """Plane geometry; Enhanced CT per-frame positions go to ``frame_ipps``."""
    meta["ipp"] = _floats(ds.get("ImagePositionPatient"))
    meta["iop"] = _floats(ds.get("ImageOrientationPatient"))
    meta["pixel_spacing"] = _floats(ds.get("PixelSpacing"))
    meta["thickness"] = _float(ds.get("SliceThickness"))
    meta["slope"] = _float(ds.get("RescaleSlope"))
    meta["intercept"] = _float(ds.get("RescaleIntercept"))
    frames = _int(ds.get("NumberOfFrames"))
    meta["frames"] = frames or 1
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return
    sh = shared[0] if shared else Dataset()

    def pick(item: Dataset, seq: str, attr: str) -> Any:
        for src in (item, sh):
            s = src.get(seq)
            if s and attr in s[0]:
                return s[0].get(attr)
        return None

    first = per_frame[0]
    meta["iop"] = meta["iop"] or _floats(pick(first, "PlaneOrientationSequence", "ImageOrientationPatient"))
    meta["pixel_spacing"] = meta["pixel_spacing"] or _floats(pick(first, "PixelMeasuresSequence", "PixelSpacing"))
    meta["thickness"] = meta["thickness"] or _float(pick(first, "PixelMeasuresSequence", "SliceThickness"))
    meta["frame_ipps"] = [
        _floats(pick(item, "PlanePositionSequence", "ImagePositionPatient")) for item in per_frame
    ]
    if meta["ipp"] is None and meta["frame_ipps"]:
        meta["ipp"] = meta["frame_ipps"][0]
    if meta["slope"] is None:
        meta["slope"] = _float(pick(first, "PixelValueTransformationSequence", "RescaleSlope"))
        meta["intercept"] = _float(pick(first, "PixelValueTransformationSequence", "RescaleIntercept"))
    ct_acq = pick(first, "CTAcquisitionDetailsSequence", "GantryDetectorTilt")
    if meta.get("gantry_tilt") is None:
        meta["gantry_tilt"] = _float(ct_acq)
    kernel = pick(first, "CTReconstructionSequence", "ConvolutionKernel")
    if not meta.get("kernel") and kernel:
        meta["kernel"] = "\\".join(kernel) if not isinstance(kernel, str) else kernel


def header_from_dataset(ds: Dataset, has_pixels: bool) -> Header:
    """Extract the recorded fields from a (header-only) dataset."""
    sop_class = _str(ds, "SOPClassUID")
    sop_uid = _str(ds, "SOPInstanceUID")
    study_uid = _str(ds, "StudyInstanceUID")
    series_uid = _str(ds, "SeriesInstanceUID")
    missing = [k for k, v in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_uid),
                              ("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)) if not v]
    if missing:
        raise HeaderError(f"dataset lacks {', '.join(missing)}", STATUS_MISSING_UID)
    for name, uid in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_uid), ("StudyInstanceUID", study_uid),
                      ("SeriesInstanceUID", series_uid)):
        if len(uid) > 64 or not _UID_RE.match(uid):
            raise HeaderError(f"{name} is not a valid UID (digits and dots, at most 64)", STATUS_MISSING_UID)
    modality = _str(ds, "Modality").upper()
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    meta: dict[str, Any] = {
        "modality": modality,
        "image_type": image_type,
        "kernel": _str(ds, "ConvolutionKernel"),
        "contrast": _str(ds, "ContrastBolusAgent"),
        "gantry_tilt": _float(ds.get("GantryDetectorTilt")),
        "spacing_between_slices": _float(ds.get("SpacingBetweenSlices")),
        "rows": _int(ds.get("Rows")),
        "cols": _int(ds.get("Columns")),
        "images_in_acquisition": _int(ds.get("ImagesInAcquisition")),
        "acquisition_number": _int(ds.get("AcquisitionNumber")),
        "photometric": _str(ds, "PhotometricInterpretation"),
        "bits_allocated": _int(ds.get("BitsAllocated")),
        "body_part": _str(ds, "BodyPartExamined").upper(),
        "series_description": _str(ds, "SeriesDescription"),
        "study_description": _str(ds, "StudyDescription"),
        "protocol": _str(ds, "ProtocolName"),
        "requested_procedure": _str(ds, "RequestedProcedureDescription"),
        "priority": " ".join(
            filter(None, (_str(ds, "RequestPriority"), _str(ds, "ReasonForTheRequestedProcedure"),
                          _str(ds, "ReasonForStudy")))
        ),
    }
    _geometry(ds, meta)
    study = {
        "study_uid": study_uid,
        "accession": _str(ds, "AccessionNumber")[:64],
        "patient_id": _str(ds, "PatientID")[:64],
        "patient_name": _str(ds, "PatientName")[:324],
        "patient_sex": _str(ds, "PatientSex")[:16],
        "patient_birth_date": _str(ds, "PatientBirthDate")[:8],
        "study_date": _str(ds, "StudyDate")[:8],
        "study_time": _str(ds, "StudyTime")[:16],
        "study_description": _str(ds, "StudyDescription")[:128],
        "referring_physician": _str(ds, "ReferringPhysicianName")[:324],
    }
    series = {
        "series_uid": series_uid,
        "modality": modality[:16],
        "series_number": _int(ds.get("SeriesNumber")),
        "description": _str(ds, "SeriesDescription")[:128],
        "body_part": meta["body_part"][:64],
    }
    return Header(sop_class, sop_uid, study_uid, series_uid, modality, _int(ds.get("InstanceNumber")),
                  study, series, meta, has_pixels)


def _check_pixel_element(buf: bytes, pos: int, implicit: bool, little: bool) -> int:
    """Check that the pixel data element starting at ``pos`` is complete; return its length."""
    end = "<" if little else ">"
    if implicit:
        if len(buf) < pos + 8:
            raise HeaderError("dataset truncated in the pixel data element", STATUS_TRUNCATED)
        (length,) = struct.unpack(end + "I", buf[pos + 4:pos + 8])
        start = pos + 8
    else:
        if len(buf) < pos + 12:
            raise HeaderError("dataset truncated in the pixel data element", STATUS_TRUNCATED)
        (length,) = struct.unpack(end + "I", buf[pos + 8:pos + 12])
        start = pos + 12
    if length == 0xFFFFFFFF:  # encapsulated: walk the items up to the sequence delimiter
        _check_fragments(buf, start)
    elif len(buf) < start + length:
        raise HeaderError(
            f"pixel data truncated: {len(buf) - start} of {length} bytes present", STATUS_TRUNCATED
        )
    elif length == 0:
        raise HeaderError("pixel data element is empty", STATUS_NO_PIXELS)
    return length


def _check_fragments(buf: bytes, pos: int) -> None:
    """Encapsulated pixel data: items (FFFE,E000) each complete, then the delimiter (FFFE,E0DD)."""
    while True:
        if len(buf) < pos + 8:
            raise HeaderError("encapsulated pixel data truncated (no sequence delimiter)", STATUS_TRUNCATED)
        group, elem, length = struct.unpack("<HHI", buf[pos:pos + 8])
        if (group, elem) == (0xFFFE, 0xE0DD):
            return
        if (group, elem) != (0xFFFE, 0xE000):
            raise HeaderError(f"malformed encapsulated pixel data: item tag ({group:04X},{elem:04X})",
                              STATUS_UNPARSEABLE)
        pos += 8 + length
        if pos > len(buf):
            raise HeaderError("encapsulated pixel data truncated inside a fragment", STATUS_TRUNCATED)


def _check_native_length(meta: dict[str, Any], ds: Dataset, length: int) -> None:
    """Uncompressed pixel data must hold rows × columns × samples × frames × bits (a sender that
    re-encoded a truncated file produces a well-formed but short element)."""
    rows, cols, bits = meta.get("rows"), meta.get("cols"), meta.get("bits_allocated")
    if not rows or not cols or not bits:
        return
    samples = _int(ds.get("SamplesPerPixel")) or 1
    pixels = rows * cols * samples * int(meta.get("frames") or 1)
    expected = (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)
    if length < expected:
        raise HeaderError(f"pixel data truncated: {length} of {expected} bytes", STATUS_TRUNCATED)


def parse_encoded(dataset_bytes: bytes, transfer_syntax: str) -> Header:
    """Parse the header of an encoded dataset (no file meta) and check its completeness.

    Reads up to the pixel data element only; verifies that element is present (for image
    storage classes) and not truncated. Raises :class:`HeaderError` with the status to return.
    """
    ts = UID(transfer_syntax)
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    buf = dataset_bytes
    if ts.is_deflated:
        try:
            buf = zlib.decompress(dataset_bytes, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise HeaderError(f"deflated dataset cannot be inflated: {exc}", STATUS_UNPARSEABLE) from exc
        implicit, little = False, True
    fp = BytesIO(buf)
    try:
        ds = read_dataset(fp, implicit, little, stop_when=_stop_at_pixels)
        pos = fp.tell()  # read_dataset leaves the stream at the pixel data tag (or the end)
        header = header_from_dataset(ds, has_pixels=False)
    except HeaderError:
        raise
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise HeaderError(f"dataset cannot be parsed: {exc}", STATUS_UNPARSEABLE) from exc
    if pos + 4 <= len(buf):
        group, elem = struct.unpack(("<" if little else ">") + "HH", buf[pos:pos + 4])
        if (group << 16 | elem) in PIXEL_TAGS:
            length = _check_pixel_element(buf, pos, implicit, little)
            header.has_pixels = True
            if not ts.is_compressed:
                _check_native_length(header.meta, ds, length)
    if is_image_class(header.sop_class_uid) and not header.has_pixels:
        raise HeaderError("image instance has no pixel data", STATUS_NO_PIXELS)
    return header


def _stop_at_pixels(tag: Any, vr: Any, length: Any) -> bool:
    return int(tag) in PIXEL_TAGS


def normal_of(iop: list[float]) -> np.ndarray:
    """Unit slice normal (row direction × column direction)."""
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:6], dtype=float)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise ValueError("ImageOrientationPatient is degenerate")
    return n / norm


def tilt_from_normal(normal: np.ndarray) -> float:
    """Angle (degrees) between the slice normal and the patient z axis (0 = true axial)."""
    return float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
