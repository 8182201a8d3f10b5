"""Series completion and selection: quiet period, early completion, skips, reopening, STAT,
and several receivers sharing one PostgreSQL database."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from sqlalchemy import func, select

from storage import audit
from storage.models import AuditEvent, Instance, Job, Series, Study, utcnow
from tests.peers import SeriesSpec, make_ct_series, node_context, running_node, storescu, wait_for
from triage.dicom.completion import SeriesMonitor
from triage.dicom.scp import DicomNode, file_meta_bytes


def feed(node: DicomNode, path: Path) -> int:
    """Hand one file to the node's store operation (the C-STORE handler minus the socket)."""
    ds = dcmread(path)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    out = node.store(buf.getvalue(), syntax,
                     file_meta=lambda: file_meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax),
                     calling_aet="MODALITY", peer="127.0.0.1")
    return out.status


def events(ctx, kind: str) -> list[AuditEvent]:  # noqa: ANN001
    with ctx.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == kind).order_by(AuditEvent.id)))


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


@pytest.fixture
def ctx(tmp_path: Path):  # noqa: ANN201
    context = node_context(tmp_path, stable_seconds=5)
    yield context
    context.close()


def test_series_completes_after_quiet_period_and_is_queued(ctx, tmp_path: Path) -> None:  # noqa: ANN001
    node = DicomNode(ctx)
    paths = make_ct_series(tmp_path / "s", SeriesSpec(images_in_acquisition=False))
    assert [feed(node, p) for p in paths] == [0] * 20
    monitor = SeriesMonitor(ctx)
    assert monitor.tick() == []  # not quiet yet, and no count hint for an early decision
    done = monitor.tick(now=later(6))
    assert len(done) == 1 and done[0].selected and not done[0].early
    with ctx.sessions() as s:
        series = s.scalars(select(Series)).one()
        job = s.scalars(select(Job)).one()
        study = s.scalars(select(Study)).one()
    assert series.state == "selected" and series.completed_at is not None
    assert series.meta["selection"]["slices"] == 20 and series.meta["completed_early"] is False
    assert (job.kind, job.payload, job.priority) == ("infer", {"series_id": series.id, "generation": 0}, 0)
    assert job.dedupe_key == f"infer:{series.series_uid}:0"
    assert study.status == "queued" and not study.stat
    assert [e.details["instances"] for e in events(ctx, audit.SERIES_COMPLETE)] == [20]
    assert events(ctx, audit.QUEUED)[0].details["job_id"] == job.id
    assert monitor.tick(now=later(60)) == []  # nothing twice


def test_early_completion_only_for_a_full_gap_free_stack(ctx, tmp_path: Path) -> None:  # noqa: ANN001
    node = DicomNode(ctx)
    paths = make_ct_series(tmp_path / "s", SeriesSpec(slices=20))  # ImagesInAcquisition = 20
    monitor = SeriesMonitor(ctx)
    for p in paths[:-1]:
        feed(node, p)
    assert monitor.tick() == []  # 19 of 20: wait
    feed(node, paths[-1])
    done = monitor.tick()
    assert len(done) == 1 and done[0].early and done[0].selected

    # Hint matches, but a slice is missing from the middle and an extra one sits at the end.
    gappy = make_ct_series(tmp_path / "g", SeriesSpec(slices=20, positions=[5.0 * i for i in range(21) if i != 7]))
    for p in gappy:
        feed(node, p)
    assert monitor.tick() == []
    assert len(monitor.tick(now=later(6))) == 1  # the quiet period still completes it


