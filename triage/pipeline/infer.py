"""The ``infer`` job: one selected series generation → findings, result objects, deliveries.

Steps: assemble the volume from the stored instances, run the model bundle, write the DICOM
result objects (SEG, SR, SC) and PNG previews to the file store, record the result and findings,
supersede older results of the series, flag the study (never lowering its priority) and queue
one ``deliver`` job per object and destination plus ``notify`` jobs for positive exams.

Result object UIDs are deterministic in the input (the source instances) and the bundle
(:mod:`reports.dicom.uids`): a retry after a crash rewrites the same files and rows and the PACS
never receives duplicates, while a reopened series (new instances) gets new UIDs for its new
content, so a PACS that keeps the first copy of a UID still ends with the new finding.

A series of more than ``FAST_READ_SLICES`` slices (a thin reconstruction: 0.625 mm, 240+
slices) is read as averaged slabs of consecutive slices (:func:`triage.dicom.assembly.load_volume`,
``max_slices``), about the slice count of a thick series: its result comes in the time of a thick
series (bench/inference.py: 240 x 512 x 512 takes ~20 s, 60 slices ~4 s, 30 slices ~2 s on the
2-core development host) whichever of the two arrives first. Deliveries follow the study's one
answer (:mod:`triage.pipeline.answer`): a positive goes out at once, a negative is held while
another series of the study may still bring a result and withheld once the study is positive.

Series and study states change only through :mod:`storage.lifecycle`.
"""

from __future__ import annotations

import datetime as dt
import io
import time
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from sqlalchemy import select, update

from storage import audit, lifecycle
from storage.lifecycle import JobKind, Priority, StaleJob
from storage.models import Finding, Instance, ModelVersion, Result, ResultObject, utcnow
from storage.queue import delivery_lane
from triage.context import AppContext
from triage.dicom.header import CT_CLASSES
from triage.labels import LABELS, SUBTYPES
from triage.logging import get_logger
from triage.models.types import Prediction
from triage.pipeline import answer

log = get_logger(__name__)

#: At most this many slices (slabs) reach the model per series: a thin series is read as slabs of
#: ``ceil(n / FAST_READ_SLICES)`` averaged slices, as thick as a routine 2.5-5 mm reconstruction.
FAST_READ_SLICES = 48

@dataclass
class InferOutcome:
    result_id: int
    positive: bool
    objects: list[int]
    timings: dict[str, float]


def _encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _record_model(session: Any, bundle: Any) -> int:
    ident = bundle.identity
    mv = session.scalar(select(ModelVersion).where(ModelVersion.sha256 == ident.sha256))
    if mv is None:
        mv = ModelVersion(name=ident.name, version=ident.version, sha256=ident.sha256,
                          manifest=dict(getattr(bundle, "manifest", {}) or {}))
        session.add(mv)
        session.flush()
    return mv.id


def _png(rgb: Any) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    # previews for the web pages: fast zlib level (about 3x faster than the default 6, ~10% larger)
    Image.fromarray(rgb).save(out, format="PNG", optimize=False, compress_level=1)
    return out.getvalue()


def warm_up_reports() -> None:
    """Build, encode and render a tiny SEG, SR, SC and preview once, so the first study does not pay
    for the lazy start of highdicom, pydicom and Pillow (about 1.5 s on a busy 2-core host)."""
    from reports.dicom.keyimages import render_key_images
    from reports.dicom.sc import build_sc
    from reports.dicom.seg import build_seg
    from reports.dicom.sr import build_sr
    from reports.dicom.synthetic import IDENTITY, make_prediction, make_series

    headers, volume = make_series(n_slices=4, size=64)
    pred = make_prediction(volume)
    seg = build_seg(headers, pred, IDENTITY)
    keys = render_key_images(volume, pred)
    for ds in [seg, build_sr(headers, pred, IDENTITY, seg=seg), *build_sc(headers, volume, pred, IDENTITY,
                                                                             key_images=keys)]:
        if ds is not None:
            _encode(ds)
    for k in keys:
        _png(k.overlay_rgb)


