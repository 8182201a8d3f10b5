"""Dataset readers on tiny fixtures laid out like each public dataset, built from synthetic studies
at test time (no real data is committed)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from triage.datasets import DatasetError, detect_format, open_dataset
from triage.labels import SUBTYPES
from triage.phantom.generator import PhantomOptions, SyntheticStudy, generate_study

from .dataset_fixtures import write_cq500, write_ctich, write_rsna

SIZE = 128


@pytest.fixture(scope="module")
def studies() -> list[SyntheticStudy]:
    """A positive (SAH + IVH) and a negative study, untilted, small."""
    pos = generate_study(1, PhantomOptions(size=SIZE, subtypes=("subarachnoid", "intraventricular"),
                                           size_class="medium", tilt_deg=0.0))
    neg = generate_study(2, PhantomOptions(size=SIZE, kind="negative", tilt_deg=0.0))
    return [pos, neg]


def _union(s: SyntheticStudy) -> np.ndarray:
    return s.any_mask


def test_phantom_reader(tmp_path: Path) -> None:
    from triage.cli import main as triage_main

    assert triage_main(["phantom", str(tmp_path), "--studies", "2", "--seed", "3", "--workers", "1",
                        "--extra", f"size={SIZE}", "--extra", "subtypes=subdural"]) == 0
    assert detect_format(tmp_path) == "phantom"
    ds = open_dataset(tmp_path)
    assert ds.format == "phantom" and ds.ids() == ["study-0001", "study-0002"] and len(ds) == 2
    ref = generate_study(3 * 100_000, PhantomOptions(size=SIZE, subtypes=("subdural",)))
    s = ds.load("study-0001")
    assert np.array_equal(s.hu, ref.hu) and s.pixel_spacing == pytest.approx(ref.pixel_spacing)
    assert all(np.array_equal(s.masks[k], ref.masks[k]) for k in SUBTYPES)
    assert np.array_equal(s.slice_labels, ref.slice_labels) and np.array_equal(s.exam_labels, ref.exam_labels)
    assert np.array_equal(ds.exam_labels("study-0002"), ds[1].exam_labels)
    from triage.datasets.phantom import PhantomDataset

    from_dicom = PhantomDataset(tmp_path, from_dicom=True).load("study-0001")
    assert np.array_equal(from_dicom.hu, s.hu)
    assert [x.id for x in ds] == ds.ids()


def test_rsna_reader_groups_sorts_and_labels(tmp_path: Path, studies: list[SyntheticStudy]) -> None:
    write_rsna(tmp_path, studies)
    assert detect_format(tmp_path) == "rsna"
    ds = open_dataset(tmp_path)
    assert len(ds) == 2
    seen = 0
    for sample in ds:
        st = next(s for s in studies if s.hu.shape == sample.hu.shape and np.array_equal(s.hu, sample.hu))
        assert np.array_equal(sample.slice_labels, st.slice_labels)
        assert np.array_equal(sample.exam_labels, st.exam_labels)
        assert sample.slice_spacing == pytest.approx(st.slice_spacing, rel=1e-3)
        assert sample.masks is None
        seen += 1
    assert seen == 2


def test_rsna_reader_rejects_bad_ids(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train").mkdir()
    (tmp_path / "stage_2_train.csv").write_text("ID,Label\nID_abc_notalabel,1\n")
    ds = open_dataset(tmp_path, "rsna")
    with pytest.raises(DatasetError, match="bad ID"):
        _ = ds.image_labels


def test_cq500_reader_majority_and_series_choice(tmp_path: Path, studies: list[SyntheticStudy]) -> None:
    write_cq500(tmp_path, studies, (7, 12))
    assert detect_format(tmp_path) == "cq500"
    ds = open_dataset(tmp_path)
    assert ds.ids() == ["CQ500-CT-7", "CQ500-CT-12"]
    for exam_id, st in zip(ds.ids(), studies, strict=True):
        sample = ds.load(exam_id)
        assert np.array_equal(sample.exam_labels, st.exam_labels)  # majority of 3 ignores reader 3
        assert sample.meta["series_description"].startswith("HEAD") and "BONE" not in sample.meta[
            "series_description"]
        assert np.array_equal(sample.hu, st.hu)
        assert sample.slice_labels is None


def test_ctich_reader_reorients_and_reads_masks(tmp_path: Path, studies: list[SyntheticStudy]) -> None:
    write_ctich(tmp_path, studies, (49, 50))
    assert detect_format(tmp_path) == "ctich"
    ds = open_dataset(tmp_path)
    assert ds.ids() == ["049", "050"]
    for exam_id, st in zip(ds.ids(), studies, strict=True):
        sample = ds.load(exam_id)
        assert np.array_equal(sample.hu, st.hu)  # back in (Z, Y, X) LPS display order
        assert np.array_equal(sample.masks["any"], _union(st))
        assert np.array_equal(sample.slice_labels, st.slice_labels)
        assert sample.pixel_spacing == pytest.approx(st.pixel_spacing, rel=1e-5)
        assert sample.slice_spacing == pytest.approx(st.slice_spacing, rel=1e-5)
        assert np.array_equal(ds.exam_labels(exam_id), st.exam_labels)


def test_ctich_reader_handles_a_flipped_slice_axis(tmp_path: Path, studies: list[SyntheticStudy]) -> None:
    """Files stored cranial -> caudal (negative z step) still come back ascending, labels aligned."""
    from triage.phantom.dicom_writer import nifti_affine

    st = studies[0]
    aff = nifti_affine(st)
    flip = aff.copy()
    flip[:3, 2] = -aff[:3, 2]
    flip[:3, 3] = aff[:3, 3] + aff[:3, 2] * (st.hu.shape[0] - 1)
    (tmp_path / "ct_scans").mkdir()
    data = st.hu[::-1].transpose(2, 1, 0).astype(np.int16)
    nib.save(nib.Nifti1Image(data, flip), tmp_path / "ct_scans" / "051.nii")
    with (tmp_path / "hemorrhage_diagnosis_raw_ct.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal", "Subarachnoid",
                    "Epidural", "Subdural", "No_Hemorrhage"])
        z = st.hu.shape[0]
        for k in range(z):
            lab = st.slice_labels[z - 1 - k]  # file slice k is anatomical slice z-1-k
            w.writerow([51, k + 1, lab[3], lab[2], lab[4], lab[1], lab[5], int(not lab[0])])
    sample = open_dataset(tmp_path).load("051")
    assert np.array_equal(sample.hu, st.hu)
    assert np.array_equal(sample.slice_labels, st.slice_labels)
    assert sample.masks is None


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not a directory"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        open_dataset(tmp_path, "dicomweb")
