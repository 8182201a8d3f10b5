"""Header parsing for received instances: metadata without decoding pixels.

The receiver keeps the encoded bytes it was sent; it only reads the header (up to the pixel
data element) to fill the database rows and to check that the object is complete and that what
the node records and later processes is usable (:func:`check_values`, :func:`check_ct_image`).
Whatever fails a check is refused at receive with a 0xC2xx status (a permanent refusal: a sender
must not retry it), never acknowledged and analysed later, and never left to the database to
reject (which would answer 0x0110 on one back-end and accept on the other).
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Iterator
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

# PS3.5 9.1: components of digits, no leading zero unless the component is "0", at most 64 chars.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float, Double Float Pixel Data


class HeaderError(ValueError):
    """The dataset cannot be used; ``status`` is the C-STORE failure status to return."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# C-STORE failure statuses (0xCxxx: "cannot understand", a permanent refusal) used by the
# receiver. Each is documented in docs/pacs-setup.md; none invites a retry (0x0110 would).
STATUS_UNPARSEABLE = 0xC210  # the dataset cannot be parsed
STATUS_TRUNCATED = 0xC211  # pixel data shorter than its header says (or cut off)
STATUS_NO_PIXELS = 0xC212  # an image without (or with empty) pixel data
STATUS_MISSING_UID = 0xC213  # a study/series/SOP UID missing or not a valid UID
STATUS_NON_FINITE = 0xC214  # NaN or infinity in a number the node records
STATUS_INT_RANGE = 0xC215  # an integer the node records outside the 32-bit signed range
STATUS_CONTROL_CHAR = 0xC216  # NUL or another control character in a string the node records
STATUS_BAD_IMAGE_HEADER = 0xC217  # a CT image header that cannot describe a slice (Rows 0, BitsAllocated 17...)
STATUS_PIXEL_LENGTH = 0xC218  # native pixel data longer than Rows x Columns x frames x BitsAllocated
STATUS_PIXEL_ENCODING = 0xC219  # pixel data encoded other than its transfer syntax says

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# What a CT slice's pixels may be: BitsAllocated 8/16/32 (pydicom decodes these), one sample.
CT_BITS_ALLOCATED = frozenset({8, 16, 32})
# C0 control characters and DEL; ESC (0x1B) is allowed: ISO 2022 code extensions use it.
_CONTROL_RE = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
# The DICOM keyword behind each recorded field (refusal reasons name the attribute, never a value
# of a string field: those may be PHI).
_FIELD_KEYWORDS = {
    "ipp": "ImagePositionPatient", "iop": "ImageOrientationPatient", "pixel_spacing": "PixelSpacing",
    "thickness": "SliceThickness", "slope": "RescaleSlope", "intercept": "RescaleIntercept",
    "gantry_tilt": "GantryDetectorTilt", "spacing_between_slices": "SpacingBetweenSlices",
    "frame_ipps": "ImagePositionPatient (per frame)", "rows": "Rows", "cols": "Columns",
    "images_in_acquisition": "ImagesInAcquisition", "acquisition_number": "AcquisitionNumber",
    "frames": "NumberOfFrames", "bits_allocated": "BitsAllocated", "instance_number": "InstanceNumber",
    "series_number": "SeriesNumber", "modality": "Modality", "image_type": "ImageType",
    "kernel": "ConvolutionKernel", "contrast": "ContrastBolusAgent", "body_part": "BodyPartExamined",
    "series_description": "SeriesDescription", "study_description": "StudyDescription",
    "description": "SeriesDescription", "protocol": "ProtocolName",
    "requested_procedure": "RequestedProcedureDescription",
    "priority": "RequestPriority/ReasonForTheRequestedProcedure/ReasonForStudy",
    "photometric": "PhotometricInterpretation", "accession": "AccessionNumber", "patient_id": "PatientID",
    "patient_name": "PatientName", "patient_sex": "PatientSex", "patient_birth_date": "PatientBirthDate",
    "study_date": "StudyDate", "study_time": "StudyTime", "referring_physician": "ReferringPhysicianName",
}


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
            raise HeaderError(f"{name} is not a valid UID (at most 64 characters: numbers without leading zeros "
                              "separated by dots)", STATUS_MISSING_UID)
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


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def check_values(header: Header) -> None:
    """Refuse values the node would record but could not store alike on SQLite and PostgreSQL,
    or could not compute with: NaN/infinity (0xC214), integers outside the 32-bit signed range
    of the database columns and of DICOM IS (0xC215), control characters in strings (0xC216;
    PostgreSQL cannot store NUL at all). The reason names the attribute, never a string's value."""
    fields: list[tuple[str, Any]] = [("instance_number", header.instance_number), *header.series.items(),
                                     *header.meta.items(), *header.study.items()]
    for key, value in fields:
        name = _FIELD_KEYWORDS.get(key, key)
        for leaf in _leaves(value):
            if leaf is None or isinstance(leaf, bool):
                continue
            if isinstance(leaf, float):
                if not math.isfinite(leaf):
                    raise HeaderError(f"{name} is not a finite number ({leaf})", STATUS_NON_FINITE)
            elif isinstance(leaf, int):
                if not INT32_MIN <= leaf <= INT32_MAX:
                    raise HeaderError(f"{name} {leaf} does not fit a 32-bit signed integer", STATUS_INT_RANGE)
            elif isinstance(leaf, str):
                found = _CONTROL_RE.search(leaf)
                if found:
                    raise HeaderError(f"{name} contains the control character U+{ord(found.group()):04X}",
                                      STATUS_CONTROL_CHAR)