def run_infer(ctx: AppContext, job: Any, bundle: Any) -> InferOutcome:
    """Handle one ``infer`` job (payload ``{"series_id", "generation"}``)."""
    from reports.dicom.keyimages import render_key_images
    from reports.dicom.sc import build_sc
    from reports.dicom.seg import build_seg
    from reports.dicom.sr import build_sr
    from triage.dicom.assembly import load_volume

    series_id = int(job.payload["series_id"])
    generation = int(job.payload.get("generation", 0))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # 1. Mark processing and collect the image instances of this generation.
    with ctx.sessions.begin() as s:
        started = lifecycle.start_inference(s, series_id, generation, actor=ctx.worker_id, job_id=job.id)
        rows = s.execute(
            select(Instance.path, Instance.sop_class_uid).where(Instance.series_id == series_id)
        ).all()
        paths = [ctx.store.path(r.path) for r in rows if r.sop_class_uid in CT_CLASSES]
    study_uid, series_uid, accession = started.study_uid, started.series_uid, started.accession
    study_id = started.study_id

    # 2. Volume and model.
    max_slices = min(int(ctx.settings.inference_max_slices), int(job.payload.get("max_slices") or FAST_READ_SLICES))
    volume, headers = load_volume(paths, max_slices=max_slices)
    timings["read"] = time.perf_counter() - t0
    prediction: Prediction = bundle.predict(volume)
    timings.update({k: float(v) for k, v in prediction.timings.items()})

    # 3. Result objects and previews (files first: atomic, same names on a retry).
    t1 = time.perf_counter()
    ident = bundle.identity
    objects: list[tuple[str, Dataset]] = []
    seg = build_seg(headers, prediction, ident)
    if seg is not None:
        objects.append(("seg", seg))
    objects.append(("sr", build_sr(headers, prediction, ident, seg=seg)))
    key_images = render_key_images(volume, prediction)
    objects.extend(("sc", sc) for sc in build_sc(headers, volume, prediction, ident, key_images=key_images))
    written: list[tuple[str, Dataset, str, int]] = []
    for kind, ds in objects:
        data = _encode(ds)
        rel = ctx.store.result_rel(study_uid, series_uid, f"{kind}-{ds.SOPInstanceUID}.dcm")
        ctx.store.write_atomic(rel, data, enforce_floor=False)  # processing goes on at the floor
        written.append((kind, ds, rel, len(data)))
    previews = []
    for k in key_images:
        base = f"preview-g{generation}-{k.label}-{k.slice_index}"
        plain = ctx.store.result_rel(study_uid, series_uid, f"{base}-plain.png")
        overlay = ctx.store.result_rel(study_uid, series_uid, f"{base}-overlay.png")
        ctx.store.write_atomic(plain, _png(k.plain_rgb), enforce_floor=False)
        ctx.store.write_atomic(overlay, _png(k.overlay_rgb), enforce_floor=False)
        previews.append({"label": k.label, "slice": int(k.slice_index), "plain": plain, "overlay": overlay})
    timings["objects"] = time.perf_counter() - t1

    # 4. One transaction: result, findings, objects, supersede, flag, deliveries, audit.
    positive = prediction.positive
    priority = Priority.POSITIVE if positive else Priority.ROUTINE
    with ctx.sessions.begin() as s:
        series = lifecycle.current_series(s, series_id, generation)
        delivery = answer.plan(positive=positive, study_flagged_before=bool(series.study.flagged),
                               others_pending=lifecycle.study_pending(s, study_id, besides=series_id))
        mv_id = _record_model(s, bundle)
        s.execute(update(Result).where(Result.series_id == series_id).values(superseded=True))
        timings["total"] = time.perf_counter() - t0
        result = Result(
            study_id=study_id, series_id=series_id, job_id=job.id, model_version_id=mv_id, generation=generation,
            positive=positive, total_volume_ml=float(prediction.volumes_ml.get("any", 0.0)),
            abc2_ml=float(prediction.abc2_ml.get("any", 0.0)), key_slices=prediction.key_slices,
            timings=timings, device=prediction.device,
            summary={
                "previews": previews,
                "bundle": {"name": ident.name, "version": ident.version, "sha256": ident.sha256},
                "exam_probs": prediction.exam_probs,
                "input_domain": prediction.input_domain,
                "volume": {"shape": list(volume.shape), "tilt_deg": volume.tilt_deg,
                           "slice_spacing": volume.slice_spacing, "pixel_spacing": list(volume.pixel_spacing),
                           "source_slices": len(paths), "max_slices": max_slices},
                "delivery": str(delivery),
            },
        )
        s.add(result)
        s.flush()
        for label in LABELS:
            ks = prediction.key_slices.get(label) or []
            s.add(Finding(
                result_id=result.id, label=label, probability=float(prediction.exam_probs[label]),
                threshold=float(prediction.thresholds[label]), present=bool(prediction.present[label]),
                volume_ml=float(prediction.volumes_ml.get(label, 0.0)),
                abc2_ml=float(prediction.abc2_ml.get(label, 0.0)), key_slice=int(ks[0]) if ks else None,
            ))
        object_ids: list[int] = []
        for kind, ds, rel, size in written:
            existing = s.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == ds.SOPInstanceUID))
            if existing is not None:  # a retry of the same job: the same object, now for this result
                existing.result_id, existing.path, existing.size = result.id, rel, size
                obj = existing
            else:
                obj = ResultObject(result_id=result.id, kind=kind, sop_class_uid=ds.SOPClassUID,
                                   sop_instance_uid=ds.SOPInstanceUID, series_uid=ds.SeriesInstanceUID,
                                   path=rel, size=size)
                s.add(obj)
            s.flush()
            object_ids.append(obj.id)
        lifecycle.record_result(s, series, positive=positive)
        details = {
            "job_id": job.id, "result_id": result.id, "positive": positive, "generation": generation,
            "bundle": str(ident), "device": prediction.device, "input_domain": prediction.input_domain,
            "probabilities": {k: round(float(v), 4) for k, v in prediction.exam_probs.items()},
            "volumes_ml": {k: round(float(v), 3) for k, v in prediction.volumes_ml.items()},
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        audit.record(s, audit.INFERRED, actor=ctx.worker_id, study_uid=study_uid, series_uid=series_uid,
                     accession=accession, details=details)
        for (kind, ds, _rel, size), oid in zip(written, object_ids, strict=True):
            audit.record(s, audit.RESULT_WRITTEN, actor=ctx.worker_id, study_uid=study_uid, series_uid=series_uid,
                         accession=accession, details={"kind": kind, "sop_instance_uid": ds.SOPInstanceUID,
                                                       "result_object_id": oid, "size": size})
        if positive:
            audit.record(s, audit.FLAGGED, actor=ctx.worker_id, study_uid=study_uid, series_uid=series_uid,
                         accession=accession, details={"subtypes": [t for t in SUBTYPES if prediction.present[t]]})
        # last, after the audit chain's lock (the queue's order): a worker whose lease ran out while it
        # computed (the database away longer than the lease) records nothing; the new holder's run does
        owner = getattr(job, "owner", "")
        if owner and not ctx.queue.heartbeat(job.id, owner, session=s):
            raise StaleJob(f"the lease of job {job.id} passed to another worker while {owner} computed")
    if prediction.out_of_domain:  # ids only: no PHI in logs
        domain = prediction.input_domain or {}
        log.warning("series outside the model's input domain", result_id=result.id, job_id=job.id,
                    distance=domain.get("distance"), threshold=domain.get("threshold"))
    # 5. Deliveries and notifications (own transactions; dedupe keys make this idempotent).
    _queue_outbound(ctx, result.id, object_ids, written, study_id, series_id, priority, positive,
                    study_uid, series_uid, accession, delivery)
    with ctx.sessions.begin() as s:  # after our own deliveries are queued: see answer.settle
        answer.settle(s, ctx.queue, study_id, actor=ctx.worker_id)
    return InferOutcome(result.id, positive, object_ids, timings)


def _queue_outbound(ctx: AppContext, result_id: int, object_ids: list[int], written: list, study_id: int,
                    series_id: int, priority: int, positive: bool, study_uid: str, series_uid: str,
                    accession: str, delivery: answer.Delivery = answer.Delivery.NOW) -> None:
    s = ctx.settings
    if delivery is answer.Delivery.WITHHOLD:  # the study is positive from another series already
        with ctx.sessions.begin() as sess:
            audit.record(sess, audit.QUEUED, actor=ctx.worker_id, study_uid=study_uid, series_uid=series_uid,
                         accession=accession, details={"deliveries": 0, "result_id": result_id,
                                                       "withheld": "negative result of a study already "
                                                                   "positive from another series"})
        return
    run_after = utcnow() + dt.timedelta(seconds=answer.HOLD_SECONDS) if delivery is answer.Delivery.HOLD else None
    # SR first, then SEG, then SC: the finding reaches the PACS before the pictures.
    order = {"sr": 0, "seg": 1, "sc": 2}
    pairs = sorted(zip(written, object_ids, strict=True), key=lambda p: order.get(p[0][0], 9))
    queued = 0
    for dest in s.destinations:
        for (_kind, ds, _rel, _size), oid in pairs:
            ctx.queue.enqueue(
                JobKind.DELIVER, {"result_object_id": oid, "destination": str(dest)}, priority=priority,
                dedupe_key=f"deliver:{ds.SOPInstanceUID}:{dest}", study_id=study_id, series_id=series_id,
                lane=delivery_lane(dest),  # one destination's deliveries go out in order (storage/queue.py)
                run_after=run_after,  # held: released by answer.settle once the study's answer stands
            )
            queued += 1
    channels = []
    if positive and s.webhook_url:
        channels.append("webhook")
    if positive and s.hl7_destination:
        channels.append("hl7")
    for ch in channels:
        ctx.queue.enqueue(JobKind.NOTIFY, {"result_id": result_id, "channel": ch}, priority=priority,
                          dedupe_key=f"notify:{result_id}:{ch}", study_id=study_id, series_id=series_id)
    if queued or channels:
        with ctx.sessions.begin() as sess:
            audit.record(sess, audit.QUEUED, actor=ctx.worker_id, study_uid=study_uid, series_uid=series_uid,
                         accession=accession, details={"deliveries": queued, "notifications": channels,
                                                       "result_id": result_id, "priority": priority,
                                                       "held": delivery is answer.Delivery.HOLD})
