"""TID 1500 Measurement Report (Comprehensive 3D SR) with the per-label findings.

Layout (always six measurement groups, in :data:`triage.labels.LABELS` order), see
docs/results-format.md for every content item:

* a TID 1411 volumetric group that references the label's SEG segment when the SEG has one,
  else a TID 1501 measurement group;
* Finding = the label's concept, Finding Site = its anatomy (``reports.dicom.codes``);
* NUM "Probability" (UCUM ``1``), NUM "Threshold Value" (UCUM ``1``), NUM "Volume" (mL, method
  "Sum of segmented voxel method") and NUM "Volume" (mL, method "LWH method for volume of
  ellipsoid" = ABC/2), each with the algorithm name, version and bundle sha256;
* CODE evaluation <Finding> = Present | Absent at the bundle's threshold, and in the "any"
  group the exam-level flag Priority = Urgent Procedure | Routine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes

from reports.dicom import codes
from reports.dicom.common import (
    MANUFACTURER,
    SERIES_NUMBER,
    check_sources,
    copy_patient_study,
    series_description,
    with_type2,
)
from reports.dicom.seg import present_segments
from reports.dicom.uids import device_uid, object_uid, source_key
from triage.labels import DISPLAY, LABELS, SHORT
from triage.models.types import BundleIdentity, Prediction

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _algorithm(identity: BundleIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=identity.name[:64], version=identity.version[:64], parameters=[f"bundle_sha256={identity.sha256}"]
    )


def _num(value: float, label: str, what: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} for {label!r} is not a finite number: {value!r}")
    return v


def _measurements(label: str, prediction: Prediction, identity: BundleIdentity) -> list[hd.sr.Measurement]:
    algo = _algorithm(identity)
    prob = _num(prediction.exam_probs.get(label, 0.0), label, "probability")
    thr = _num(prediction.thresholds.get(label, 0.5), label, "threshold")
    vol = max(0.0, _num(prediction.volumes_ml.get(label, 0.0), label, "volume"))
    abc2 = max(0.0, _num(prediction.abc2_ml.get(label, 0.0), label, "ABC/2 volume"))
    return [
        hd.sr.Measurement(name=codes.PROBABILITY, value=round(prob, 6), unit=codes.UNIT_ONE, algorithm_id=algo),
        hd.sr.Measurement(name=codes.THRESHOLD, value=round(thr, 6), unit=codes.UNIT_ONE, algorithm_id=algo),
        hd.sr.Measurement(
            name=codes.VOLUME, value=round(vol, 3), unit=codes.UNIT_ML, method=codes.METHOD_VOXEL_SUM, algorithm_id=algo
        ),
        hd.sr.Measurement(
            name=codes.VOLUME, value=round(abc2, 3), unit=codes.UNIT_ML, method=codes.METHOD_ABC2, algorithm_id=algo
        ),
    ]


def _evaluations(label: str, prediction: Prediction) -> list[hd.sr.QualitativeEvaluation]:
    present = bool(prediction.present.get(label, False))
    out = [hd.sr.QualitativeEvaluation(codes.FINDING[label], codes.PRESENT if present else codes.ABSENT)]
    if label == "any":
        out.append(hd.sr.QualitativeEvaluation(codes.PRIORITY, codes.URGENT if prediction.positive else codes.ROUTINE))
        if prediction.input_domain is not None:  # only when the bundle checks it
            out.append(hd.sr.QualitativeEvaluation(codes.INPUT_DOMAIN,
                                                   codes.NO if prediction.out_of_domain else codes.YES))
    return out


def measurement_groups(
    sources: Sequence[Dataset], prediction: Prediction, identity: BundleIdentity, seg: Dataset | None = None
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    series_uid = str(sources[0].SeriesInstanceUID)
    segment_of: dict[str, int] = {}
    if seg is not None:
        # Segment numbers by label as written in the SEG (robust to any numbering).
        by_display = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
        # not "any": its segment is the blood under no called subtype, its group's volume the total
        segment_of = {
            lab: by_display[DISPLAY[lab]]
            for lab in present_segments(prediction) if lab != "any" and DISPLAY[lab] in by_display
        }
    groups: list = []
    for label in LABELS:
        tracking = hd.sr.TrackingIdentifier(
            uid=object_uid(series_uid, identity.sha256, f"track/{label}"), identifier=f"{SHORT[label]}"
        )
        common = dict(
            tracking_identifier=tracking,
            finding_type=codes.FINDING[label],
            finding_sites=[hd.sr.FindingSite(codes.ANATOMY[label])],
            measurements=_measurements(label, prediction, identity),
            qualitative_evaluations=_evaluations(label, prediction),
        )
        if seg is not None and label in segment_of:
            ref = hd.sr.ReferencedSegment(
                sop_class_uid=SEG_STORAGE,
                sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=segment_of[label],
                source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
            )
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **common))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
    return groups


def build_sr(
    sources: Sequence[Dataset], prediction: Prediction, identity: BundleIdentity, seg: Dataset | None = None
) -> Dataset:
    """The TID 1500 report; ``seg`` (from :func:`~reports.dicom.seg.build_seg`) adds segment references."""
    check_sources(sources)
    series_uid = str(sources[0].SeriesInstanceUID)
    device = hd.sr.ObserverContext(
        observer_type=pcodes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(identity.sha256),
            name=identity.name[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{identity.name} {identity.version}"[:64],
            serial_number=identity.sha256[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.PROCEDURE_CT,
        imaging_measurements=measurement_groups(sources, prediction, identity, seg),
    )
    evidence = [with_type2(s) for s in sources] + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=object_uid(series_uid, identity.sha256, "sr/series"),
        series_number=SERIES_NUMBER["sr"],
        sop_instance_uid=object_uid(source_key(sources), identity.sha256, "sr/instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description("sr", prediction),
    )
    copy_patient_study(sources[0], sr)
    sr.CodingSchemeIdentificationSequence = [codes.private_scheme_identification()]
    return sr