def check_ct_image(ds: Dataset, meta: dict[str, Any]) -> None:
    """A CT image's pixel description must describe a decodable slice (0xC217 otherwise)."""

    def required(keyword: str) -> int:
        value = _int(ds.get(keyword))
        if value is None:
            raise HeaderError(f"CT image without {keyword}", STATUS_BAD_IMAGE_HEADER)
        return value

    rows, cols = required("Rows"), required("Columns")
    if rows < 1 or cols < 1:
        raise HeaderError(f"Rows x Columns is {rows} x {cols}: no pixels", STATUS_BAD_IMAGE_HEADER)
    bits = required("BitsAllocated")
    if bits not in CT_BITS_ALLOCATED:
        raise HeaderError(f"BitsAllocated {bits} (a CT image has 8, 16 or 32)", STATUS_BAD_IMAGE_HEADER)
    stored = required("BitsStored")
    if not 1 <= stored <= bits:
        raise HeaderError(f"BitsStored {stored} with BitsAllocated {bits}", STATUS_BAD_IMAGE_HEADER)
    samples = required("SamplesPerPixel")
    if samples != 1:
        raise HeaderError(f"SamplesPerPixel {samples} (a CT image has one sample per pixel)", STATUS_BAD_IMAGE_HEADER)
    representation = required("PixelRepresentation")
    if representation not in (0, 1):
        raise HeaderError(f"PixelRepresentation {representation} (0 unsigned or 1 signed)", STATUS_BAD_IMAGE_HEADER)
    spacing = meta.get("pixel_spacing")
    if spacing is not None and (len(spacing) != 2 or any(v <= 0 for v in spacing)):
        raise HeaderError(f"PixelSpacing {spacing} (two positive distances in mm)", STATUS_BAD_IMAGE_HEADER)


UNDEFINED_LENGTH = 0xFFFFFFFF


def _pixel_element(buf: bytes, pos: int, implicit: bool, little: bool) -> tuple[int, int]:
    """Length and value offset of the pixel data element starting at ``pos``."""
    end = "<" if little else ">"
    size = 8 if implicit else 12
    if len(buf) < pos + size:
        raise HeaderError("dataset truncated in the pixel data element", STATUS_TRUNCATED)
    (length,) = struct.unpack(end + "I", buf[pos + size - 4:pos + size])
    return length, pos + size


def _check_fragments(buf: bytes, pos: int) -> tuple[int, int] | None:
    """Encapsulated pixel data: items (FFFE,E000) each complete, then the delimiter (FFFE,E0DD).

    Returns (offset, length) of the first fragment after the Basic Offset Table, None if none."""
    first: tuple[int, int] | None = None
    items = 0
    while True:
        if len(buf) < pos + 8:
            raise HeaderError("encapsulated pixel data truncated (no sequence delimiter)", STATUS_TRUNCATED)
        group, elem, length = struct.unpack("<HHI", buf[pos:pos + 8])
        if (group, elem) == (0xFFFE, 0xE0DD):
            return first
        if (group, elem) != (0xFFFE, 0xE000):
            raise HeaderError(f"malformed encapsulated pixel data: item tag ({group:04X},{elem:04X})",
                              STATUS_UNPARSEABLE)
        if items == 1:
            first = (pos + 8, length)
        items += 1
        pos += 8 + length
        if pos > len(buf):
            raise HeaderError("encapsulated pixel data truncated inside a fragment", STATUS_TRUNCATED)


_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                   "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_J2K = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                  "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})
_RLE = "1.2.840.10008.1.2.5"


