"""Volume assembly: decoding every accepted transfer syntax, spatial order, geometry checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import REAL_CT, make_settings
from tests.peers import SeriesSpec, compress_with_dcmtk, head_phantom, make_ct_series
from triage.dicom.assembly import AssemblyError, load_volume
from triage.dicom.header import ENHANCED_CT_IMAGE_STORAGE, header_from_dataset
from triage.dicom.selection import select_series


def expected_hu(spec: SeriesSpec) -> np.ndarray:
    n = max(spec.slices - 1, 1)
    return np.stack([head_phantom(spec.size, i / n) for i in range(spec.slices)]).astype(np.float32)


SPEC = SeriesSpec(slices=12, size=32, tilt_deg=12.0)


@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.1",  # explicit VR little endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.5",  # RLE (pydicom encoder)
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    ],
)
def test_lossless_syntaxes_decode_exactly_in_spatial_order(tmp_path: Path, syntax: str) -> None:
    paths = make_ct_series(tmp_path, SPEC, transfer_syntax=syntax, shuffle=True)
    assert str(dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    vol, headers = load_volume(paths)
    assert vol.shape == (12, 32, 32)
    np.testing.assert_array_equal(vol.hu, expected_hu(SPEC))
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, 13))  # made in spatial order
    assert vol.sop_instance_uids == [str(h.SOPInstanceUID) for h in headers]
    assert "PixelData" not in headers[0]
    assert vol.tilt_deg == pytest.approx(12.0, abs=1e-3)
    assert vol.slice_spacing == pytest.approx(5.0, abs=1e-4)
    assert vol.meta["missing_slices"] == [] and vol.meta["uneven_spacing"] is False


@pytest.mark.parametrize(
    ("options", "syntax", "max_mean_error"),
    [
        ((), "1.2.840.10008.1.2.4.70", 0.0),  # JPEG lossless SV1 (dcmcjpeg default)
        (("+el",), "1.2.840.10008.1.2.4.57", 0.0),  # JPEG lossless
        (("+ee",), "1.2.840.10008.1.2.4.51", 5.0),  # JPEG extended 12 bit (lossy)
        (("+eb",), "1.2.840.10008.1.2.4.50", 15.0),  # JPEG baseline 8 bit (lossy, rescaled)
    ],
)
def test_dcmtk_jpeg_syntaxes_decode(tmp_path: Path, options: tuple[str, ...], syntax: str,
                                    max_mean_error: float) -> None:
    spec = SeriesSpec(slices=4, size=32)
    raw = make_ct_series(tmp_path / "raw", spec)
    paths = compress_with_dcmtk(raw, tmp_path / "jpeg", "dcmcjpeg", *options)
    assert str(dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    vol, _ = load_volume(paths)
    err = np.abs(vol.hu - expected_hu(spec))
    assert float(err.mean()) <= max_mean_error
    if max_mean_error == 0:
        assert float(err.max()) == 0.0


def test_dcmtk_rle_decodes_exactly(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=4, size=32)
    paths = compress_with_dcmtk(make_ct_series(tmp_path / "raw", spec), tmp_path / "rle", "dcmcrle")
    vol, _ = load_volume(paths)
    np.testing.assert_array_equal(vol.hu, expected_hu(spec))


def test_order_follows_position_not_instance_number_or_name(tmp_path: Path) -> None:
    # Instance numbers run backwards against position; file names are shuffled.
    paths = make_ct_series(tmp_path, SeriesSpec(slices=6, size=16), shuffle=True)
    for p in paths:
        ds = dcmread(p)
        ds.InstanceNumber = 100 - int(ds.InstanceNumber)
        ds.save_as(p)
    vol, headers = load_volume(paths)
    z = vol.positions @ np.array([0, 0, 1.0])
    assert np.all(np.diff(z) > 0)
    assert [int(h.InstanceNumber) for h in headers] == [99, 98, 97, 96, 95, 94]
    assert vol.meta["instance_numbers"] == ["99", "98", "97", "96", "95", "94"], "the source's numbering, kept"
    # the key images' legend names a slice as the viewer does: instance number, position, z
    from reports.dicom.keyimages import slice_caption

    z1 = float(vol.positions[1] @ np.asarray(vol.meta["normal"]))
    assert slice_caption(vol, 1) == f"Im 98 (2/6), z {z1:.1f} mm"


def test_missing_slice_and_uneven_spacing_are_recorded(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=10, size=16, positions=[0, 5, 10, 15, 25, 30, 35, 40, 45, 50])
    vol, _ = load_volume(make_ct_series(tmp_path, spec))
    assert vol.meta["missing_slices"] == [{"after_index": 3, "gap_mm": 10.0}]
    assert vol.spacings[3] == pytest.approx(10.0)
    assert vol.meta["uneven_spacing"] is True


def _rewrite(path: Path, **attrs: object) -> None:
    ds = dcmread(path)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0.9, -0.43589]}, "ImageOrientationPatient differs"),
        ({"PixelSpacing": [0.7, 0.7]}, "PixelSpacing"),
        ({"ImagePositionPatient": None}, "ImagePositionPatient"),
    ],
)
def test_inconsistent_geometry_raises(tmp_path: Path, change: dict, words: str) -> None:
    paths = make_ct_series(tmp_path, SeriesSpec(slices=5, size=16))
    if change.get("ImagePositionPatient", 1) is None:
        ds = dcmread(paths[2])
        del ds.ImagePositionPatient
        ds.save_as(paths[2])
    else:
        _rewrite(paths[2], **change)
    with pytest.raises(AssemblyError, match=words):
        load_volume(paths)


def test_matrix_mismatch_duplicates_and_missing_pixels_raise(tmp_path: Path) -> None:
    a = make_ct_series(tmp_path / "a", SeriesSpec(slices=3, size=16))
    b = make_ct_series(tmp_path / "b", SeriesSpec(slices=3, size=32, positions=[20, 25, 30]))
    with pytest.raises(AssemblyError, match="matrix"):
        load_volume(a + b)
    with pytest.raises(AssemblyError, match="same position"):
        load_volume(a + make_ct_series(tmp_path / "c", SeriesSpec(slices=1, size=16)))
    ds = dcmread(a[0])
    del ds.PixelData
    ds.save_as(a[0])
    with pytest.raises(AssemblyError, match="no pixel data"):
        load_volume(a)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(AssemblyError, match="not readable"):
        load_volume([tmp_path / "junk.dcm"])
    with pytest.raises(AssemblyError, match="no files"):
        load_volume([])


def make_enhanced_ct(path: Path, frames: int = 6, size: int = 16) -> None:
    """A minimal multi-frame Enhanced CT instance (geometry in functional groups, frames reversed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT_IMAGE_STORAGE, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "CT", "HEAD", "ENHANCED HEAD"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    ori, meas, pvt = Dataset(), Dataset(), Dataset()
    ori.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    meas.PixelSpacing, meas.SliceThickness = [0.5, 0.5], 5.0
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, -1024, "HU"
    shared.PlaneOrientationSequence = Sequence([ori])
    shared.PixelMeasuresSequence = Sequence([meas])
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    pixels = []
    for f in range(frames):
        z = 5.0 * (frames - 1 - f)  # stored top to bottom
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0, 0, z]
        item.PlanePositionSequence = Sequence([pos])
        per.append(item)
        pixels.append(np.full((size, size), 1024 + int(z), np.uint16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.stack(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_ct_frames_become_sorted_slices(tmp_path: Path) -> None:
    path = tmp_path / "enh.dcm"
    make_enhanced_ct(path, size=64)  # selection skips matrices under 64 x 64
    vol, headers = load_volume([path])
    assert vol.shape == (6, 64, 64)
    assert [float(v) for v in vol.hu[:, 0, 0]] == [5.0 * i for i in range(6)]  # HU = stored - 1024 = z
    assert len(headers) == 6 and vol.slice_thickness == 5.0
    assert vol.meta["instance_numbers"] == [None] * 6, "no InstanceNumber in the source: none invented"
    ds = dcmread(path)
    ds.InstanceNumber = 7
    ds.save_as(path)
    vol, _ = load_volume([path])
    # frames stored top to bottom: in spatial order the frame numbers run backwards
    assert vol.meta["instance_numbers"] == [f"7 fr {i}" for i in range(6, 0, -1)]
    meta = header_from_dataset(dcmread(path, stop_before_pixels=True), True).meta
    assert meta["frames"] == 6 and len(meta["frame_ipps"]) == 6
    r = select_series(make_settings(tmp_path, selection_min_slices=4), [meta], [ENHANCED_CT_IMAGE_STORAGE])
    assert r.ok and r.meta["slices"] == 6, r.reason


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="real CT sample not present")
def test_real_tilted_ge_head_assembles_in_spatial_order() -> None:
    files = sorted(REAL_CT.glob("*.dcm"))
    rng = np.random.default_rng(3)
    vol, headers = load_volume([files[i] for i in rng.permutation(len(files))])
    assert vol.shape == (len(files), 512, 512)
    normal = np.cross(np.array(vol.orientation[:3]), np.array(vol.orientation[3:]))
    z = vol.positions @ normal
    assert np.all(np.diff(z) > 0)
    # True spatial order equals the sort of the raw files by position along the normal.
    by_pos = sorted(files, key=lambda p: float(np.dot(normal, np.array(
        dcmread(p, stop_before_pixels=True).ImagePositionPatient, dtype=float))))
    assert vol.sop_instance_uids == [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in by_pos]
    assert vol.tilt_deg == pytest.approx(18.5, abs=0.01)
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(18.5)
    assert min(vol.spacings) == pytest.approx(1.08, abs=0.01)
    assert max(vol.spacings) == pytest.approx(6.99, abs=0.01)
    assert vol.meta["uneven_spacing"] is True and vol.meta["missing_slices"] == []
    assert -1100 < float(np.median(vol.hu[len(files) // 2])) < 100  # HU scale, not raw values
    assert headers[0].Modality == "CT"