def test_phantom_series_complete_early_and_a_single_image_waits(ctx, tmp_path: Path) -> None:  # noqa: ANN001
    """The phantom writer records ImagesInAcquisition per series, as scanners do: its head and
    bone series complete as soon as the last slice is in; the one-image localizer waits."""
    from triage.phantom.dicom_writer import Identity, write_study
    from triage.phantom.generator import PhantomOptions, generate_study

    study = generate_study(31, PhantomOptions(size=96, kind="negative"))
    files = write_study(study, Identity(index=1, seed=31), tmp_path / "p", series=("head", "bone", "localizer"))
    node = DicomNode(ctx)
    monitor = SeriesMonitor(ctx)
    for p in files["head"][:-1] + files["bone"][:-1] + files["localizer"]:
        assert feed(node, p) == 0
    assert monitor.tick() == []  # one slice short in each stack
    feed(node, files["head"][-1])
    feed(node, files["bone"][-1])
    rings = ctx.doorbell.rings
    done = monitor.tick()
    assert sorted((d.early, d.selected) for d in done) == [(True, False), (True, True)]  # bone skipped, head selected
    assert ctx.doorbell.rings == rings + 1  # the infer job is committed: this process's worker is woken
    late = monitor.tick(now=later(6))
    assert [(d.early, d.selected) for d in late] == [(False, False)]  # the localizer: quiet period, skipped


def test_non_ct_series_is_skipped_with_reason(ctx, tmp_path: Path) -> None:  # noqa: ANN001
    node = DicomNode(ctx)
    for p in make_ct_series(tmp_path / "mr", SeriesSpec(modality="MR", slices=20)):
        feed(node, p)
    done = SeriesMonitor(ctx).tick()
    assert len(done) == 1 and not done[0].selected  # complete early, then skipped
    with ctx.sessions() as s:
        series = s.scalars(select(Series)).one()
        study = s.scalars(select(Study)).one()
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    assert series.state == "skipped" and "modality MR" in series.skip_reason
    assert study.status == "skipped" and "modality MR" in study.status_reason
    assert "modality MR" in events(ctx, audit.SKIPPED)[0].details["reason"]


def test_late_instance_reopens_and_requeues_with_new_generation(ctx, tmp_path: Path) -> None:  # noqa: ANN001
    node = DicomNode(ctx)
    spec = SeriesSpec(slices=21, images_in_acquisition=False)
    paths = make_ct_series(tmp_path / "s", spec)
    for p in paths[:20]:
        feed(node, p)
    monitor = SeriesMonitor(ctx)
    assert len(monitor.tick(now=later(6))) == 1
    feed(node, paths[0])  # a duplicate does not reopen
    with ctx.sessions() as s:
        assert s.scalars(select(Series)).one().state == "selected"
    assert feed(node, paths[20]) == 0  # a new slice does
    with ctx.sessions() as s:
        series = s.scalars(select(Series)).one()
        assert (series.state, series.generation, series.instance_count) == ("receiving", 1, 21)
        assert s.scalars(select(Study)).one().status == "receiving"
    reopened = events(ctx, audit.SERIES_REOPENED)
    assert len(reopened) == 1 and reopened[0].details == {
        "previous_state": "selected", "generation": 1, "sop_instance_uid": str(dcmread(paths[20]).SOPInstanceUID)}
    assert len(monitor.tick(now=later(6))) == 1
    with ctx.sessions() as s:
        jobs = list(s.scalars(select(Job).order_by(Job.id)))
    assert [j.payload["generation"] for j in jobs] == [0, 1]
    assert jobs[1].dedupe_key.endswith(":1")


def test_stat_study_gets_priority(ctx, tmp_path: Path) -> None:  # noqa: ANN001
    node = DicomNode(ctx)
    for p in make_ct_series(tmp_path / "s", SeriesSpec(study_description="CT HEAD CODE STROKE")):
        feed(node, p)
    SeriesMonitor(ctx).tick()
    with ctx.sessions() as s:
        job = s.scalars(select(Job)).one()
        study = s.scalars(select(Study)).one()
    assert job.priority == 10 and study.stat and study.priority == 10
    assert events(ctx, audit.QUEUED)[0].details["stat_keyword"] == "CODE STROKE"


