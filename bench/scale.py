"""Scale-out: studies per minute with 1, 2 and 4 ``triage worker`` processes on one PostgreSQL.

    .venv/bin/python bench/scale.py [--workers 1,2,4] [--studies 12] [--size 64] [--bundle PATH]

For each worker count: a fresh schema on the PostgreSQL server of ``TRIAGE_TEST_POSTGRES_URL``
(default the local ``test`` database), one ``triage receiver`` and N ``triage worker`` processes
sharing a file store. ``--studies`` synthetic head CTs (20 slices) are sent back to back with
DCMTK ``storescu`` (a burst: the queue fills, so the time to result grows with the backlog). Figures:
studies per minute from the first instance acknowledged to the last result recorded, and the
time to result (last instance of a study acknowledged → its result row committed) p50/p95.
The default bundle is an untrained 64-px network (the pipeline, not the model, is measured);
pass ``--bundle`` for the shipped one. Prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for triage/storage/reports

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from tests.node_process import NodeProcess  # noqa: E402
from tests.peers import SeriesSpec, make_ct_series, storescu  # noqa: E402
from tests.resilience_support import build_tiny_bundle, db_rows, pg_schema, scalar  # noqa: E402


def _ts(value: object) -> float:
    d = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return (d if d.tzinfo else d.replace(tzinfo=dt.UTC)).timestamp()


def run(workers: int, studies: list[tuple[str, list[Path]]], bundle: Path, work: Path) -> dict[str, float]:
    with pg_schema() as url:
        env = {"TRIAGE_DATABASE_URL": url, "TRIAGE_BUNDLE_PATH": str(bundle), "TRIAGE_LOG_LEVEL": "WARNING",
               "TRIAGE_STABLE_SECONDS": "2"}
        procs = [NodeProcess(work, "receiver", env=env)]
        procs += [NodeProcess(work, "worker", env={**env, "TRIAGE_WORKER_ID": f"w{i}"}, name=f"worker{i}")
                  for i in range(workers)]
        try:
            for p in procs:
                p.start(timeout=180)
            time.sleep(5)  # bundles loaded
            acked: dict[str, float] = {}
            t0 = time.time()
            for uid, paths in studies:
                r = storescu(procs[0].dicom_port, paths)
                if r.returncode != 0:
                    raise RuntimeError(r.stderr[-400:])
                acked[uid] = time.time()
            deadline = time.time() + 1800
            while scalar(url, "select count(*) from results") < len(studies):
                if time.time() > deadline:
                    raise RuntimeError("results missing")
                time.sleep(0.2)
            rows = db_rows(url, "select s.study_uid, r.created_at from results r join studies s on s.id = r.study_id")
        finally:
            for p in procs:
                p.stop()
    done = {uid: _ts(ts) for uid, ts in rows}
    ttr = [done[u] - acked[u] for u in acked]
    span = max(done.values()) - t0
    return {"workers": workers, "studies": len(studies), "per_min": 60 * len(studies) / span,
            "p50": float(np.percentile(ttr, 50)), "p95": float(np.percentile(ttr, 95)), "span": span}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--studies", type=int, default=12)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--bundle", default="")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    bundle = Path(args.bundle) if args.bundle else build_tiny_bundle(work / "bundle")
    rows = []
    for n in (int(x) for x in args.workers.split(",")):
        studies = []
        for i in range(args.studies):
            spec = SeriesSpec(slices=20, size=args.size, accession=f"SC{n}{i:03d}")
            studies.append((spec.study_uid, make_ct_series(work / f"w{n}" / f"s{i:03d}", spec)))
        rows.append(run(n, studies, bundle, work / f"node{n}"))
        print(f"{n} workers: {rows[-1]}", flush=True)
    print()
    print(f"Scale-out on PostgreSQL, {args.studies} studies of 20x{args.size}x{args.size} sent as a burst, "
          f"{os.cpu_count()} CPUs, bundle {'given' if args.bundle else 'untrained 64-px'}")
    print("| worker processes | studies/min | time to result p50 (s) | p95 (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['per_min']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
