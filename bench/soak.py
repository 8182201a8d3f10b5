"""Soak: many small studies through a real ``triage serve`` process; memory, file handles, audit.

    .venv/bin/python bench/soak.py [--studies 300] [--warmup 5]

Each synthetic head CT (20 slices, 64x64) is sent with DCMTK ``storescu``; the node (SQLite,
an untrained 64-px bundle: the path, not the model, is under test) infers and delivers its result
objects to DCMTK storescp. After every study the node process's RSS
(``/proc/<pid>/status``), open file descriptors (``/proc/<pid>/fd``) and open database files are
sampled. At the end every study must be accounted for in the audit trail (received,
series_complete, queued, inferred, delivered). ``tests/test_soak.py`` runs a reduced version.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ must not come first on sys.path: bench/queue.py would shadow the standard library's queue.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from tests.node_process import NodeProcess  # noqa: E402
from tests.peers import SeriesSpec, StoreSCP, make_ct_series, storescu  # noqa: E402
from tests.resilience_support import build_tiny_bundle, db_rows, fd_count, rss_kib, scalar  # noqa: E402

AUDIT_STEPS = ("received", "series_complete", "queued", "inferred", "delivered")


@dataclass
class SoakReport:
    studies: int
    seconds: float
    rss_kib: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    db_files: list[int] = field(default_factory=list)
    missing_audit: dict[str, list[str]] = field(default_factory=dict)
    undelivered: list[str] = field(default_factory=list)

    def growth(self, warmup: int) -> dict[str, float]:
        w = min(warmup, len(self.rss_kib) - 1)
        return {"rss_mib_after_warmup": self.rss_kib[w] / 1024, "rss_mib_end": self.rss_kib[-1] / 1024,
                "rss_growth_mib": (self.rss_kib[-1] - self.rss_kib[w]) / 1024,
                "fds_after_warmup": self.fds[w], "fds_end": self.fds[-1], "fds_max": max(self.fds[w:]),
                "db_files_max": max(self.db_files)}


def _db_files(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "triage.sqlite3" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                n += 1
        except OSError:
            continue
    return n


def run_soak(work: Path, studies: int, log: Any = print, timeout_per_study: float = 120) -> SoakReport:
    bundle = build_tiny_bundle(work / "bundle")
    pacs = StoreSCP(work / "pacs", "SOAKPACS").start()  # DCMTK storescp: one file per object received
    node = NodeProcess(work / "node", "serve", env={
        "TRIAGE_BUNDLE_PATH": str(bundle), "TRIAGE_DESTINATIONS": f"SOAKPACS@127.0.0.1:{pacs.port}",
        "TRIAGE_LOG_LEVEL": "WARNING", "TRIAGE_STABLE_SECONDS": "2"})
    url = f"sqlite:///{work / 'node' / 'data' / 'triage.sqlite3'}"
    uids: list[str] = []
    report = SoakReport(studies, 0.0)
    t0 = time.monotonic()
    try:
        node.start(timeout=180)
        assert node.proc is not None
        pid = node.proc.pid
        for i in range(studies):
            spec = SeriesSpec(slices=20, size=64, accession=f"SOAK{i:04d}")
            paths = make_ct_series(work / "src" / f"{i:04d}", spec)
            r = storescu(node.dicom_port, paths)
            if r.returncode != 0:
                raise RuntimeError(f"study {i} not accepted: {r.stderr[-500:]}")
            uids.append(spec.study_uid)
            deadline = time.monotonic() + timeout_per_study
            while time.monotonic() < deadline:
                results = scalar(url, "select count(*) from results")
                expected = scalar(url, "select count(*) from result_objects")
                if results == i + 1 and len(pacs.files()) >= expected:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"study {i}: results not delivered in time\n{node.tail()}")
            report.rss_kib.append(rss_kib(pid))
            report.fds.append(fd_count(pid))
            report.db_files.append(_db_files(pid))
            log(f"study {i + 1:4d}/{studies}: rss {report.rss_kib[-1] / 1024:.1f} MiB, fds {report.fds[-1]}, "
                f"db files {report.db_files[-1]}")
            for p in paths:  # keep the source disk use flat
                p.unlink()
        report.seconds = time.monotonic() - t0
    finally:
        node.stop()
        pacs.stop()
    for step in AUDIT_STEPS:
        seen = {u for (u,) in db_rows(url, "select distinct study_uid from audit_events where event_type = :e", e=step)}
        missing = [u for u in uids if u not in seen]
        if missing:
            report.missing_audit[step] = missing
    from pydicom import dcmread

    at_pacs = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in pacs.files()}
    report.undelivered = [u for u in uids if u not in at_pacs]
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    rep = run_soak(work, args.studies)
    g = rep.growth(args.warmup)
    print()
    print(f"Soak: {rep.studies} studies in {rep.seconds:.0f} s ({60 * rep.studies / rep.seconds:.1f} studies/min), "
          f"{os.cpu_count()} CPUs")
    print("| figure | value |")
    print("|---|---|")
    for k, v in g.items():
        print(f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print(f"| studies missing an audit step | {sum(len(v) for v in rep.missing_audit.values())} |")
    print(f"| studies without results at the PACS | {len(rep.undelivered)} |")
    return 0 if not rep.missing_audit and not rep.undelivered else 1


if __name__ == "__main__":
    raise SystemExit(main())
