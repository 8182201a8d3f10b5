"""Queue throughput: no-op jobs claimed and completed per second, SQLite vs PostgreSQL, 1 and 4 workers.

    .venv/bin/python bench/job_queue.py [--jobs 2000] [--workers 1,4] [--backends sqlite,postgres]

Each run uses a fresh database (a temporary SQLite file, or a throw-away PostgreSQL schema in the
database named by ``TRIAGE_TEST_POSTGRES_URL``, default the local ``test`` database). Jobs are
enqueued (the first 300 through :meth:`JobQueue.enqueue`, one transaction each, to report that
rate; the rest in one bulk insert), then worker processes (spawned, started together) claim and
complete until the queue is empty. The clock runs from the start signal until the last worker
exits its loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for triage/storage/reports

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

from sqlalchemy import create_engine, text  # noqa: E402

from storage.db import make_engine, make_sessionmaker, normalise_url  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import Job, utcnow  # noqa: E402
from storage.queue import DONE, QUEUED, JobQueue  # noqa: E402

ENQUEUE_TIMED = 300  # jobs enqueued one by one through the API to time enqueue()
PG_URL = os.environ.get("TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _worker(url: str, worker_id: str, ready: mp.Queue, go: mp.Event, done: mp.Queue) -> None:  # type: ignore[type-arg]
    engine = make_engine(url)
    q = JobQueue(make_sessionmaker(engine), lease_seconds=300)
    ready.put(worker_id)
    go.wait(120)
    cpu0 = time.process_time()
    n = 0
    while (job := q.claim(worker_id)) is not None:
        if not q.complete(job.id, worker_id):
            raise RuntimeError(f"lost lease on job {job.id}")
        n += 1
    done.put((worker_id, n, time.perf_counter(), time.process_time() - cpu0))
    engine.dispose()


class Database:
    """A fresh, migrated database for one run."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._schema = ""
        if backend == "sqlite":
            self._tmp = tempfile.TemporaryDirectory(prefix="queue-bench-")
            self.url = f"sqlite:///{self._tmp.name}/bench.sqlite3"
        else:
            self._schema = f"bench_{uuid.uuid4().hex[:10]}"
            admin = create_engine(normalise_url(PG_URL), isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'CREATE SCHEMA "{self._schema}"'))
            admin.dispose()
            sep = "&" if "?" in PG_URL else "?"
            self.url = f"{normalise_url(PG_URL)}{sep}options=-csearch_path%3D{self._schema}"
        upgrade(self.url)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
        if self._schema:
            admin = create_engine(normalise_url(PG_URL), isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA IF EXISTS "{self._schema}" CASCADE'))
            admin.dispose()


def run_one(backend: str, n_workers: int, n_jobs: int) -> dict[str, float | int | str]:
    db = Database(backend)
    try:
        engine = make_engine(db.url)
        q = JobQueue(make_sessionmaker(engine))
        timed = min(n_jobs, ENQUEUE_TIMED)
        t0 = time.perf_counter()
        for i in range(timed):
            q.enqueue("noop", {"i": i}, priority=i % 3)
        enqueue_s = time.perf_counter() - t0
        if n_jobs > timed:  # the rest in one statement: only draining is measured below
            now = utcnow()
            with engine.begin() as conn:
                conn.execute(
                    Job.__table__.insert(),
                    [
                        {
                            "kind": "noop",
                            "state": QUEUED,
                            "priority": i % 3,
                            "payload": {"i": i},
                            "attempts": 0,
                            "max_attempts": 5,
                            "run_after": now,
                            "created_at": now,
                            "last_error": "",
                        }
                        for i in range(timed, n_jobs)
                    ],
                )

        spawn = mp.get_context("spawn")
        ready, done, go = spawn.Queue(), spawn.Queue(), spawn.Event()
        procs = [spawn.Process(target=_worker, args=(db.url, f"w{i}", ready, go, done)) for i in range(n_workers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        start = time.perf_counter()
        go.set()
        finished = [done.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"worker failed: exit codes {[p.exitcode for p in procs]}")
        elapsed = max(f[2] for f in finished) - start
        worker_cpu = sum(f[3] for f in finished)
        counts = q.counts()
        if counts != {("noop", DONE): n_jobs} or sum(f[1] for f in finished) != n_jobs:
            raise RuntimeError(f"queue not drained exactly once: {counts}")
        engine.dispose()
        per_worker = [f[1] for f in finished]
        return {
            "backend": backend,
            "workers": n_workers,
            "jobs": n_jobs,
            "enqueue_per_s": timed / enqueue_s,
            "seconds": elapsed,
            "jobs_per_s": n_jobs / elapsed,
            "spread": f"{min(per_worker)}-{max(per_worker)}" if n_workers > 1 else str(per_worker[0]),
            "stdev": statistics.pstdev(per_worker),
            "cpu_ms_per_job": 1000 * worker_cpu / n_jobs,
        }
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", default="1,4", help="comma-separated worker process counts")
    ap.add_argument("--backends", default="sqlite,postgres")
    args = ap.parse_args(argv)
    rows = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        for n in [int(w) for w in args.workers.split(",") if w.strip()]:
            row = run_one(backend, n, args.jobs)
            rows.append(row)
            print(f"  {backend} x{n}: {row['jobs_per_s']:.0f} jobs/s", file=sys.stderr, flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nqueue benchmark: {args.jobs} no-op jobs, claim + complete; CPUs {os.cpu_count()}, load average {load}\n")
    print(
        "| back-end | worker processes | enqueue jobs/s (1 process) | drain s | claimed+completed jobs/s "
        "| worker CPU ms/job | jobs per worker |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['workers']} | {r['enqueue_per_s']:.0f} | {r['seconds']:.2f} "
            f"| {r['jobs_per_s']:.0f} | {r['cpu_ms_per_job']:.2f} | {r['spread']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
