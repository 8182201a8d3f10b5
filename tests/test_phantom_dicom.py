"""``triage phantom`` output: DICOM series with valid headers, lossless HU round trip in every
transfer syntax, extra series, ground truth files, manifest, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from triage.cli import main as triage_main
from triage.dicom.assembly import load_volume
from triage.phantom.truth import load_truth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("phantom")
    rc = triage_main([
        "phantom", str(d), "--studies", "4", "--seed", "5", "--montage", "--workers", "2",
        "--extra", "size=256", "--extra", "series=head,bone,localizer,chest,contrast",
        "--extra", "transfer_syntax=mixed", "--extra", "tilt_deg=15",
    ])
    assert rc == 0
    return d


def _head_files(study_dir: Path) -> list[Path]:
    return sorted((study_dir / "dicom" / "head").glob("*.dcm"))


def test_manifest_lists_every_study(out: Path) -> None:
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "triage-phantom/1" and len(m["studies"]) == 4
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["study_id"] for r in rows] == [s["study_id"] for s in m["studies"]]
    assert {r["transfer_syntax"] for r in rows} == {"jpegls", "j2k", "rle", "explicit"}
    for r in m["studies"]:
        d = out / r["path"]
        assert (d / "truth" / "truth.npz").is_file() and (d / "montage.png").is_file()
        assert len(_head_files(d)) == r["slices"]
        truth = json.loads((d / "truth" / "truth.json").read_text())
        assert truth["exam_labels"] == [r[f"label_{k}"] for k in m["labels"]]


def test_headers_are_realistic_and_synthetic(out: Path) -> None:
    files = _head_files(out / "study-0001")
    ds = pydicom.dcmread(files[0])
    assert str(ds.PatientName) == "SYNTH^0001" and ds.PatientID == "SYNTH0001" and ds.AccessionNumber == "SYN0001"
    assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD" and ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.StudyDate and ds.StudyTime and ds.SeriesDescription.startswith("HEAD")
    assert ds.ConvolutionKernel and float(ds.WindowCenter) == 40 and float(ds.WindowWidth) == 80
    assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
    assert float(ds.GantryDetectorTilt) == pytest.approx(15.0)
    iop = np.array([float(x) for x in ds.ImageOrientationPatient])
    assert iop[4] == pytest.approx(np.cos(np.radians(15))) and iop[5] == pytest.approx(-np.sin(np.radians(15)))
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert len(uids) == len(files)
    # series of the study: head, bone, contrast, localizer and chest share the StudyInstanceUID
    series = {}
    for f in (out / "study-0001" / "dicom").rglob("*.dcm"):
        h = pydicom.dcmread(f, stop_before_pixels=True)
        assert h.StudyInstanceUID == ds.StudyInstanceUID
        # as scanners write it: the number of images of the series (the node's early completion needs it)
        assert h.ImagesInAcquisition == len(list(f.parent.glob("*.dcm"))) and h.AcquisitionNumber == 1
        series[f.parent.name] = h
    assert "LOCALIZER" in series["localizer"].ImageType
    assert series["chest"].BodyPartExamined == "CHEST"
    assert "BONE" in series["bone"].SeriesDescription and series["bone"].ConvolutionKernel == "H70h"
    assert series["contrast"].ContrastBolusAgent


def test_hu_round_trip_in_every_transfer_syntax(out: Path) -> None:
    m = json.loads((out / "manifest.json").read_text())
    for r in m["studies"]:
        d = out / r["path"]
        arrays, truth = load_truth(d / "truth")
        files = _head_files(d)
        ts = pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID
        expected = {"explicit": pydicom.uid.ExplicitVRLittleEndian, "jpegls": pydicom.uid.JPEGLSLossless,
                    "j2k": pydicom.uid.JPEG2000Lossless, "rle": pydicom.uid.RLELossless}[r["transfer_syntax"]]
        assert ts == expected
        # the node's own assembly: geometry (tilt), sorting and HU must reproduce the ground-truth volume
        vol, _ = load_volume(files)
        assert vol.hu.shape == arrays["hu"].shape
        assert np.array_equal(vol.hu.astype(np.float32), arrays["hu"]), r["transfer_syntax"]
        assert vol.slice_spacing == pytest.approx(truth["slice_spacing"], rel=1e-3)
        assert vol.pixel_spacing[0] == pytest.approx(truth["pixel_spacing"][0], rel=1e-5)
        assert abs(vol.tilt_deg) == pytest.approx(15.0, abs=0.05)


def test_nifti_mask_matches_truth_and_geometry(out: Path) -> None:
    m = json.loads((out / "manifest.json").read_text())
    pos = next(r for r in m["studies"] if r["label_any"]) if any(r["label_any"] for r in m["studies"]) else None
    if pos is None:
        pytest.skip("no positive study in this seed set")
    d = out / pos["path"]
    arrays, _ = load_truth(d / "truth")
    img = nib.load(d / "truth" / "masks.nii.gz")
    bits = np.asarray(img.dataobj).transpose(2, 1, 0)
    union = np.zeros(bits.shape, bool)
    for mk in arrays["masks"].values():
        union |= mk
    assert np.array_equal(bits > 0, union)
    # voxel (0, 0, k) of the NIfTI maps onto the DICOM ImagePositionPatient of slice k (RAS = LPS with x, y negated)
    files = _head_files(d)
    ipp = np.array([float(x) for x in pydicom.dcmread(files[-1], stop_before_pixels=True).ImagePositionPatient])
    ras = img.affine @ np.array([0, 0, len(files) - 1, 1.0])
    assert np.allclose(ras[:3], ipp * np.array([-1, -1, 1]), atol=1e-3)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_reports_no_errors(out: Path) -> None:
    for sub in ("head", "localizer"):
        f = sorted((out / "study-0001" / "dicom" / sub).glob("*.dcm"))[0]
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        errors = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.startswith("Error")]
        assert not errors, errors


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        d = tmp_path / name
        assert triage_main(["phantom", str(d), "--studies", "1", "--seed", "9", "--workers", "1",
                            "--extra", "size=128"]) == 0
        h = hashlib.sha256()
        for f in sorted((d / "study-0001").rglob("*")):
            if f.is_file() and f.suffix in (".dcm", ".npz"):
                h.update(f.read_bytes())
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]


def test_bad_extra_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert triage_main(["phantom", str(tmp_path / "x"), "--studies", "1", "--extra", "colour=red"]) == 2
    assert "unknown phantom option 'colour'" in capsys.readouterr().out
    assert triage_main(["phantom", str(tmp_path / "x"), "--studies", "1", "--extra", "series=chest"]) == 2
