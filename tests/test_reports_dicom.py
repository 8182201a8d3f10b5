"""Result objects (SEG, TID 1500 SR, SC) on synthetic CT series: validity, read-back, UIDs.

Each object is validated by dicom3tools' ``dciodvfy`` (errors are fatal; the only warnings
allowed are listed in ``ALLOWED_WARNINGS``) and read back with highdicom.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from reports.dicom import build_sc, build_seg, build_sr, render_key_images
from reports.dicom import codes as rc
from reports.dicom.common import PATIENT_STUDY_KEYWORDS
from reports.dicom.seg import REST_LABEL, present_segments
from reports.dicom.synthetic import IDENTITY, make_prediction, make_series
from reports.dicom.uids import object_uid
from triage.labels import DISPLAY, LABELS, SUBTYPES

DCIODVFY = shutil.which("dciodvfy")
# Private codes (99ICHT) for the epidural / intraventricular findings: dciodvfy does not know
# the designator even though the SR declares it in CodingSchemeIdentificationSequence.
ALLOWED_WARNINGS = [
    re.compile(r"Unrecognized defined term <99ICHT> for value 1 of attribute <Coding Scheme Designator>")
]


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dciodvfy on ``path``."""
    if DCIODVFY is None:
        pytest.fail("dciodvfy (Debian dicom3tools) is not installed; scripts/setup.sh installs it")
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stderr + proc.stdout).splitlines()
    return [ln for ln in lines if "Error" in ln], [ln for ln in lines if "Warning" in ln]


def assert_valid(path: Path, extra_allowed: tuple[str, ...] = ()) -> list[str]:
    """No dciodvfy errors; warnings only those in ``ALLOWED_WARNINGS`` or ``extra_allowed`` (regexes)."""
    errors, warnings = dciodvfy(path)
    assert errors == [], f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    allowed = ALLOWED_WARNINGS + [re.compile(p) for p in extra_allowed]
    unexpected = [w for w in warnings if not any(p.search(w) for p in allowed)]
    assert unexpected == [], f"unexpected dciodvfy warnings in {path.name}:\n" + "\n".join(unexpected)
    return warnings


