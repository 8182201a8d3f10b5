"""The worker loop: claim a job, keep its lease alive, run its handler, complete or fail it.

Handlers by job kind: ``infer`` (triage/pipeline/infer.py), ``deliver`` (triage/dicom/delivery.py)
and ``notify`` (triage/pipeline/notify_job.py). The model bundle is loaded once per process, on
the first ``infer`` job or at start (``warm=True``) so the first study does not pay for it.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from storage import lifecycle
from storage.lifecycle import JobKind, JobState, StaleJob
from storage.queue import LaneDown
from triage.context import AppContext
from triage.logging import get_logger
from triage.pipeline import answer

log = get_logger(__name__)

ALL_KINDS = tuple(JobKind)
DISK_FULL_RETRY_CAP_S = 60.0  # longest wait between tries while the file store is full


class Worker:
    """One claiming loop. Run several (threads or processes) for parallelism."""

    def __init__(self, ctx: AppContext, kinds: Sequence[str] = ALL_KINDS, *, name: str = "") -> None:
        self.ctx = ctx
        self.kinds = tuple(kinds)
        self.name = name or ctx.worker_id
        self._stop = threading.Event()
        self._bundle: Any = None
        self._bundle_lock = threading.Lock()
        self.processed = 0

    # ------------------------------------------------------------------ model
    @property
    def bundle(self) -> Any:
        with self._bundle_lock:
            if self._bundle is None:
                from triage.models.inference import load_bundle

                s = self.ctx.settings
                self._bundle = load_bundle(s.bundle_path or None, device=s.device,
                                           thresholds_override=s.thresholds or None,
                                           threads=s.inference_threads, runtime=s.inference_runtime)
                log.info("bundle loaded", bundle=str(self._bundle.identity), worker=self.name)
            return self._bundle

    def warm_up(self) -> None:
        """Load the bundle and build throw-away result objects at start, so the first study pays
        for neither (model load, torch's and highdicom's lazy start)."""
        if "infer" not in self.kinds:
            return
        started = time.perf_counter()
        try:
            _ = self.bundle
        except Exception as exc:  # the node still receives; infer jobs fail (audited) until fixed
            log.error("model bundle could not be loaded", error=str(exc)[:500], worker=self.name)
        try:
            from triage.pipeline.infer import warm_up_reports

            warm_up_reports()
        except Exception as exc:  # only a slower first study
            log.warning("result object warm-up failed", error=str(exc)[:300], worker=self.name)
        log.info("worker warm", worker=self.name, seconds=round(time.perf_counter() - started, 2))

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        self._stop.set()
        self.ctx.doorbell.ring()  # out of an idle wait now

    def run(self, *, once: bool = False) -> int:
        """Claim and run jobs until stopped (or, with ``once``, until the queue has none ready)."""
        q = self.ctx.queue
        bell = self.ctx.doorbell
        poll = self.ctx.settings.poll_seconds
        while not self._stop.is_set():
            seen = bell.rings  # before the claim: work committed meanwhile is not waited for
            try:
                job = q.claim(self.name, kinds=self.kinds)
            except Exception as exc:  # database away: keep the process, retry after a pause
                log.warning("claim failed", error=str(exc)[:200], worker=self.name)
                self._stop.wait(min(5.0, poll * 10))
                continue
            if job is None:
                if once:
                    break
                bell.wait(seen, poll)  # the next poll, or sooner when this process queues work
                continue
            try:
                self.run_job(job)
            except Exception as exc:  # the thread must outlive any error: the job's lease expires, it runs again
                log.error("job bookkeeping failed", job_id=job.id, kind=job.kind, error=str(exc)[:200],
                          worker=self.name)
                self._stop.wait(min(5.0, poll * 10))
        return self.processed

    def run_job(self, job: Any) -> None:
        q = self.ctx.queue
        lost = threading.Event()
        done = threading.Event()

        def beat() -> None:
            interval = self.ctx.settings.heartbeat_seconds
            while not done.wait(interval):
                try:
                    if not q.heartbeat(job.id, self.name):
                        lost.set()
                        return
                except Exception as exc:  # transient: the lease may still be ours
                    log.warning("heartbeat failed", job_id=job.id, error=str(exc)[:200])

        hb = threading.Thread(target=beat, name=f"hb-{job.id}", daemon=True)
        hb.start()
        started = time.perf_counter()
        try:
            self._handler(job.kind)(job)
        except Exception as exc:
            done.set()
            self._on_failure(job, exc)
        else:
            done.set()
            if lost.is_set():
                log.warning("lease lost before completion", job_id=job.id, kind=job.kind)
            try:
                completed = q.complete(job.id, self.name, lane=getattr(job, "lane", None))
            except Exception as exc:  # database away: the lease expires and the job runs again
                log.error("could not record job completion", job_id=job.id, error=str(exc)[:200])
                return
            self.ctx.doorbell.ring()  # the jobs it queued (deliveries), or the next of its lane
            if completed:
                log.info("job done", job_id=job.id, kind=job.kind, seconds=round(time.perf_counter() - started, 3))
            else:  # another worker holds it now (this lease ran out): its run counts, not this one
                log.warning("job done, but its lease had passed to another worker", job_id=job.id, kind=job.kind)
        finally:
            done.set()
            hb.join(timeout=1)
            self.processed += 1

    def _on_failure(self, job: Any, exc: Exception) -> None:
        q = self.ctx.queue
        if isinstance(exc, StaleJob):  # (a database error here is caught by run(): the lease expires)
            log.info("stale job skipped", job_id=job.id, reason=str(exc))
            q.complete(job.id, self.name)
            return
        error = f"{type(exc).__name__}: {exc}"[:2000]
        log.warning("job failed", job_id=job.id, kind=job.kind, attempt=job.attempts, error=error[:300])
        try:
            if disk_full(exc):  # space comes back by itself (retention, an operator): wait, never die of it
                q.postpone(job.id, self.name, error, cap_seconds=DISK_FULL_RETRY_CAP_S)
                return
            # audits job_failed / job_dead itself; LaneDown backs off the whole destination
            q.fail(job.id, self.name, error, retry=True, lane_down=isinstance(exc, LaneDown),
                   spend_attempt=getattr(exc, "spends_attempt", True))
            row = q.get(job.id)
            if row is not None and row.state == JobState.DEAD and job.kind == JobKind.INFER:
                with self.ctx.sessions.begin() as s:  # series row, then the audit chain: the receiver's order
                    failed = lifecycle.fail_inference(s, int(job.payload.get("series_id", 0)), job_id=job.id,
                                                      error=error, actor=self.name,
                                                      generation=job.payload.get("generation"))
                if failed and job.study_id is not None:  # a negative of another series may wait on this one
                    with self.ctx.sessions.begin() as s:
                        answer.settle(s, q, int(job.study_id), actor=self.name)
        except Exception as db_exc:  # database away: the lease expires and the job is retried
            log.error("could not record job outcome", job_id=job.id, error=str(db_exc)[:200])

    def _handler(self, kind: str) -> Callable[[Any], Any]:
        if kind == JobKind.INFER:
            from triage.pipeline.infer import run_infer

            return lambda job: run_infer(self.ctx, job, self.bundle)
        if kind == JobKind.DELIVER:
            from triage.dicom.delivery import handle_deliver

            return lambda job: handle_deliver(self.ctx, job)
        if kind == JobKind.NOTIFY:
            from triage.pipeline.notify_job import handle_notify

            return lambda job: handle_notify(self.ctx, job)
        raise ValueError(f"no handler for job kind {kind!r}")


def disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) says the disk or quota is full."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False
