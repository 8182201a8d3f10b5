"""Series completion: when has a series arrived in full, and what happens then.

C-STORE carries no end-of-series marker, so a series in state ``receiving`` is taken as complete
after ``stable_seconds`` without a new instance. With ``early_complete`` it completes sooner
when that is safe: the slices form a gap-free, uniformly spaced stack *and* their number equals
ImagesInAcquisition recorded on every slice. (Instance numbers alone are not trusted: a sender
that sends in order looks complete after any prefix.)

On completion the selection rules (:mod:`triage.dicom.selection`) decide: ``selected`` plus an
``infer`` job, or ``skipped`` with the reason (transitions of :mod:`storage.lifecycle`). The
completion is claimed with a conditional UPDATE (:func:`storage.lifecycle.complete_series`: still
receiving, same generation, same instance count), so several receiver processes sharing one
PostgreSQL database never complete a series twice, and an instance that arrived meanwhile (the
receiver locks the series row) keeps the series open.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from storage import audit, lifecycle
from storage.models import Instance, Series, Study, utcnow
from triage.config import Settings
from triage.context import AppContext
from triage.dicom.header import CT_CLASSES, normal_of
from triage.dicom.selection import is_stat, select_series, slice_positions
from triage.logging import get_logger
from triage.pipeline import answer

log = get_logger(__name__)

UNIFORM_TOLERANCE = 0.05  # relative deviation of gaps allowed for early completion
GIVE_UP_AFTER = 20  # completions of one series that raised in a row (5 s at 4 Hz) before it is skipped
STUCK_AFTER = 4  # ... and after this many, /readyz reports the monitor stuck until it gives up
TICK_STALE_S = 30.0  # no finished tick for this long: the monitor is stuck


def stack_is_complete(metas: Sequence[dict[str, Any]], sop_classes: Sequence[str]) -> bool:
    """Conservative early-completion test (see the module docstring)."""
    images = [m for m, c in zip(metas, sop_classes, strict=True) if c in CT_CLASSES]
    if len(images) < 2 or len(images) != len(metas):
        return False
    if any(int(m.get("frames") or 1) != 1 for m in images):
        return False
    hints = {m.get("images_in_acquisition") for m in images}
    acquisitions = {m.get("acquisition_number") for m in images}
    if len(hints) != 1 or len(acquisitions) != 1:
        return False
    hint = hints.pop()
    if not hint or hint != len(images):
        return False
    iops = {tuple(round(v, 4) for v in (m.get("iop") or ())) for m in images}
    if len(iops) != 1 or any(not m.get("ipp") for m in images):
        return False
    try:
        normal = normal_of(list(iops.pop()))
    except ValueError:
        return False
    gaps = np.diff(sorted(slice_positions(images, normal)))
    if gaps.size == 0 or float(gaps.min()) <= 0.01:
        return False
    median = float(np.median(gaps))
    return float(np.max(np.abs(gaps - median))) <= UNIFORM_TOLERANCE * median


@dataclass
class Completion:
    """What one tick did to one series (for logs and tests)."""

    series_id: int
    series_uid: str
    generation: int
    selected: bool
    reason: str
    early: bool
    job_id: int | None = None


class SeriesMonitor:
    """Completes quiet (or provably complete) series. Call :meth:`tick` periodically."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.settings: Settings = ctx.settings
        self._early_cache: dict[int, tuple[int, int, bool]] = {}  # series id -> (gen, count, verdict)
        self.failures: dict[int, int] = {}  # series id -> completions that raised in a row
        self.last_tick = time.monotonic()

    def tick(self, now: dt.datetime | None = None) -> list[Completion]:
        """Complete every series that is ready; returns what was done."""
        now = now or utcnow()
        cutoff = now - dt.timedelta(seconds=self.settings.stable_seconds)
        with self.ctx.reads() as s:
            rows = lifecycle.receiving_series(s)
        done: list[Completion] = []
        live = set()
        for series_id, generation, count, last in rows:
            live.add(series_id)
            quiet = last <= cutoff
            early = False
            if not quiet:
                if not self.settings.early_complete:
                    continue
                early = self._early(series_id, generation, count)
                if not early:
                    continue
            try:
                result = self._complete(series_id, generation, count, early)
            except Exception as exc:
                self._failed(series_id, generation, count, exc)
                continue
            self.failures.pop(series_id, None)
            if result is not None:
                done.append(result)
                if result.job_id is not None:
                    self.ctx.doorbell.ring()  # committed: this process's idle worker claims it now
        for stale in set(self._early_cache) - live:
            self._early_cache.pop(stale, None)
        for stale in set(self.failures) - live:
            self.failures.pop(stale, None)
        self.last_tick = time.monotonic()
        return done

    def _failed(self, series_id: int, generation: int, count: int, exc: Exception) -> None:
        """A completion that raised: logged once with its traceback (then counted, not repeated);
        after ``GIVE_UP_AFTER`` tries in a row the series is skipped with the error as its reason, so
        one bad series can never block itself (or fill the log) forever."""
        n = self.failures.get(series_id, 0) + 1
        self.failures[series_id] = n
        if n == 1:
            log.exception("series completion failed", series_id=series_id)
        if n < GIVE_UP_AFTER:
            return
        reason = f"could not be completed: {type(exc).__name__}: {str(exc)[:300]}"
        try:
            with self.ctx.sessions.begin() as s:
                if not lifecycle.complete_series(s, series_id, generation, count):
                    return  # it moved meanwhile: the next tick looks again
                series = s.get(Series, series_id)
                assert series is not None
                lifecycle.skip_series(s, series, series.study, reason, generation=generation, instances=count)
        except Exception as give_up_exc:  # the database itself fails: /readyz shows the monitor stuck
            if n % 100 == GIVE_UP_AFTER % 100:
                log.error("series completion stuck", series_id=series_id, tries=n, error=str(give_up_exc)[:200])
            return
        self.failures.pop(series_id, None)
        log.warning("series skipped after failed completions", series_id=series_id, tries=n)

    def healthy(self) -> bool:
        """False while a series keeps failing to complete or the monitor has not ticked lately
        (the receiver's ``/readyz`` component ``series-monitor``)."""
        stuck = any(n >= STUCK_AFTER for n in self.failures.values())
        return not stuck and time.monotonic() - self.last_tick < TICK_STALE_S

    def _early(self, series_id: int, generation: int, count: int) -> bool:
        cached = self._early_cache.get(series_id)
        if cached and cached[:2] == (generation, count):
            return cached[2]
        with self.ctx.reads() as s:
            inst = s.execute(select(Instance.meta, Instance.sop_class_uid)
                             .where(Instance.series_id == series_id)).all()
        verdict = len(inst) == count and stack_is_complete([i.meta for i in inst], [i.sop_class_uid for i in inst])
        self._early_cache[series_id] = (generation, count, verdict)
        return verdict

    def _complete(self, series_id: int, generation: int, count: int, early: bool) -> Completion | None:
        s_ = self.settings
        with self.ctx.sessions.begin() as s:
            if not lifecycle.complete_series(s, series_id, generation, count):
                return None  # another monitor got it, or a new instance arrived: look again next tick
            series = s.get(Series, series_id)
            assert series is not None
            study = s.get(Study, series.study_id)
            assert study is not None
            inst = s.execute(select(Instance.meta, Instance.sop_class_uid)
                             .where(Instance.series_id == series_id).order_by(Instance.id)).all()
            metas = [i.meta for i in inst]
            classes = [i.sop_class_uid for i in inst]
            result = select_series(s_, metas, classes)
            series.meta = {**(series.meta or {}), "selection": result.meta, "completed_early": early,
                           "selection_note": result.reason if result.ok else ""}
            common = {"study_uid": study.study_uid, "series_uid": series.series_uid, "accession": study.accession}
            audit.record(s, audit.SERIES_COMPLETE, **common,
                         details={"instances": len(inst), "generation": generation, "early": early,
                                  "series_id": series_id})
            job_id = None
            if result.ok:
                stat_kw = is_stat(s_, metas)
                priority = lifecycle.select_for_inference(s, series, study, stat=stat_kw)
                job_id = self.ctx.queue.enqueue(
                    lifecycle.JobKind.INFER, {"series_id": series_id, "generation": generation}, priority=priority,
                    dedupe_key=f"infer:{series.series_uid}:{generation}", study_id=study.id, series_id=series_id,
                    session=s,
                )
                audit.record(s, audit.QUEUED, **common,
                             details={"job_id": job_id, "kind": "infer", "priority": int(priority),
                                      "generation": generation, "stat_keyword": stat_kw, "note": result.reason,
                                      "tilt_deg": result.meta.get("tilt_deg"),
                                      "spacing_mm": result.meta.get("spacing_mm")})
                log.info("series selected", series_uid=series.series_uid, job_id=job_id, priority=int(priority),
                         early=early, note=result.reason)
            else:
                lifecycle.skip_series(s, series, study, result.reason, generation=generation, instances=len(inst))
                s.flush()
                # a negative result of another series of the study may have waited for this one
                answer.settle(s, self.ctx.queue, study.id)
                log.info("series skipped", series_uid=series.series_uid, reason=result.reason)
            return Completion(series_id, series.series_uid, generation, result.ok, result.reason, early, job_id)
