"""Header parsing of received datasets: metadata without decoding, completeness checks."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.peers import SeriesSpec, make_ct_series
from triage.dicom.header import (
    STATUS_MISSING_UID,
    STATUS_NO_PIXELS,
    STATUS_TRUNCATED,
    STATUS_UNPARSEABLE,
    HeaderError,
    parse_encoded,
)


def dataset_bytes(path: Path) -> tuple[bytes, str]:
    """The encoded dataset after the file meta group, and its transfer syntax."""
    raw = path.read_bytes()
    (group_length,) = struct.unpack("<I", raw[140:144])  # (0002,0000) UL value
    return raw[144 + group_length:], str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99",
                                    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"])
def test_complete_datasets_parse_with_metadata(tmp_path: Path, syntax: str) -> None:
    (path,) = make_ct_series(tmp_path, SeriesSpec(slices=1, size=32, tilt_deg=10, kernel="H30s"),
                             transfer_syntax=syntax)
    data, ts = dataset_bytes(path)
    h = parse_encoded(data, ts)
    assert h.has_pixels and h.modality == "CT" and h.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert h.meta["kernel"] == "H30s" and h.meta["gantry_tilt"] == 10.0 and h.meta["rows"] == 32
    assert h.meta["iop"][4] == pytest.approx(0.98481, abs=1e-4)
    assert h.study["patient_name"] == "Test^Patient" and "patient_name" not in h.meta  # PHI only for the row


def test_truncated_native_and_encapsulated_pixel_data(tmp_path: Path) -> None:
    (native,) = make_ct_series(tmp_path / "n", SeriesSpec(slices=1, size=32))
    data, ts = dataset_bytes(native)
    with pytest.raises(HeaderError) as err:
        parse_encoded(data[:-100], ts)
    assert err.value.status == STATUS_TRUNCATED
    (j2k,) = make_ct_series(tmp_path / "j", SeriesSpec(slices=1, size=32), transfer_syntax="1.2.840.10008.1.2.4.90")
    data, ts = dataset_bytes(j2k)
    for cut in (8, 40):  # without the delimiter; inside the fragment
        with pytest.raises(HeaderError) as err:
            parse_encoded(data[:-cut], ts)
        assert err.value.status == STATUS_TRUNCATED


def test_missing_pixels_uids_and_garbage(tmp_path: Path) -> None:
    (path,) = make_ct_series(tmp_path, SeriesSpec(slices=1, size=16))
    ds = dcmread(path)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(HeaderError) as err:
        parse_encoded(*dataset_bytes(tmp_path / "nopix.dcm"))
    assert err.value.status == STATUS_NO_PIXELS
    ds = dcmread(path)
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "nouid.dcm", enforce_file_format=False)
    with pytest.raises(HeaderError) as err:
        parse_encoded(*dataset_bytes(tmp_path / "nouid.dcm"))
    assert err.value.status == STATUS_MISSING_UID
    with pytest.raises(HeaderError) as err:
        parse_encoded(b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 40, "1.2.840.10008.1.2.1")
    assert err.value.status in (STATUS_UNPARSEABLE, STATUS_MISSING_UID)
    ds = dcmread(path)
    ds.SOPInstanceUID = "1.2.3.x../../etc"
    ds.save_as(tmp_path / "baduid.dcm", enforce_file_format=False)
    with pytest.raises(HeaderError, match="not a valid UID") as err:
        parse_encoded(*dataset_bytes(tmp_path / "baduid.dcm"))
    assert err.value.status == STATUS_MISSING_UID
    with pytest.raises(HeaderError) as err:
        parse_encoded(b"\x78\x9c garbage", "1.2.840.10008.1.2.1.99")
    assert err.value.status == STATUS_UNPARSEABLE


def test_non_image_objects_need_no_pixels(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3", "1.2.3.5"
    ds.Modality = "SR"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    h = parse_encoded(*dataset_bytes(tmp_path / "sr.dcm"))
    assert not h.has_pixels and h.modality == "SR"
