"""Thick + thin studies: one answer per study, whatever order its series come in.

Two series of one study (a thin 0.625 mm one of 60 slices, a thick 5 mm one of 20) are received by
a real node (storescu → DicomNode), completed by the series monitor and analysed by the real
``infer`` job with a tiny bundle whose thresholds make it positive or negative at will. What is
checked is what would go to the PACS: the ``deliver`` jobs (runnable now, held for later, or none).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from storage.lifecycle import JobKind, JobState
from storage.models import AuditEvent, Job, Result, Series, Study, utcnow
from tests.peers import SeriesSpec, make_ct_series, node_context, running_node, storescu
from tests.resilience_support import build_tiny_bundle
from triage.dicom.completion import SeriesMonitor
from triage.labels import LABELS
from triage.pipeline import answer
from triage.pipeline.answer import Delivery
from triage.pipeline.infer import FAST_READ_SLICES, run_infer

pytestmark = pytest.mark.network


def test_plan() -> None:
    assert answer.plan(positive=True, study_flagged_before=False, others_pending=True) is Delivery.NOW
    assert answer.plan(positive=True, study_flagged_before=True, others_pending=False) is Delivery.NOW
    assert answer.plan(positive=False, study_flagged_before=True, others_pending=False) is Delivery.WITHHOLD
    assert answer.plan(positive=False, study_flagged_before=False, others_pending=True) is Delivery.HOLD
    assert answer.plan(positive=False, study_flagged_before=False, others_pending=False) is Delivery.NOW


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from triage.models.inference import load_bundle

    path = build_tiny_bundle(tmp_path_factory.mktemp("bundle"))
    return {"positive": load_bundle(path, thresholds_override=dict.fromkeys(LABELS, 0.0)),
            "negative": load_bundle(path, thresholds_override=dict.fromkeys(LABELS, 1.0))}


@pytest.fixture
def study(tmp_path: Path) -> Iterator[dict[str, Any]]:
    common = {"size": 64, "accession": "ACC-TT", "study_uid": "1.2.826.0.1.3680043.8.498.777"}
    thin = make_ct_series(tmp_path / "thin", SeriesSpec(slices=60, spacing=0.625, thickness=0.625,
                                                         series_description="HEAD 0.625", **common))
    thick = make_ct_series(tmp_path / "thick", SeriesSpec(slices=20, spacing=5.0, thickness=5.0,
                                                           series_description="HEAD 5mm", **common))
    ctx = node_context(tmp_path / "node", destinations="PACS@127.0.0.1:104", stable_seconds="30")
    with running_node(ctx) as node:
        yield {"ctx": ctx, "node": node, "thin": thin, "thick": thick}
    ctx.close()


def send_and_select(st: dict[str, Any], which: str) -> int:
    """Send one series, let the monitor complete it (early: the stack is whole); its series id."""
    assert storescu(st["node"].port, st[which]).returncode == 0
    done = SeriesMonitor(st["ctx"]).tick()
    assert len(done) == 1 and done[0].selected and done[0].job_id is not None, done
    return done[0].series_id


def infer(st: dict[str, Any], series_id: int, bundle: Any) -> Any:
    ctx = st["ctx"]
    job = ctx.queue.claim("test-worker", kinds=[JobKind.INFER])
    assert job is not None and job.payload["series_id"] == series_id
    out = run_infer(ctx, job, bundle)
    ctx.queue.complete(job.id, "test-worker")
    return out


def deliveries(st: dict[str, Any], series_id: int) -> dict[str, int]:
    """{'now': runnable deliver jobs, 'held': queued for later} of one series."""
    now = utcnow() + dt.timedelta(seconds=1)
    with st["ctx"].reads() as s:
        jobs = s.execute(select(Job.run_after, Job.state).where(Job.kind == JobKind.DELIVER,
                                                                Job.series_id == series_id)).all()
    return {"now": sum(1 for j in jobs if j.run_after <= now), "held": sum(1 for j in jobs if j.run_after > now),
            "dead": sum(1 for j in jobs if j.state == JobState.DEAD)}


def flagged(st: dict[str, Any]) -> bool:
    with st["ctx"].reads() as s:
        return bool(s.scalar(select(Study.flagged)))


def test_thin_first_negative_is_held_then_withdrawn_when_the_thick_series_is_positive(
        study: dict[str, Any], bundles: dict[str, Any]) -> None:
    thin = send_and_select(study, "thin")
    assert storescu(study["node"].port, study["thick"]).returncode == 0  # arrives while thin is analysed
    out = infer(study, thin, bundles["negative"])
    assert not out.positive
    with study["ctx"].reads() as s:
        summary = s.scalar(select(Result.summary).where(Result.id == out.result_id))
    # the thin series reached the model as slabs, about as many as a thick series has slices
    assert summary["volume"]["shape"][0] == 30 <= FAST_READ_SLICES and summary["volume"]["source_slices"] == 60
    assert summary["delivery"] == "hold"
    held = deliveries(study, thin)
    assert held["now"] == 0 and held["held"] >= 2  # SR and key images wait for the thick series

    thick = SeriesMonitor(study["ctx"]).tick()[0].series_id
    out2 = infer(study, thick, bundles["positive"])
    assert out2.positive and flagged(study)
    assert deliveries(study, thick)["now"] >= 3  # SR, SEG, SC: the flag goes out at once
    assert deliveries(study, thin) == {"now": 0, "held": 0, "dead": 0}  # the conflicting negative never goes
    with study["ctx"].reads() as s:
        details = [e.details for e in s.scalars(select(AuditEvent).where(AuditEvent.event_type == "queued"))]
    assert any(d.get("held_deliveries_withdrawn") == held["held"] for d in details)


def test_thick_first_positive_then_thin_negative_is_withheld(study: dict[str, Any], bundles: dict[str, Any]) -> None:
    thick = send_and_select(study, "thick")
    assert infer(study, thick, bundles["positive"]).positive
    assert deliveries(study, thick)["now"] >= 3
    thin = send_and_select(study, "thin")
    out = infer(study, thin, bundles["negative"])
    assert not out.positive and flagged(study)  # the study's answer is never lowered
    assert deliveries(study, thin) == {"now": 0, "held": 0, "dead": 0}
    with study["ctx"].reads() as s:
        assert s.scalar(select(Result.summary).where(Result.id == out.result_id))["delivery"] == "withhold"


def test_two_negatives_release_the_held_one(study: dict[str, Any], bundles: dict[str, Any]) -> None:
    thick = send_and_select(study, "thick")
    assert storescu(study["node"].port, study["thin"]).returncode == 0
    infer(study, thick, bundles["negative"])
    n = deliveries(study, thick)["held"]
    assert n >= 2 and deliveries(study, thick)["now"] == 0
    thin = SeriesMonitor(study["ctx"]).tick()[0].series_id
    infer(study, thin, bundles["negative"])
    assert not flagged(study)
    assert deliveries(study, thick) == {"now": n, "held": 0, "dead": 0}  # released: the answer stands
    assert deliveries(study, thin)["now"] >= 2 and deliveries(study, thin)["held"] == 0


def test_a_skipped_other_series_releases_a_held_negative(study: dict[str, Any], bundles: dict[str, Any],
                                                         tmp_path: Path) -> None:
    thick = send_and_select(study, "thick")
    scout = make_ct_series(tmp_path / "scout", SeriesSpec(slices=2, size=64, study_uid="1.2.826.0.1.3680043.8.498.777",
                                                          image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    assert storescu(study["node"].port, scout).returncode == 0
    infer(study, thick, bundles["negative"])
    n = deliveries(study, thick)["held"]
    assert n >= 2
    with study["ctx"].sessions.begin() as s:  # the scout goes quiet
        s.execute(Series.__table__.update().where(Series.id != thick)
                  .values(last_received_at=utcnow() - dt.timedelta(seconds=60)))
    done = SeriesMonitor(study["ctx"]).tick()
    assert len(done) == 1 and not done[0].selected  # skipped: a localizer
    assert deliveries(study, thick) == {"now": n, "held": 0, "dead": 0}


def test_a_worker_whose_lease_passed_on_records_no_result(study: dict[str, Any], bundles: dict[str, Any]) -> None:
    """The worker computed while its lease ran out (the database away longer than the lease) and
    another worker took the job over: its result transaction checks the lease last and rolls back,
    so the study gets one result, from the holder's run, and nothing is queued twice."""
    from storage.lifecycle import StaleJob
    from storage.models import Job, Result

    ctx = study["ctx"]
    series_id = send_and_select(study, "thick")
    job = ctx.queue.claim("w-slow", kinds=[JobKind.INFER])
    assert job is not None and job.owner == "w-slow"
    with ctx.sessions.begin() as s:  # what a takeover after the lease ran out leaves in the row
        s.get(Job, job.id).lease_owner = "w-new"  # type: ignore[union-attr]
    with pytest.raises(StaleJob, match="passed to another worker"):
        run_infer(ctx, job, bundles["positive"])
    with ctx.reads() as s:
        assert s.scalars(select(Result).where(Result.series_id == series_id)).all() == []
        assert s.scalars(select(Job).where(Job.kind == JobKind.DELIVER)).all() == []
    with ctx.sessions.begin() as s:
        s.get(Job, job.id).lease_owner = "w-slow"  # type: ignore[union-attr]
    out = run_infer(ctx, job, bundles["positive"])  # the holder's run records it
    with ctx.reads() as s:
        assert [r.id for r in s.scalars(select(Result).where(Result.series_id == series_id))] == [out.result_id]
