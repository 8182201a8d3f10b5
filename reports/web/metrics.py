"""``/metrics`` in Prometheus text format, computed from the database at scrape time.

The database is the shared state of all roles, so one web process reports the whole node
(receiver, workers, deliveries) without any in-memory counters. Counters are counts of
append-only rows (audit events, deliveries, results); gauges are current states.
Nothing here carries patient data.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select

from storage import audit
from storage.db import session_scope
from storage.models import RESULT_OUT_OF_DOMAIN, AuditEvent, Delivery, Instance, Job, Result, Study, Worker
from triage.context import AppContext
from triage.logging import get_logger

log = get_logger(__name__)

# Seconds; covers sub-second stages up to a slow CPU inference.
STAGE_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
TIMING_WINDOW = 10_000  # newest results included in the stage histograms
JOB_STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "dead")


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


class NodeCollector(Collector):
    """Reads counts from the database on every scrape."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        now = dt.datetime.now(dt.UTC)
        with session_scope(self.ctx.sessions) as s:
            # One "received" audit event covers a batch of instances stored together (details.count).
            received = CounterMetricFamily(
                "triage_instances_received", "DICOM instances received (sum of 'received' audit events' counts)")
            received.add_metric([], s.scalar(
                select(func.coalesce(func.sum(func.coalesce(AuditEvent.details["count"].as_integer(), 1)), 0))
                .where(AuditEvent.event_type == audit.RECEIVED)) or 0)
            yield received

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
            for status in sorted(set(by_status) | {"receiving", "queued", "processing", "done", "skipped",
                                                   "failed"}):
                studies.add_metric([status], by_status.get(status, 0))
            yield studies

            flagged = CounterMetricFamily("triage_flagged_studies", "Studies flagged positive")
            flagged.add_metric([], s.scalar(
                select(func.count()).select_from(Study).where(Study.flagged.is_(True))) or 0)
            yield flagged

            results = CounterMetricFamily("triage_results", "Inference results written", labels=["positive"])
            by_pos = dict(s.execute(select(Result.positive, func.count()).group_by(Result.positive)).all())
            for pos in (True, False):
                results.add_metric(["true" if pos else "false"], by_pos.get(pos, 0))
            yield results

            # A rise means series unlike the model's training studies are arriving (a new scanner or
            # protocol): the results on them are not to be relied on (triage/models/domain.py).
            ood = CounterMetricFamily("triage_results_out_of_domain",
                                      "Inference results on series outside the model's input domain")
            ood.add_metric([], s.scalar(select(func.count()).select_from(Result).where(RESULT_OUT_OF_DOMAIN)) or 0)
            yield ood

            deliveries = CounterMetricFamily("triage_deliveries", "Delivery attempts by channel and outcome",
                                             labels=["channel", "outcome"])
            seen = False
            for channel, ok, n in s.execute(
                select(Delivery.channel, Delivery.ok, func.count()).group_by(Delivery.channel, Delivery.ok)
            ):
                deliveries.add_metric([channel, "ok" if ok else "failed"], n)
                seen = True
            if not seen:
                deliveries.add_metric(["dicom", "ok"], 0)
                deliveries.add_metric(["dicom", "failed"], 0)
            yield deliveries

            timings = list(s.scalars(select(Result.timings).order_by(Result.id.desc()).limit(TIMING_WINDOW)))
            hist = HistogramMetricFamily("triage_stage_duration_seconds",
                                         f"Pipeline stage durations (results.timings, newest {TIMING_WINDOW})",
                                         labels=["stage"])
            for stage, (buckets, total, _n) in sorted(stage_histograms(timings).items()):
                pairs = [(floatToGoString(le), float(c)) for le, c in zip(STAGE_BUCKETS, buckets[:-1], strict=True)]
                pairs.append(("+Inf", float(buckets[-1])))
                hist.add_metric([stage], pairs, total)
            yield hist

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
