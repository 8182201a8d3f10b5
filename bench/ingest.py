"""Ingest benchmark: DCMTK storescu → DCMTK storescp vs storescu → the node, same run.

Sends one synthetic CT series (default 300 slices of 512x512, 16 bit, uncompressed) over 1 and
over 4 associations (4 storescu processes, a quarter of the files each), to:

* DCMTK ``storescp`` writing files (no fsync; the reference),
* the node (:class:`triage.dicom.scp.DicomNode`, in this process) with durable writes
  (``fsync`` of every file and its directory) and its database rows committed before each ack.

Every DCMTK process runs with ``TCP_NODELAY=1`` (see docs/benchmarks.md). Each cell is the median
of ``--repeat`` runs; the node gets a fresh database and file store for every run, so nothing
is a duplicate. Prints a Markdown table.

    .venv/bin/python bench/ingest.py [--slices 300] [--size 512] [--repeat 3] [--database-url URL]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ would come first on sys.path and bench/queue.py would shadow the stdlib.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

from tests.peers import SeriesSpec, StoreSCP, dcmtk_env, make_ct_series, node_context, running_node  # noqa: E402


def send(port: int, aet: str, paths: list[Path], associations: int) -> float:
    """Wall seconds for ``associations`` parallel storescu processes to send ``paths``."""
    parts = [paths[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCH", "-aec", aet, "127.0.0.1", str(port), *map(str, part)],
            env=dcmtk_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for part in parts
    ]
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {err.decode()[-500:]}")
    return time.perf_counter() - start


def run_storescp(paths: list[Path], associations: int, work: Path) -> float:
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    with StoreSCP(out, "STORESCP") as scp:
        seconds = send(scp.port, "STORESCP", paths, associations)
        if len(scp.files()) != len(paths):
            raise RuntimeError(f"storescp wrote {len(scp.files())} of {len(paths)} files")
    return seconds


def run_node(paths: list[Path], associations: int, work: Path, database_url: str | None, run: int) -> float:
    from sqlalchemy import func, select

    from storage.models import Instance

    d = work / f"node-{associations}-{run}"
    ctx = node_context(d, database_url=database_url, fsync="true", log_level="WARNING")
    try:
        with running_node(ctx) as node:
            seconds = send(node.port, "ICHTRIAGE", paths, associations)
        with ctx.sessions() as s:
            n = s.scalar(select(func.count()).select_from(Instance))
        if n != len(paths):
            raise RuntimeError(f"node recorded {n} of {len(paths)} instances")
    finally:
        ctx.close()
        shutil.rmtree(d, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--database-url", default=None, help="default: SQLite in the node's data dir")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = ap.parse_args(argv)

    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    from triage.logging import configure_logging

    configure_logging(level="WARNING")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        paths = make_ct_series(work / "series", SeriesSpec(slices=args.slices, size=args.size))
        mb = sum(p.stat().st_size for p in paths) / 1e6
        rows = []
        for associations in (1, 4):
            ref, node = [], []
            for run in range(args.repeat):  # interleaved, so both see the same machine load
                ref.append(run_storescp(paths, associations, work))
                node.append(run_node(paths, associations, work, args.database_url, run))
            rows.append((associations, statistics.median(ref), statistics.median(node)))
        db = "PostgreSQL" if args.database_url and "postgres" in args.database_url else "SQLite"
        print(
            f"\n{args.slices} slices {args.size}x{args.size} ({mb:.0f} MB), median of {args.repeat}, "
            f"node: fsync on, {db}, {os.cpu_count()} CPUs\n"
        )
        print("| associations | receiver | seconds | images/s | MB/s | node/DCMTK |")
        print("|---|---|---|---|---|---|")
        for associations, ref_s, node_s in rows:
            print(f"| {associations} | DCMTK storescp | {ref_s:.2f} | {args.slices / ref_s:.0f} | {mb / ref_s:.0f} | |")
            print(
                f"| {associations} | node | {node_s:.2f} | {args.slices / node_s:.0f} | {mb / node_s:.0f} | "
                f"{ref_s / node_s:.2f} |"
            )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