def _check_codec_start(ts: UID, fragment: bytes) -> None:
    """The first fragment must begin as its codec's stream does (JPEG/JPEG-LS SOI, a JPEG 2000
    codestream or JP2 signature, an RLE header of 1-15 segments); otherwise the bytes are not
    what the transfer syntax says (e.g. native pixels labelled JPEG-LS) and cannot be decoded."""
    if ts in _JPEG:
        ok = fragment[:2] == b"\xff\xd8"
    elif ts in _J2K:
        ok = fragment[:4] == b"\xff\x4f\xff\x51" or fragment[:8] == b"\x00\x00\x00\x0cjP  "
    elif ts == _RLE:
        ok = len(fragment) >= 64 and 1 <= struct.unpack("<I", fragment[:4])[0] <= 15
    else:
        return
    if not ok:
        raise HeaderError(f"pixel data is not a {ts.name} stream (first fragment starts {fragment[:4].hex()})",
                          STATUS_PIXEL_ENCODING)


def _expected_native_length(meta: dict[str, Any], ds: Dataset) -> int | None:
    """Bytes of uncompressed pixel data the header describes (None when it does not say)."""
    rows, cols, bits = meta.get("rows"), meta.get("cols"), meta.get("bits_allocated")
    if not rows or not cols or not bits or rows < 0 or cols < 0 or bits < 0:
        return None
    samples = _int(ds.get("SamplesPerPixel")) or 1
    if meta.get("photometric") == "YBR_FULL_422":
        samples = 2  # chroma halved horizontally: two samples' worth per pixel
    pixels = rows * cols * max(samples, 1) * max(int(meta.get("frames") or 1), 1)
    return (pixels * bits + 7) // 8


def _check_native(buf: bytes, start: int, length: int, header: Header, ds: Dataset) -> None:
    """Uncompressed pixel data: a defined length, complete, and (for CT) exactly what the header
    describes, allowing the one pad byte of an odd length (a sender that re-encoded a truncated
    file produces a well-formed but short element; a longer one is ambiguous)."""
    if length == UNDEFINED_LENGTH:
        raise HeaderError("native pixel data with undefined length (encapsulated pixels under an uncompressed "
                          "transfer syntax)", STATUS_PIXEL_ENCODING)
    if len(buf) < start + length:
        raise HeaderError(f"pixel data truncated: {len(buf) - start} of {length} bytes present", STATUS_TRUNCATED)
    if length == 0:
        raise HeaderError("pixel data element is empty", STATUS_NO_PIXELS)
    expected = _expected_native_length(header.meta, ds)
    if expected is None:
        return
    if length < expected:
        raise HeaderError(f"pixel data truncated: {length} of {expected} bytes", STATUS_TRUNCATED)
    if header.sop_class_uid in CT_CLASSES and length > expected + 1:
        raise HeaderError(f"pixel data of {length} bytes where Rows x Columns x frames x BitsAllocated make "
                          f"{expected}", STATUS_PIXEL_LENGTH)


def _check_encapsulated(buf: bytes, start: int, length: int, ts: UID) -> None:
    if length != UNDEFINED_LENGTH:
        raise HeaderError(f"pixel data of defined length under {ts.name}: uncompressed pixels labelled with a "
                          "compressed transfer syntax", STATUS_PIXEL_ENCODING)
    first = _check_fragments(buf, start)
    if first is None:
        raise HeaderError("encapsulated pixel data without any fragment", STATUS_NO_PIXELS)
    offset, size = first
    _check_codec_start(ts, buf[offset:offset + min(size, 64)])


def parse_encoded(dataset_bytes: bytes, transfer_syntax: str) -> Header:
    """Parse the header of an encoded dataset (no file meta) and check it can be used.

    Reads up to the pixel data element only; verifies that element is present (for image
    storage classes), complete and encoded as the transfer syntax says, that the recorded values
    can be stored and computed with (:func:`check_values`) and that a CT image describes a
    decodable slice (:func:`check_ct_image`). Raises :class:`HeaderError` with the status to return.
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
        check_values(header)
        if header.sop_class_uid in CT_CLASSES:
            check_ct_image(ds, header.meta)
        if pos + 4 <= len(buf):
            group, elem = struct.unpack(("<" if little else ">") + "HH", buf[pos:pos + 4])
            if (group << 16 | elem) in PIXEL_TAGS:
                length, start = _pixel_element(buf, pos, implicit, little)
                if ts.is_compressed:
                    _check_encapsulated(buf, start, length, ts)
                else:
                    _check_native(buf, start, length, header, ds)
                header.has_pixels = True
    except HeaderError:
        raise
    except Exception as exc:  # pydicom raises many kinds on garbage (elements are decoded lazily)
        raise HeaderError(f"dataset cannot be parsed: {exc}", STATUS_UNPARSEABLE) from exc
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