@pytest.fixture(scope="module", params=[0.0, 18.5], ids=["axial", "tilted"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tilt = request.param
    sources, volume = make_series(n_slices=12, size=128, tilt_deg=tilt, with_pixels=False, seed=f"t{tilt}")
    prediction = make_prediction(volume, subtypes=("intraparenchymal", "intraventricular", "subdural"))
    seg = build_seg(sources, prediction, IDENTITY)
    sr = build_sr(sources, prediction, IDENTITY, seg)
    scs = build_sc(sources, volume, prediction, IDENTITY)
    out = tmp_path_factory.mktemp(f"objects-{tilt}")
    paths = {"seg": out / "seg.dcm", "sr": out / "sr.dcm"}
    seg.save_as(paths["seg"], enforce_file_format=True)
    sr.save_as(paths["sr"], enforce_file_format=True)
    for i, sc in enumerate(scs):
        paths[f"sc{i}"] = out / f"sc{i}.dcm"
        sc.save_as(paths[f"sc{i}"], enforce_file_format=True)
    return dict(tilt=tilt, sources=sources, volume=volume, prediction=prediction, seg=seg, sr=sr, scs=scs, paths=paths)


# --------------------------------------------------------------------------- validity
def test_every_object_passes_dciodvfy(case: dict) -> None:
    assert len(case["scs"]) == 3
    for kind, path in case["paths"].items():
        warnings = assert_valid(path)
        if kind != "sr":
            assert warnings == [], f"{kind} should be free of warnings"


def test_patient_and_study_copied_from_source(case: dict) -> None:
    src = case["sources"][0]
    for obj in [case["seg"], case["sr"], *case["scs"]]:
        for kw in PATIENT_STUDY_KEYWORDS:
            if kw in src and not src[kw].is_empty:
                assert obj.get(kw) == src.get(kw), kw
        assert obj.StudyInstanceUID == src.StudyInstanceUID
        assert obj.SeriesInstanceUID != src.SeriesInstanceUID
        assert "POSITIVE" in obj.SeriesDescription and "NOT FOR DIAGNOSTIC USE" in obj.SeriesDescription


# --------------------------------------------------------------------------- SEG
def test_seg_round_trips_voxel_exact(case: dict) -> None:
    seg = hd.seg.segread(case["paths"]["seg"])
    pred = case["prediction"]
    labels = present_segments(pred)
    assert labels == ["intraparenchymal", "intraventricular", "subdural"]
    assert seg.SegmentationType == "BINARY" and seg.SegmentsOverlap == "NO"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    uids = [str(s.SOPInstanceUID) for s in case["sources"]]
    # Omitted (empty) frames come back as zeros; every source slice is asked for.
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=list(range(1, len(labels) + 1)), ignore_spatial_locations=True
    )
    for i, label in enumerate(labels):
        np.testing.assert_array_equal(arr[..., i].astype(bool), pred.masks[label], err_msg=label)
    n_nonempty = sum(int(pred.masks[lab][k].any()) for lab in labels for k in range(len(uids)))
    assert int(seg.NumberOfFrames) == n_nonempty  # omit_empty_frames


def test_seg_segments_coded_and_identified(case: dict) -> None:
    seg = hd.seg.segread(case["paths"]["seg"])
    for number, label in enumerate(present_segments(case["prediction"]), start=1):
        desc = seg.get_segment_description(number)
        assert desc.segment_label == DISPLAY[label]
        assert desc.segmented_property_category == rc.MORPHOLOGICALLY_ABNORMAL_STRUCTURE
        assert desc.segmented_property_type == rc.HEMORRHAGE
        assert desc.anatomic_regions[0] == rc.ANATOMY[label]
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algo = desc.algorithm_identification[0]
        assert algo.AlgorithmName == IDENTITY.name and algo.AlgorithmVersion == IDENTITY.version
        assert any(IDENTITY.sha256 in str(v) for v in algo.get("AlgorithmParameters", "").split(","))


def test_blood_of_no_called_subtype_gets_its_own_segment(tmp_path: Path) -> None:
    """A ``masks["any"]`` (blood under no called subtype) is its own segment, first in label order;
    the SR's "any" group (the total volume) does not reference it, the subtype's group does."""
    sources, volume = make_series(n_slices=8, size=96, with_pixels=False, seed="rest")
    pred = make_prediction(volume, subtypes=("intraparenchymal",))
    rest = np.zeros(volume.shape, bool)
    rest[3, 10:20, 10:20] = True
    rest &= ~pred.masks["intraparenchymal"]
    pred.masks["any"] = rest
    assert present_segments(pred) == ["any", "intraparenchymal"]
    seg = build_seg(sources, pred, IDENTITY)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == [REST_LABEL, DISPLAY["intraparenchymal"]]
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    assert_valid(tmp_path / "seg.dcm")
    sr = build_sr(sources, pred, IDENTITY, seg)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    refs = [g.finding_type for g in report.get_volumetric_roi_measurement_groups()]
    assert refs == [rc.FINDING["intraparenchymal"]]
    back = hd.seg.segread(tmp_path / "seg.dcm")
    arr = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(s.SOPInstanceUID) for s in sources], segment_numbers=[1],
        ignore_spatial_locations=True)
    np.testing.assert_array_equal(arr[..., 0].astype(bool), rest)


def test_seg_frames_carry_source_plane_positions(case: dict) -> None:
    """Per-frame positions come from the (possibly tilted) source slices, frame by frame."""
    seg = case["seg"]
    by_uid = {str(s.SOPInstanceUID): s for s in case["sources"]}
    iop = [float(v) for v in case["sources"][0].ImageOrientationPatient]
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient], iop)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, [float(v) for v in by_uid[src_uid].ImagePositionPatient], atol=1e-3)


