"""Process roles: ``serve`` (all-in-one), ``receiver``, ``worker`` and ``web``.

Every role migrates the database at start (idempotent), registers itself in the ``workers``
table with a heartbeat, and keeps no state that another role needs: the database and the file
store are the only things they share, so the roles can run on different hosts. The roles that
write to the file store (serve, receiver, worker) sweep temporary files left by a crash at start
and every ``TEMP_SWEEP_INTERVAL_S`` (audited ``temp_swept`` when any were removed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import threading
from contextlib import suppress
from typing import Any

from storage import audit
from storage.workers import WorkerRegistry, stale_after
from triage.config import Settings
from triage.context import AppContext
from triage.logging import get_logger

log = get_logger(__name__)

#: Roles that write to the file store (and so sweep its temporary files).
WRITER_ROLES = ("serve", "receiver", "worker")
#: A temporary file older than this is a crash's leftover: writes hold one for well under a second,
#: so this is safe while other processes (other hosts) write to the same store.
TEMP_SWEEP_AGE_S = 60.0
TEMP_SWEEP_INTERVAL_S = 600.0


class Role:
    """Common start/stop plumbing: migrations, registry heartbeat, scheduler, signals."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.ctx = AppContext(settings, role=role)
        self.role = role
        self.stop_event = threading.Event()
        self.scheduler: Any = None
        self.stoppers: list[Any] = []
        #: This process's parts, name -> callable that is True while the part is up (/readyz).
        self.components: dict[str, Any] = {}
        self.registry = WorkerRegistry(self.ctx.sessions)

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        from storage.migrate import upgrade

        s = self.ctx.settings
        s.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.effective_database_url)
        self._register()
        with self.ctx.sessions.begin() as sess:
            audit.record(sess, audit.NODE_START, actor=self.ctx.worker_id,
                         details={"role": self.role, "ae_title": s.ae_title, "dicom_port": s.dicom_port,
                                  "web_port": s.web_port, "database": _backend(s)})
        if self.role in WRITER_ROLES:
            self.sweep_temp(at_start=True)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_job(self._heartbeat, "interval", seconds=s.heartbeat_seconds, id="registry",
                               max_instances=1, coalesce=True)
        if self.role in WRITER_ROLES:
            # The first pass soon after start catches what a crash just before it left behind.
            self.scheduler.add_job(_safe(self.sweep_temp), "interval", seconds=TEMP_SWEEP_INTERVAL_S,
                                   id="temp-sweep", max_instances=1, coalesce=True,
                                   next_run_time=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=TEMP_SWEEP_AGE_S + 5))
        self.scheduler.start()

    def sweep_temp(self, at_start: bool = False) -> int:
        """Remove temporary files left by interrupted writes; log it, and audit it when any were removed."""
        files, size = self.ctx.store.sweep_temp_report(TEMP_SWEEP_AGE_S)
        log.info("temporary files swept", files=files, bytes=size, at_start=at_start, older_than_s=TEMP_SWEEP_AGE_S)
        if files:
            with self.ctx.sessions.begin() as sess:
                audit.record(sess, audit.TEMP_SWEPT, actor=self.ctx.worker_id,
                             details={"files": files, "bytes": size, "at_start": at_start, "role": self.role,
                                      "older_than_s": TEMP_SWEEP_AGE_S})
        return files

    def _register(self) -> None:
        self.registry.register(self.ctx.worker_id, role=self.role)

    def _heartbeat(self) -> None:
        try:
            if not self.registry.heartbeat(self.ctx.worker_id):
                self._register()  # pruned while the database was away
            pruned = self.registry.prune(stale_after(self.ctx.settings.heartbeat_seconds))
            if pruned:
                log.info("stale processes pruned from the registry", count=pruned)
        except Exception as exc:  # database away: retried on the next tick
            log.warning("registry heartbeat failed", error=str(exc)[:200])

    def install_signals(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            log.info("signal received, stopping", signal=signum)
            self.stop_event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with suppress(ValueError):  # not in the main thread (tests)
                signal.signal(sig, handler)

    def stop(self) -> None:
        self.stop_event.set()
        for stopper in reversed(self.stoppers):
            with suppress(Exception):
                stopper()
        if self.scheduler is not None:
            with suppress(Exception):
                self.scheduler.shutdown(wait=False)
        with suppress(Exception):
            self.registry.unregister(self.ctx.worker_id)
        with suppress(Exception), self.ctx.sessions.begin() as sess:
            audit.record(sess, audit.NODE_STOP, actor=self.ctx.worker_id, details={"role": self.role})
        self.ctx.close()

    # ------------------------------------------------------------------ parts
    def start_receiver(self) -> None:
        from triage.admin import schedule_retention
        from triage.dicom.completion import SeriesMonitor
        from triage.dicom.scp import DicomNode

        node = DicomNode(self.ctx)
        node.start()
        self.stoppers.append(node.stop)
        self.components["dicom-scp"] = lambda: node.listening
        monitor = SeriesMonitor(self.ctx)
        self.components["series-monitor"] = monitor.healthy
        # a tick is one indexed query when nothing is receiving; 0.25 s bounds the completion latency
        self.scheduler.add_job(_safe(monitor.tick), "interval", seconds=0.25, id="series-monitor",
                               max_instances=1, coalesce=True)
        schedule_retention(self.scheduler, self.ctx)
        log.info("receiver listening", ae_title=self.ctx.settings.ae_title, port=node.port)

    def start_workers(self, kinds_infer: tuple[str, ...] = ("infer",),
                      kinds_out: tuple[str, ...] = ("deliver", "notify")) -> list[Any]:
        """One inference loop and one outbound loop, so a slow PACS never delays inference."""
        from triage.pipeline.worker import Worker

        workers = []
        for kinds, suffix in ((kinds_infer, "infer"), (kinds_out, "out")):
            if not kinds:
                continue
            w = Worker(self.ctx, kinds, name=f"{self.ctx.worker_id}:{suffix}")
            t = threading.Thread(target=_warm_and_run, args=(w,), name=f"worker-{suffix}", daemon=True)
            t.start()
            self.components[f"worker-{suffix}"] = t.is_alive
            self.stoppers.append(_stop_and_join(w, t, self.ctx.settings.lease_seconds))
            workers.append(w)
        return workers

    def wait(self) -> None:
        while not self.stop_event.wait(0.5):
            pass


def _stop_and_join(w: Any, t: threading.Thread, timeout: float) -> Any:
    """Stop taking jobs and let the current one finish (up to a lease), so it is not re-run."""

    def stop() -> None:
        w.stop()
        t.join(timeout=timeout)

    return stop


def _warm_and_run(w: Any) -> None:
    w.warm_up()  # in the thread: receiving and the web do not wait for the model to load
    w.run()


def _backend(s: Settings) -> str:
    return "sqlite" if s.effective_database_url.startswith("sqlite") else "postgresql"


def _safe(fn: Any) -> Any:
    def run() -> None:
        try:
            fn()
        except Exception as exc:  # keep the schedule alive through transient errors
            log.warning("scheduled task failed", task=getattr(fn, "__qualname__", "?"), error=str(exc)[:300])

    return run


def _run_web_blocking(role: Role) -> None:
    from reports.web.app import run_web

    s = role.ctx.settings
    run_web(role.ctx, s.web_host, s.web_port, stop_event=role.stop_event, components=role.components)


# ---------------------------------------------------------------------- CLI entry points
def serve(args: argparse.Namespace, settings: Settings) -> int:
    role = Role(settings, "serve")
    role.install_signals()
    role.start()
    try:
        role.start_receiver()
        role.start_workers()
        _run_web_blocking(role)  # returns when stop_event is set or uvicorn exits
    finally:
        role.stop()
    return 0


def receiver(args: argparse.Namespace, settings: Settings) -> int:
    role = Role(settings, "receiver")
    role.install_signals()
    role.start()
    try:
        role.start_receiver()
        role.wait()
    finally:
        role.stop()
    return 0


def worker(args: argparse.Namespace, settings: Settings) -> int:
    from triage.pipeline.worker import ALL_KINDS, Worker

    kinds = tuple(k for k in (args.kinds.split(",") if args.kinds else ALL_KINDS) if k)
    role = Role(settings, "worker")
    role.install_signals()
    role.start()
    try:
        if args.once:
            w = Worker(role.ctx, kinds)
            w.run(once=True)
            print(f"processed {w.processed} jobs")
        else:
            role.start_workers(tuple(k for k in kinds if k == "infer"), tuple(k for k in kinds if k != "infer"))
            role.wait()
    finally:
        role.stop()
    return 0


def web(args: argparse.Namespace, settings: Settings) -> int:
    role = Role(settings, "web")
    role.install_signals()
    role.start()
    try:
        _run_web_blocking(role)
    finally:
        role.stop()
    return 0
