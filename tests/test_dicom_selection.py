"""Selection rules on recorded headers: which series the model may see, and why not."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import REAL_CT, make_settings
from tests.peers import SeriesSpec, make_ct_dataset
from triage.dicom.header import header_from_dataset
from triage.dicom.selection import is_stat, select_series


def metas_for(spec: SeriesSpec) -> list[dict]:
    offsets = list(spec.positions) if spec.positions is not None else [i * spec.spacing for i in range(spec.slices)]
    return [header_from_dataset(make_ct_dataset(spec, i, z), True).meta for i, z in enumerate(offsets)]


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path)


def test_plain_axial_head_ct_is_selected(settings) -> None:
    r = select_series(settings, metas_for(SeriesSpec()))
    assert r.ok, r.reason
    assert r.meta["slices"] == 20
    assert r.meta["spacing_mm"] == {"median": 5.0, "min": 5.0, "max": 5.0}
    assert r.meta["uneven_spacing"] is False
    assert r.meta["tilt_deg"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (SeriesSpec(modality="MR"), "modality MR"),
        (SeriesSpec(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "localizer"),
        (SeriesSpec(contrast="IOHEXOL"), "contrast agent"),
        (SeriesSpec(kernel="BONEPLUS"), "bone/sharp"),
        (SeriesSpec(series_description="CTA HEAD"), "excluded keyword 'CTA'"),
        (SeriesSpec(series_description="HEAD 5mm BONE"), "excluded keyword 'BONE'"),
        (SeriesSpec(orientation=(0, 1, 0, 0, 0, -1)), "not axial"),
        (SeriesSpec(thickness=10.0, spacing=10.0), "slice thickness 10 mm"),
        (SeriesSpec(slices=8), "fewer than the minimum 16"),
        (SeriesSpec(body_part="CHEST", series_description="THORAX", study_description="CT CHEST"), "not a head"),
        (SeriesSpec(body_part="", series_description="AXIAL 5MM", study_description="ABDOMEN"), "not a head study"),
        (SeriesSpec(positions=[0, 5, 10, 10, 15] + [20 + 5 * i for i in range(15)]), "duplicate slice positions"),
    ],
)
def test_rejected_series_name_their_reason(settings, spec: SeriesSpec, words: str) -> None:
    r = select_series(settings, metas_for(spec))
    assert not r.ok
    assert words in r.reason, r.reason


def test_keywords_match_word_starts_only(settings) -> None:
    # "ACUTA" contains "CTA" but is not the CT angiography keyword.
    r = select_series(settings, metas_for(SeriesSpec(series_description="CRANE ACUTA")))
    assert r.ok, r.reason


def test_head_from_description_when_body_part_missing(settings) -> None:
    r = select_series(settings, metas_for(SeriesSpec(body_part="", series_description="AX 5mm",
                                                     study_description="CT BRAIN W/O")))
    assert r.ok, r.reason


def test_tilt_recorded_and_limited(tmp_path: Path) -> None:
    spec = SeriesSpec(tilt_deg=18.5)
    r = select_series(make_settings(tmp_path), metas_for(spec))
    assert r.ok and r.meta["tilt_deg"] == pytest.approx(18.5, abs=0.01)
    assert "tilted 18.5" in r.reason
    strict = select_series(make_settings(tmp_path, selection_max_tilt_deg=10), metas_for(spec))
    assert not strict.ok and "18.5° from the patient axis" in strict.reason


def test_uneven_spacing_allowed_and_recorded_or_refused(tmp_path: Path) -> None:
    spec = SeriesSpec(positions=[2.5 * i for i in range(10)] + [25 + 5 * i for i in range(10)])
    r = select_series(make_settings(tmp_path), metas_for(spec))
    assert r.ok and r.meta["uneven_spacing"] is True
    assert r.meta["spacing_mm"]["min"] == 2.5 and r.meta["spacing_mm"]["max"] == 5.0
    strict = select_series(make_settings(tmp_path, selection_allow_uneven_spacing="false"), metas_for(spec))
    assert not strict.ok and "uneven slice spacing" in strict.reason


def test_missing_slice_recorded(settings) -> None:
    spec = SeriesSpec(positions=[5 * i for i in range(20) if i != 9])
    r = select_series(settings, metas_for(spec))
    assert r.ok
    assert r.meta["missing_slices"] == [{"after_index": 8, "gap_mm": 10.0}]
    assert "missing slices" in r.reason


def test_non_image_instances_are_ignored_but_all_non_ct_is_skipped(settings) -> None:
    metas = metas_for(SeriesSpec())
    classes = ["1.2.840.10008.5.1.4.1.1.2"] * len(metas)
    sr = {"modality": "SR"}
    assert select_series(settings, [*metas, sr], [*classes, "1.2.840.10008.5.1.4.1.1.88.22"]).ok
    r = select_series(settings, [sr], ["1.2.840.10008.5.1.4.1.1.88.22"])
    assert not r.ok and "no CT image instances" in r.reason


def test_stat_keywords(settings) -> None:
    assert is_stat(settings, metas_for(SeriesSpec(study_description="CT HEAD CODE STROKE", slices=2))) == "CODE STROKE"
    assert is_stat(settings, metas_for(SeriesSpec(slices=2, extra={"RequestPriority": "STAT"}))) == "STAT"
    assert is_stat(settings, metas_for(SeriesSpec(slices=2))) is None


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="real CT sample not present")
def test_real_tilted_ge_head_is_selected_with_tilt_and_uneven_spacing(settings) -> None:
    metas = [header_from_dataset(dcmread(p, stop_before_pixels=True), True).meta for p in sorted(REAL_CT.glob("*.dcm"))]
    r = select_series(settings, metas)
    assert r.ok, r.reason
    assert r.meta["tilt_deg"] == pytest.approx(18.5, abs=0.01)
    assert r.meta["gantry_tilt_deg"] == pytest.approx(18.5)
    assert r.meta["spacing_mm"]["min"] == pytest.approx(1.08, abs=0.01)
    assert r.meta["spacing_mm"]["max"] == pytest.approx(6.99, abs=0.01)
    assert r.meta["uneven_spacing"] is True
    assert r.meta["missing_slices"] == []  # 4 mm then 7 mm slices: thicker slices are not gaps