@pytest.mark.postgres
@pytest.mark.network
def test_two_receivers_and_two_monitors_share_postgresql(pg_url: str, tmp_path: Path) -> None:
    # Two receiver processes' worth of state: separate contexts (engines), one database, one store.
    store = tmp_path / "shared"
    ctx_a = node_context(store, database_url=pg_url, stable_seconds=1)
    ctx_b = node_context(store, database_url=pg_url, stable_seconds=1)
    paths = make_ct_series(tmp_path / "s", SeriesSpec(slices=24, images_in_acquisition=False), shuffle=True)
    with running_node(ctx_a) as node_a, running_node(ctx_b) as node_b:
        sends = [threading.Thread(target=storescu, args=(port, paths[i::4]))
                 for i, port in enumerate([node_a.port, node_b.port] * 2)]
        monitors = [SeriesMonitor(ctx_a), SeriesMonitor(ctx_b)]
        stop = threading.Event()
        completions: list = []

        def tick_loop(m: SeriesMonitor) -> None:
            while not stop.is_set():
                completions.extend(m.tick())
                stop.wait(0.05)

        tickers = [threading.Thread(target=tick_loop, args=(m,)) for m in monitors]
        for t in sends + tickers:
            t.start()
        for t in sends:
            t.join(300)

        def one_job() -> bool:
            with ctx_a.sessions() as s:
                return s.scalar(select(func.count()).select_from(Job)) == 1

        wait_for(one_job, timeout=60, message="the infer job")
        stop.wait(1.5)  # give both monitors a chance to (wrongly) complete it again
        stop.set()
        for t in tickers:
            t.join(30)
    with ctx_a.sessions() as s:
        series = s.scalars(select(Series)).one()
        assert s.scalar(select(func.count()).select_from(Instance)) == 24
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        assert audit.verify(s).ok
    assert series.instance_count == 24 and series.state == "selected"
    assert len(completions) == 1
    assert len(events(ctx_a, audit.SERIES_COMPLETE)) == 1
    assert sum(e.details["count"] for e in events(ctx_a, audit.RECEIVED)) == 24
    ctx_a.close()
    ctx_b.close()


def test_a_series_whose_completion_keeps_failing_is_skipped_and_health_shows_it(
        sqlite_ctx, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """A completion that raises on every tick (the old NaN bug: ~6 KB/s of tracebacks, the study
    "receiving" forever, /readyz healthy) is reported stuck, then skipped with the error as reason."""
    from reports.web.metrics import make_registry
    from triage.dicom import completion

    ctx = sqlite_ctx

    def overdue() -> float | None:
        return make_registry(ctx).get_sample_value("triage_series_overdue")

    with ctx.sessions.begin() as s:
        study = Study(study_uid="1.2.3.9", status="receiving")
        s.add(study)
        s.flush()
        s.add(Series(study_id=study.id, series_uid="1.2.3.9.1", state="receiving", instance_count=0,
                     last_received_at=utcnow() - dt.timedelta(minutes=10)))

    def boom(*_a: object, **_k: object) -> None:
        raise ValueError("Out of range float values are not JSON compliant")

    monkeypatch.setattr(completion, "select_series", boom)
    monitor = SeriesMonitor(ctx)
    assert monitor.healthy()
    for _ in range(completion.STUCK_AFTER):
        assert monitor.tick() == []
    assert not monitor.healthy()
    assert overdue() == 1.0
    for _ in range(completion.GIVE_UP_AFTER - completion.STUCK_AFTER):
        monitor.tick()
    assert monitor.healthy()
    with ctx.reads() as s:
        series = s.scalars(select(Series)).one()
        study = s.scalars(select(Study)).one()
        skipped = s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.SKIPPED)).all()
    assert series.state == "skipped" and "not JSON compliant" in series.skip_reason
    assert study.status == "skipped" and len(skipped) == 1
    assert overdue() == 0.0
