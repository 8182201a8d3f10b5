"""``/metrics`` in Prometheus text format, from the database at scrape time.

The database is the shared state of all roles, so one web process reports the whole node
(receiver, workers, deliveries). Gauges are current states, read per scrape. Counters that
would otherwise need a pass over growing tables (instances received, from the audit trail;
results, results outside the input domain and the stage-duration histogram, from ``results``;
delivery attempts, from ``deliveries``) are kept incrementally: :class:`Totals` holds the sums
up to a cursor (the last row id counted) and lives in ``node_settings`` (:data:`STATE_KEY`), so
every web process, and a restarted one, continues from it. A scrape reads only the rows after
the cursor, so its cost follows the rows added since the previous scrape, not the table size.

Why counting by id is exact: audit ids are assigned in commit order under the chain lock
(storage/audit.py). Other tables' ids are not: a transaction may commit a lower id after a
higher one is visible. Rows younger than :data:`SETTLE` are therefore counted on each scrape
but not folded into the stored totals until they are older, so a late commit is still seen
(unless its transaction stayed open longer than ``SETTLE``). Counters never fall: each process
also keeps the highest value it reported for every series. Nothing here carries patient data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, insert, select, update
from sqlalchemy.orm import Session

from storage import audit
from storage.db import session_scope
from storage.lifecycle import LIVE_JOB_STATES, JobState, SeriesState, StudyStatus, overdue_after
from storage.models import (
    RESULT_OUT_OF_DOMAIN,
    AuditEvent,
    Delivery,
    Instance,
    Job,
    JobLane,
    Result,
    Series,
    Setting,
    Study,
    Worker,
)
from triage.context import AppContext
from triage.logging import get_logger

log = get_logger(__name__)

# Seconds; covers sub-second stages up to a slow CPU inference.
STAGE_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
JOB_STATES: tuple[str, ...] = tuple(JobState)
STATE_KEY = "metrics_totals"  # node_settings: JSON of Totals
SETTLE = dt.timedelta(minutes=5)  # rows younger than this are counted live, not folded into the totals
SCAN_BATCH = 50_000  # rows read per table per scrape (a backlog is caught up over several scrapes)
AUDIT_BATCHES = 20  # audit id ranges of SCAN_BATCH read per scrape at most


def stage_histograms(timings: list[dict[str, object]]) -> dict[str, tuple[list[int], float, int]]:
    """Per stage: cumulative bucket counts (as Prometheus wants, +Inf last), sum, count."""
    out: dict[str, tuple[list[int], float, int]] = {}
    for entry in timings:
        for stage, value in (entry or {}).items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                continue
            buckets, total, n = out.get(stage, ([0] * (len(STAGE_BUCKETS) + 1), 0.0, 0))
            for i, le in enumerate(STAGE_BUCKETS):
                if value <= le:
                    buckets[i] += 1
            buckets[-1] += 1
            out[stage] = (buckets, total + float(value), n + 1)
    return out


def _empty_hist() -> list[float]:
    return [0.0] * (len(STAGE_BUCKETS) + 3)  # cumulative buckets with +Inf, then sum, then count


def _add_timings(hists: dict[str, list[float]], timings: Any) -> None:
    for stage, (buckets, total, n) in stage_histograms([timings if isinstance(timings, dict) else {}]).items():
        h = hists.setdefault(stage, _empty_hist())
        for i, c in enumerate(buckets):
            h[i] += c
        h[-2] += total
        h[-1] += n


@dataclasses.dataclass
class Totals:
    """Counter values up to a cursor per source table (JSON in ``node_settings``)."""

    audit_cursor: int = 0
    received: float = 0.0
    results_cursor: int = 0
    results: dict[str, float] = dataclasses.field(default_factory=lambda: {"true": 0.0, "false": 0.0})
    out_of_domain: float = 0.0
    stages: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    deliveries_cursor: int = 0
    deliveries: dict[str, float] = dataclasses.field(default_factory=dict)  # "channel|ok" or "channel|failed"

    @classmethod
    def load(cls, raw: str) -> Totals:
        try:
            data = json.loads(raw) if raw else {}
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (ValueError, TypeError):
            return cls()

    def dump(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def copy(self) -> Totals:
        return Totals.load(self.dump())


def _scan_audit(s: Session, t: Totals) -> None:
    """Fold the audit events after the cursor into ``received`` (one event covers
    ``details.count`` instances stored together). Reads id ranges on the primary key."""
    weight = case((AuditEvent.event_type == audit.RECEIVED,
                   func.coalesce(AuditEvent.details["count"].as_integer(), 1)), else_=0)
    for _ in range(AUDIT_BATCHES):
        top, added = s.execute(select(func.max(AuditEvent.id), func.coalesce(func.sum(weight), 0)).where(
            AuditEvent.id > t.audit_cursor, AuditEvent.id <= t.audit_cursor + SCAN_BATCH)).one()
        if top is None:
            return
        t.received += float(added or 0)
        t.audit_cursor = int(top)


def _scan_results(s: Session, t: Totals, live: Totals, now: dt.datetime) -> None:
    """Results after the cursor: settled ones into ``t``, younger ones only into ``live``."""
    rows = s.execute(select(Result.id, Result.positive, Result.timings, RESULT_OUT_OF_DOMAIN.label("ood"),
                            Result.created_at).where(Result.id > t.results_cursor)
                     .order_by(Result.id).limit(SCAN_BATCH)).all()
    settled = True
    for rid, positive, timings, ood, created in rows:
        settled = settled and created is not None and created <= now - SETTLE
        for target in ((t, live) if settled else (live,)):
            key = "true" if positive else "false"
            target.results[key] = target.results.get(key, 0.0) + 1
            target.out_of_domain += 1 if ood else 0
            _add_timings(target.stages, timings)
        if settled:
            t.results_cursor = rid


def _scan_deliveries(s: Session, t: Totals, live: Totals, now: dt.datetime) -> None:
    rows = s.execute(select(Delivery.id, Delivery.channel, Delivery.ok, Delivery.started_at)
                     .where(Delivery.id > t.deliveries_cursor).order_by(Delivery.id).limit(SCAN_BATCH)).all()
    settled = True
    for did, channel, ok, started in rows:
        settled = settled and started is not None and started <= now - SETTLE
        key = f"{channel}|{'ok' if ok else 'failed'}"
        for target in ((t, live) if settled else (live,)):
            target.deliveries[key] = target.deliveries.get(key, 0.0) + 1
        if settled:
            t.deliveries_cursor = did


def advance_totals(s: Session, now: dt.datetime) -> Totals:
    """The counters now: the stored totals moved forward over the new rows (and stored again,
    compare-and-set, so concurrent web processes agree), plus the rows too young to settle."""
    old = str(s.scalar(select(Setting.value).where(Setting.key == STATE_KEY)) or "")
    t = Totals.load(old)
    before = t.dump()
    live = t.copy()
    _scan_audit(s, t)
    live.audit_cursor, live.received = t.audit_cursor, t.received
    _scan_results(s, t, live, now)
    _scan_deliveries(s, t, live, now)
    if t.dump() != before:
        table = Setting.__table__
        if old:
            s.execute(update(table).where(table.c.key == STATE_KEY, table.c.value == old).values(value=t.dump()))
        else:
            s.execute(insert(table).values(key=STATE_KEY, value=t.dump()))
    return live


class NodeCollector(Collector):
    """Reads the database on every scrape: gauges directly, counters incrementally (Totals)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._high: dict[tuple[str, tuple[str, ...]], float] = {}  # highest value reported per series
        self._lock = threading.Lock()

    def _mono(self, name: str, labels: tuple[str, ...], value: float) -> float:
        """Never report less than before (a deleted row must not make a counter fall)."""
        with self._lock:
            key = (name, labels)
            high = max(self._high.get(key, 0.0), float(value))
            self._high[key] = high
            return high

    def _totals(self, now: dt.datetime) -> Totals:
        from sqlalchemy.exc import IntegrityError

        try:
            with session_scope(self.ctx.sessions) as s:
                return advance_totals(s, now)
        except IntegrityError:  # another process stored the first totals at the same time: read theirs
            with session_scope(self.ctx.sessions) as s:
                return advance_totals(s, now)

    def collect(self) -> Iterator[Metric]:
        now = dt.datetime.now(dt.UTC)
        totals = self._totals(now)
        received = CounterMetricFamily(
            "triage_instances_received", "DICOM instances received (sum of 'received' audit events' counts)")
        received.add_metric([], self._mono("received", (), totals.received))
        yield received

        results = CounterMetricFamily("triage_results", "Inference results written", labels=["positive"])
        for pos in ("true", "false"):
            results.add_metric([pos], self._mono("results", (pos,), totals.results.get(pos, 0.0)))
        yield results

        # A rise means series unlike the model's training studies are arriving (a new scanner or
        # protocol): the results on them are not to be relied on (triage/models/domain.py).
        ood = CounterMetricFamily("triage_results_out_of_domain",
                                  "Inference results on series outside the model's input domain")
        ood.add_metric([], self._mono("ood", (), totals.out_of_domain))
        yield ood

        deliveries = CounterMetricFamily("triage_deliveries", "Delivery attempts by channel and outcome",
                                         labels=["channel", "outcome"])
        counts = dict(totals.deliveries) or {"dicom|ok": 0.0, "dicom|failed": 0.0}
        for key in sorted(counts):
            channel, _, outcome = key.partition("|")
            deliveries.add_metric([channel, outcome], self._mono("deliveries", (channel, outcome), counts[key]))
        yield deliveries

        hist = HistogramMetricFamily("triage_stage_duration_seconds",
                                     "Pipeline stage durations (results.timings, every result)", labels=["stage"])
        for stage, h in sorted(totals.stages.items()):
            values = [self._mono("stage", (stage, str(i)), v) for i, v in enumerate(h)]
            pairs = [(floatToGoString(le), values[i]) for i, le in enumerate(STAGE_BUCKETS)]
            pairs.append(("+Inf", values[len(STAGE_BUCKETS)]))
            hist.add_metric([stage], pairs, values[-2])
        yield hist

        with session_scope(self.ctx.sessions) as s:

            stored = GaugeMetricFamily("triage_instances_stored", "DICOM instances currently in the file store")
            stored.add_metric([], s.scalar(select(func.count()).select_from(Instance)) or 0)
            yield stored

            jobs = GaugeMetricFamily("triage_jobs", "Jobs in the queue by kind and state", labels=["kind", "state"])
            counts = {(k, st): n for k, st, n in s.execute(
                select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))}
            for kind in sorted({k for k, _ in counts} | {"infer", "deliver", "notify"}):
                for state in sorted(set(JOB_STATES) | {st for k, st in counts if k == kind}):
                    jobs.add_metric([kind, state], counts.get((kind, state), 0))
            yield jobs

            studies = GaugeMetricFamily("triage_studies", "Studies by status", labels=["status"])
            by_status = dict(s.execute(select(Study.status, func.count()).group_by(Study.status)).all())
            for status in sorted(set(by_status) | set(StudyStatus)):
                studies.add_metric([status], by_status.get(status, 0))
            yield studies

            overdue = GaugeMetricFamily(
                "triage_series_overdue", "Series still receiving long after their quiet period (a stuck completion)")
            overdue.add_metric([], s.scalar(select(func.count()).select_from(Series).where(
                Series.state == SeriesState.RECEIVING,
                Series.last_received_at < now - dt.timedelta(seconds=overdue_after(self.ctx.settings)))) or 0)
            yield overdue

            # a destination whose last attempts all failed: its lane waits (no attempt is spent while
            # nothing connects), so this, not dead jobs, is what shows a long PACS outage
            down = GaugeMetricFamily("triage_destinations_failing",
                                     "Destinations (delivery lanes) whose latest delivery attempts failed and "
                                     "that have results waiting")
            waiting = select(Job.id).where(Job.lane == JobLane.key, Job.state.in_(LIVE_JOB_STATES)).exists()
            down.add_metric([], s.scalar(select(func.count()).select_from(JobLane)
                                         .where(JobLane.failures > 0, waiting)) or 0)
            yield down

            flagged = CounterMetricFamily("triage_flagged_studies", "Studies flagged positive")
            flagged.add_metric([], self._mono("flagged", (), s.scalar(
                select(func.count()).select_from(Study).where(Study.flagged.is_(True))) or 0))
            yield flagged

            hb = GaugeMetricFamily("triage_worker_heartbeat_age_seconds", "Seconds since each process's heartbeat",
                                   labels=["worker", "role"])
            for w in s.scalars(select(Worker)):
                hb.add_metric([w.id, w.role], max(0.0, (now - w.heartbeat_at).total_seconds()))
            yield hb

        try:
            free = float(self.ctx.store.free_bytes())
        except Exception as exc:  # store not available: report nothing rather than fail the scrape
            log.warning("metrics.disk_unavailable", error=str(exc))
        else:
            disk = GaugeMetricFamily("triage_store_free_bytes", "Free bytes on the file store's file system")
            disk.add_metric([], free)
            yield disk


def make_registry(ctx: AppContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(ctx))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