# --------------------------------------------------------------------------- SR
def test_sr_has_six_groups_in_label_order_with_values(case: dict) -> None:
    sr = hd.sr.srread(case["paths"]["sr"])
    pred = case["prediction"]
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    report = hd.sr.MeasurementReport.from_sequence([sr])
    vol_groups = report.get_volumetric_roi_measurement_groups()
    assert [g.finding_type for g in vol_groups] == [rc.FINDING[lab] for lab in present_segments(pred)]
    # All groups in document order (TID 1411 for labels with a segment, TID 1501 otherwise).
    containers = [it for it in sr.ContentSequence if it.ValueType == "CONTAINER"]
    groups = [it for it in containers[0].ContentSequence if it.ValueType == "CONTAINER"]
    assert len(groups) == len(LABELS) == 6
    seg_labels = present_segments(pred)
    assert len(vol_groups) == len(seg_labels)
    for label, group in zip(LABELS, groups, strict=True):
        items = group.ContentSequence
        finding = [it for it in items if it.ConceptNameCodeSequence[0].CodeValue == "121071"]  # DCM Finding
        assert hd.sr.CodedConcept.from_dataset(finding[0].ConceptCodeSequence[0]) == rc.FINDING[label]
        nums = {}
        for it in items:
            if it.ValueType != "NUM":
                continue
            name = it.ConceptNameCodeSequence[0].CodeValue
            methods = [
                m for m in it.get("ContentSequence", []) if m.ConceptNameCodeSequence[0].CodeValue == "370129005"
            ]
            key = (name, methods[0].ConceptCodeSequence[0].CodeValue if methods else None)
            mv = it.MeasuredValueSequence[0]
            nums[key] = (float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue)
            names = {m.ConceptNameCodeSequence[0].CodeMeaning for m in it.get("ContentSequence", [])}
            assert {"Algorithm Name", "Algorithm Version"} <= names, "algorithm at measurement level"
        assert nums[(rc.PROBABILITY.value, None)] == (pytest.approx(pred.exam_probs[label], abs=1e-6), "1")
        assert nums[(rc.THRESHOLD.value, None)] == (pytest.approx(pred.thresholds[label], abs=1e-6), "1")
        assert nums[(rc.VOLUME.value, rc.METHOD_VOXEL_SUM.value)] == (
            pytest.approx(pred.volumes_ml[label], abs=1e-3),
            "ml",
        )
        assert nums[(rc.VOLUME.value, rc.METHOD_ABC2.value)] == (pytest.approx(pred.abc2_ml[label], abs=1e-3), "ml")
        evals = {
            it.ConceptNameCodeSequence[0].CodeValue: it.ConceptCodeSequence[0].CodeValue
            for it in items
            if it.ValueType == "CODE"
            and it.RelationshipType == "CONTAINS"
            and it.ConceptNameCodeSequence[0].CodeValue != "121071"
        }
        assert evals[rc.FINDING[label].value] == (rc.PRESENT if pred.present[label] else rc.ABSENT).value
        if label == "any":
            assert evals[rc.PRIORITY.value] == rc.URGENT.value
        refs = [it for it in items if it.ValueType == "IMAGE"]
        if label in seg_labels:
            ref = refs[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == case["seg"].SOPInstanceUID
            assert int(ref.ReferencedSegmentNumber) == seg_labels.index(label) + 1
        else:
            assert refs == []


def test_sr_header_procedure_and_evidence(case: dict) -> None:
    sr = pydicom.dcmread(case["paths"]["sr"])
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    proc = [it for it in sr.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert proc[0].ConceptCodeSequence[0].CodeValue == "25045-6"
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert evidence == {str(s.SOPInstanceUID) for s in case["sources"]} | {str(case["seg"].SOPInstanceUID)}
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == rc.PRIVATE_SCHEME


# --------------------------------------------------------------------------- SC and key images
def test_sc_pixels_are_the_overlay_with_burned_in_flag(case: dict) -> None:
    kis = render_key_images(case["volume"], case["prediction"])
    assert [k.label for k in kis] == ["intraparenchymal", "intraventricular", "subdural"]
    for ki, path in zip(kis, [case["paths"][f"sc{i}"] for i in range(3)], strict=True):
        sc = pydicom.dcmread(path)
        assert sc.BurnedInAnnotation == "YES"
        assert sc.BodyPartExamined == "HEAD"
        assert sc.PhotometricInterpretation == "RGB" and int(sc.SamplesPerPixel) == 3
        np.testing.assert_array_equal(sc.pixel_array, ki.overlay_rgb)
        src_uid = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert src_uid == case["sources"][ki.slice_index].SOPInstanceUID


def test_overlay_differs_from_plain_where_the_mask_is(case: dict) -> None:
    vol, pred = case["volume"], case["prediction"]
    for ki in render_key_images(vol, pred):
        assert ki.plain_rgb.dtype == np.uint8 and ki.overlay_rgb.dtype == np.uint8
        h, w, _ = ki.plain_rgb.shape
        assert min(h, w) >= 512 and ki.overlay_rgb.shape[1] == w and ki.overlay_rgb.shape[0] > h
        top = ki.overlay_rgb[:h].astype(int)
        diff = np.abs(top - ki.plain_rgb.astype(int)).sum(axis=2) > 0
        f = h // vol.shape[1]
        mask = pred.masks[ki.label][ki.slice_index].repeat(f, 0).repeat(f, 1)
        assert diff[mask].mean() > 0.5, "heatmap and outline must change the pixels over the lesion"
        far = np.zeros_like(mask)
        far[: h // 10, : w // 10] = True  # air in the corner: untouched
        assert not diff[far].any()
        # The outline is drawn in the subtype's colour.
        colour = np.array(rc.COLORS[ki.label])
        assert (np.abs(top - colour).sum(axis=2) == 0).sum() > 20
        assert ki.overlay_rgb[h:].max() > 0, "legend panel has text"


def test_a_series_outside_the_models_input_domain_says_so_in_every_object(tmp_path: Path) -> None:
    sources, volume = make_series(n_slices=12, size=128, with_pixels=False, seed="ood")
    pred = make_prediction(volume, subtypes=("subdural",))
    pred.input_domain = {"distance": 38.2, "threshold": 9.1, "in_domain": False}
    seg = build_seg(sources, pred, IDENTITY)
    sr = build_sr(sources, pred, IDENTITY, seg)
    scs = build_sc(sources, volume, pred, IDENTITY)
    for name, ds in [("seg", seg), ("sr", sr), *((f"sc{i}", sc) for i, sc in enumerate(scs))]:
        assert ds is not None
        kind = name.rstrip("0123456789").upper()
        assert ds.SeriesDescription == f"ICH AI {kind}: POSITIVE (OUT OF DOMAIN) - NOT FOR DIAGNOSTIC USE"
        assert len(ds.SeriesDescription) <= 64
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        assert_valid(tmp_path / f"{name}.dcm")
    # The SR says it in its content too: a coded evaluation in the "any" group (private concept).
    report = hd.sr.srread(tmp_path / "sr.dcm")
    any_group = report.ContentSequence[-1].ContentSequence[0].ContentSequence
    domain = [it for it in any_group if it.ValueType == "CODE"
              and it.ConceptNameCodeSequence[0].CodeValue == rc.INPUT_DOMAIN.value]
    assert len(domain) == 1 and domain[0].ConceptCodeSequence[0].CodeValue == rc.NO.value
    assert domain[0].ConceptNameCodeSequence[0].CodingSchemeDesignator == "99ICHT"
    # The key images carry the warning in their burned-in legend (one more text line than without it).
    with_flag = render_key_images(volume, pred)[0].overlay_rgb
    pred.input_domain = {**pred.input_domain, "in_domain": True}
    assert "OUT OF DOMAIN" not in build_sr(sources, pred, IDENTITY, seg).SeriesDescription
    without = render_key_images(volume, pred)[0].overlay_rgb
    assert with_flag.shape[0] > without.shape[0] or (with_flag != without).any()


# --------------------------------------------------------------------------- negatives, errors, UIDs
def test_negative_exam(tmp_path: Path) -> None:
    sources, volume = make_series(n_slices=12, size=128, with_pixels=False, seed="neg")
    pred = make_prediction(volume, positive=False)
    assert build_seg(sources, pred, IDENTITY) is None
    sr = build_sr(sources, pred, IDENTITY, None)
    scs = build_sc(sources, volume, pred, IDENTITY)
    assert len(scs) == 1 and "NEGATIVE" in scs[0].SeriesDescription and "NEGATIVE" in sr.SeriesDescription
    for name, ds in [("sr", sr), ("sc", scs[0])]:
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        assert_valid(tmp_path / f"{name}.dcm")
    report = hd.sr.srread(tmp_path / "sr.dcm")
    flat = [it for it in report.ContentSequence[-1].ContentSequence[0].ContentSequence if it.ValueType == "CODE"]
    prio = [it for it in flat if it.ConceptNameCodeSequence[0].CodeValue == rc.PRIORITY.value]
    assert prio[0].ConceptCodeSequence[0].CodeValue == rc.ROUTINE.value
    assert not [it for it in flat if it.ConceptNameCodeSequence[0].CodeValue == rc.INPUT_DOMAIN.value], \
        "no input-domain item when the bundle has no check"
    ki = render_key_images(volume, pred)[0]
    assert ki.slice_index == int(np.argmax(pred.slice_probs[:, 0]))


def test_uids_are_deterministic_and_distinct() -> None:
    sources, volume = make_series(n_slices=12, size=128, with_pixels=False, seed="uid")
    pred = make_prediction(volume)

    def uids(identity=IDENTITY) -> list[str]:
        seg = build_seg(sources, pred, identity)
        sr = build_sr(sources, pred, identity, seg)
        scs = build_sc(sources, volume, pred, identity)
        return [u for o in [seg, sr, *scs] for u in (o.SeriesInstanceUID, o.SOPInstanceUID)]

    first, second = uids(), uids()
    assert first == second
    assert len({u for i, u in enumerate(first) if i % 2}) == 4  # 4 distinct instances
    other = uids(replace(IDENTITY, sha256="cd" * 32))
    assert set(first).isdisjoint(other)
    for u in first:
        assert len(u) <= 64 and UID(u).is_valid
    assert object_uid("1.2.3", "x", "sr/instance") != object_uid("1.2.4", "x", "sr/instance")
    with pytest.raises(ValueError):
        object_uid("", "x", "sr/instance")


def test_bad_inputs_raise_clear_errors() -> None:
    sources, volume = make_series(n_slices=12, size=128, with_pixels=False, seed="bad")
    pred = make_prediction(volume)
    with pytest.raises(ValueError, match="11 source instances but the volume has 12"):
        build_seg(sources[:-1], pred, IDENTITY)
    with pytest.raises(ValueError, match="no source instances"):
        build_sr([], pred, IDENTITY)
    pred.exam_probs["subdural"] = float("nan")
    with pytest.raises(ValueError, match="probability for 'subdural'"):
        build_sr(sources, pred, IDENTITY)
    mixed = [*sources[:6], *make_series(n_slices=6, size=128, with_pixels=False, seed="other")[0]]
    with pytest.raises(ValueError, match="one series"):
        build_sc(mixed, volume, make_prediction(volume), IDENTITY)


def test_codes_cover_every_label() -> None:
    assert set(rc.FINDING) == set(LABELS)
    assert all(rc.ANATOMY[s].scheme_designator == "SCT" for s in SUBTYPES)
    assert rc.PROCEDURE_CT.value == "25045-6" and rc.PROCEDURE_CT.scheme_designator == "LN"


def test_overlapping_segments_round_trip(tmp_path: Path) -> None:
    """Masks that share voxels (e.g. IPH extending into IVH) keep both segments voxel-exact."""
    sources, volume = make_series(n_slices=12, size=128, with_pixels=False, seed="overlap")
    pred = make_prediction(volume, subtypes=("intraparenchymal", "intraventricular"))
    pred.masks["intraventricular"] = pred.masks["intraventricular"] | pred.masks["intraparenchymal"]
    seg = build_seg(sources, pred, IDENTITY)
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    assert_valid(tmp_path / "seg.dcm")
    back = hd.seg.segread(tmp_path / "seg.dcm")
    assert back.SegmentsOverlap == "YES"
    arr = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(s.SOPInstanceUID) for s in sources],
        segment_numbers=[1, 2],
        ignore_spatial_locations=True,
    )
    np.testing.assert_array_equal(arr[..., 0].astype(bool), pred.masks["intraparenchymal"])
    np.testing.assert_array_equal(arr[..., 1].astype(bool), pred.masks["intraventricular"])
