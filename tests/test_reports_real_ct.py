"""Result objects on a real, gantry-tilted, unevenly spaced GE head CT (headers and pixels).

The series lives outside the repository (``/work/shared/real-ct/ge-head-tilted``); the test
is skipped where it is absent. It runs the node's own assembly, a negative prediction (no
SEG), and a SEG with a small synthetic mask to exercise the tilted real geometry.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest

from reports.dicom import build_sc, build_seg, build_sr
from reports.dicom.synthetic import IDENTITY, make_prediction
from tests.conftest import REAL_CT
from tests.test_reports_dicom import assert_valid

# Inherited from the source series (dciodvfy warns the same on its CT images): empty Study
# Date/Time/ID and the single-component patient name "REMOVED".
SOURCE_WARNINGS = (
    r"needed to build DICOMDIR - Study (Date|Time|ID)",
    r"Patient's Name .* Retired Person Name form",
)

pytestmark = pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"real CT not present at {REAL_CT}")


@pytest.fixture(scope="module")
def real():  # noqa: ANN201
    from triage.dicom.assembly import load_series_dir

    return load_series_dir(REAL_CT)


def test_negative_on_real_tilted_ct(real, tmp_path) -> None:  # noqa: ANN001
    volume, sources = real
    assert abs(volume.tilt_deg) > 10  # the point of this series
    pred = make_prediction(volume, positive=False)
    assert build_seg(sources, pred, IDENTITY) is None
    sr = build_sr(sources, pred, IDENTITY)
    scs = build_sc(sources, volume, pred, IDENTITY)
    assert len(scs) == 1
    for name, ds in [("sr", sr), ("sc", scs[0])]:
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        assert_valid(tmp_path / f"{name}.dcm", SOURCE_WARNINGS)
    assert scs[0].PatientOrientation[1] in ("PF", "PH", "FP", "HP")  # oblique column direction
    # Empty Type 2 attributes of the source stay present (and empty) in the derived objects.
    assert "AccessionNumber" in sr and sr.AccessionNumber == sources[0].AccessionNumber


def test_seg_on_real_tilted_ct_round_trips(real, tmp_path) -> None:  # noqa: ANN001
    volume, sources = real
    pred = make_prediction(volume, subtypes=("subdural",))
    seg = build_seg(sources, pred, IDENTITY)
    assert seg is not None
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    assert_valid(tmp_path / "seg.dcm", SOURCE_WARNINGS)
    back = hd.seg.segread(tmp_path / "seg.dcm")
    arr = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(s.SOPInstanceUID) for s in sources],
        segment_numbers=[1],
        ignore_spatial_locations=True,
    )
    np.testing.assert_array_equal(arr[..., 0].astype(bool), pred.masks["subdural"])
    sr = build_sr(sources, pred, IDENTITY, seg)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert_valid(tmp_path / "sr.dcm", SOURCE_WARNINGS)
