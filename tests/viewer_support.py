"""A study with real stored instances and real result objects, for the viewer and DICOMweb tests.

The instances (a synthetic head CT from :mod:`reports.dicom.synthetic`) are written to the file
store and recorded by the receiver's own recorder (:func:`triage.dicom.recorder.record_batch`);
the result comes from the real inference job (:func:`triage.pipeline.infer.run_infer`) with a
stand-in bundle whose prediction is :func:`reports.dicom.synthetic.make_prediction` (blobs for
the subtypes asked for). So the SEG, SR, SC objects, previews, findings and key slices are what the
pipeline writes, without running a network.

Instance numbers run *against* the slice order (the first slice along the normal has the highest
number, like a scanner that numbers from the vertex down) and start at 101, so a page that shows
an array index instead of the source's numbering is caught.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select

from reports.dicom.synthetic import IDENTITY, make_prediction, make_series
from storage import lifecycle
from storage.db import session_scope
from storage.models import Instance, Result, ResultObject, Series, Study
from triage.context import AppContext
from triage.dicom.header import header_from_dataset
from triage.dicom.recorder import InstanceRecord, record_batch
from triage.models.types import Prediction

FIRST_INSTANCE_NUMBER = 101


class StandInBundle:
    """What ``run_infer`` needs of a bundle: identity, manifest and ``predict``."""

    def __init__(self, positive: bool, subtypes: tuple[str, ...]) -> None:
        self.identity = IDENTITY
        self.manifest = {"name": IDENTITY.name, "trained_on": "test blobs"}
        self.positive = positive
        self.subtypes = subtypes

    def predict(self, volume: Any) -> Prediction:
        pred = make_prediction(volume, positive=self.positive, subtypes=self.subtypes)
        pred.device = "cpu"
        return pred


@dataclass
class ImagedStudy:
    study_id: int
    study_uid: str
    series_id: int
    series_uid: str
    accession: str
    result_id: int
    #: stored instances in slice order along the normal: (sop uid, instance number, file bytes)
    slices: list[tuple[str, int, bytes]]
    seg_uid: str | None
    seg_series_uid: str | None


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def seed_imaged_study(ctx: AppContext, *, seed: str = "viewer", n_slices: int = 40, size: int = 128,
                      accession: str = "CT-VIEW-1", patient_name: str = "Doe^Jane", patient_id: str = "PID0001",
                      positive: bool = True, subtypes: tuple[str, ...] = ("intraparenchymal", "subdural"),
                      ) -> ImagedStudy:
    """Store a ``n_slices`` series through the recorder and run the real inference job on it."""
    from triage.pipeline.infer import run_infer

    headers, _ = make_series(n_slices=n_slices, size=size, seed=seed)
    records = []
    slices: list[tuple[str, int, bytes]] = []
    for k, ds in enumerate(headers):
        ds.InstanceNumber = FIRST_INSTANCE_NUMBER + (n_slices - 1 - k)
        ds.AccessionNumber = accession
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        data = _encode(ds)
        rel = ctx.store.instance_rel(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        ctx.store.write_atomic(rel, data)
        records.append(InstanceRecord(header_from_dataset(ds, True), rel, len(data), hashlib.sha256(data).hexdigest(),
                                      str(ds.file_meta.TransferSyntaxUID), "CT_SCANNER", "127.0.0.1"))
        slices.append((str(ds.SOPInstanceUID), int(ds.InstanceNumber), data))
    record_batch(ctx.sessions, records)
    study_uid, series_uid = str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID)
    with session_scope(ctx.sessions) as s:
        series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        assert lifecycle.complete_series(s, series.id, series.generation, series.instance_count)
        s.refresh(series)
        lifecycle.select_for_inference(s, series, series.study, stat=False)
        series_id, generation = series.id, series.generation
    ctx.queue.enqueue("infer", {"series_id": series_id, "generation": generation}, series_id=series_id)
    job = ctx.queue.claim("test-worker", kinds=["infer"])
    assert job is not None
    outcome = run_infer(ctx, job, StandInBundle(positive, subtypes))
    ctx.queue.complete(job.id, "test-worker")
    with session_scope(ctx.sessions) as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        seg = s.scalars(select(ResultObject).where(ResultObject.result_id == outcome.result_id,
                                                   ResultObject.kind == "seg")).first()
        assert s.get(Result, outcome.result_id) is not None
        n_rows = len(s.scalars(select(Instance.id).where(Instance.series_id == series_id)).all())
        assert n_rows == n_slices
        return ImagedStudy(study_id=study.id, study_uid=study_uid, series_id=series_id, series_uid=series_uid,
                           accession=accession, result_id=outcome.result_id, slices=slices,
                           seg_uid=seg.sop_instance_uid if seg else None,
                           seg_series_uid=seg.series_uid if seg else None)


def hu_of(data: bytes) -> np.ndarray:
    """The HU of one stored instance (for comparing with what the viewer receives)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
