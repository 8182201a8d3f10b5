"""Soak: many small studies through real node processes; memory, file handles, DB connections, audit.

    .venv/bin/python bench/soak.py [--studies 300] [--warmup 5] [--layout serve|roles] [--database sqlite|postgres]

Each synthetic head CT (20 slices, 64x64) is sent with DCMTK ``storescu``; the node (an untrained
64-px bundle: the path, not the model, is under test) infers and delivers its result objects to
DCMTK storescp. Layout ``serve``: one ``triage serve`` process; ``roles``: ``triage receiver``,
``triage worker`` and ``triage web`` processes sharing the data directory (and the database).
After every study each node process is sampled: RSS (``/proc/<pid>/status``), open file
descriptors (``/proc/<pid>/fd``) and database connections (SQLite: descriptors open on the main
database file; PostgreSQL: TCP connections to the server's port). At the end every study is
accounted for in the audit trail: each step (received, series_complete, queued, inferred,
delivered) present, every instance sent recorded as received, one ``delivered`` event per result
object and no dead delivery; and the audit hash chain verifies. ``tests/test_soak.py`` runs a
reduced version.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for triage/storage/reports

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

from tests.node_process import NodeProcess  # noqa: E402
from tests.peers import SeriesSpec, StoreSCP, make_ct_series, storescu  # noqa: E402
from tests.resilience_support import build_tiny_bundle, db_rows, fd_count, pg_schema, rss_kib, scalar  # noqa: E402

AUDIT_STEPS = ("received", "series_complete", "queued", "inferred", "delivered")
SLICES = 20


@dataclass
class StudyAccount:
    """One study's audit accounting."""

    study_uid: str
    steps: dict[str, int]  # event type -> events
    received_instances: int
    result_objects: int
    delivered: int
    dead: int

    @property
    def complete(self) -> bool:
        return (all(self.steps.get(s, 0) > 0 for s in AUDIT_STEPS) and self.received_instances == SLICES
                and self.result_objects > 0 and self.delivered == self.result_objects and self.dead == 0)


@dataclass
class SoakReport:
    studies: int
    seconds: float
    # The first (or only) node process: serve, or the worker in the roles layout.
    rss_kib: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    db_files: list[int] = field(default_factory=list)
    # Every node process: name -> samples.
    per_process: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    missing_audit: dict[str, list[str]] = field(default_factory=dict)
    undelivered: list[str] = field(default_factory=list)
    accounts: list[StudyAccount] = field(default_factory=list)
    audit_chain_ok: bool | None = None

    def growth(self, warmup: int) -> dict[str, float]:
        w = min(warmup, len(self.rss_kib) - 1)
        return {"rss_mib_after_warmup": self.rss_kib[w] / 1024, "rss_mib_end": self.rss_kib[-1] / 1024,
                "rss_growth_mib": (self.rss_kib[-1] - self.rss_kib[w]) / 1024,
                "fds_after_warmup": self.fds[w], "fds_end": self.fds[-1], "fds_max": max(self.fds[w:])}

    def process_table(self, warmup: int) -> list[dict[str, Any]]:
        rows = []
        for name, s in self.per_process.items():
            w = min(warmup, len(s["rss_kib"]) - 1)
            rows.append({"process": name, "rss_mib_after_warmup": s["rss_kib"][w] / 1024,
                         "rss_mib_end": s["rss_kib"][-1] / 1024,
                         "rss_growth_mib": (s["rss_kib"][-1] - s["rss_kib"][w]) / 1024,
                         "fds_after_warmup": s["fds"][w], "fds_end": s["fds"][-1], "fds_max": max(s["fds"][w:]),
                         "db_conns_after_warmup": s["db_conns"][w], "db_conns_max": max(s["db_conns"])})
        return rows


def _links(pid: int) -> Iterator[str]:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            yield os.readlink(f"/proc/{pid}/fd/{fd}")


def _sqlite_handles(pid: int) -> tuple[int, int]:
    """(connections, descriptors) on the SQLite database, from one look at the process's descriptors:
    a connection is a descriptor on the main file; the descriptors include its -wal/-shm files."""
    links = [link for link in _links(pid) if "triage.sqlite3" in link]
    return sum(1 for link in links if link.endswith("/triage.sqlite3")), len(links)


def _tcp_conns(pid: int, port: int) -> int:
    """Established TCP connections of ``pid`` to ``port`` (PostgreSQL), from /proc socket inodes."""
    inodes = {link[8:-1] for link in _links(pid) if link.startswith("socket:[")}
    n = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                remote_port = int(parts[2].rsplit(":", 1)[1], 16)
                if remote_port == port and parts[3] == "01" and parts[9] in inodes:  # 01 = ESTABLISHED
                    n += 1
    return n


def _accounts(url: str, uids: list[str]) -> list[StudyAccount]:
    counts: dict[tuple[str, str], int] = {}
    for uid, ev, n in db_rows(url, "select study_uid, event_type, count(*) from audit_events group by 1, 2"):
        counts[(uid, ev)] = int(n)
    received: dict[str, int] = {}
    for uid, details in db_rows(url, "select study_uid, details from audit_events where event_type = 'received'"):
        d = details if isinstance(details, dict) else json.loads(details)
        received[uid] = received.get(uid, 0) + int(d.get("count", 0))
    objects = {uid: int(n) for uid, n in db_rows(
        url, "select s.study_uid, count(*) from result_objects o join results r on r.id = o.result_id "
             "join studies s on s.id = r.study_id group by s.study_uid")}
    return [StudyAccount(u, {e: counts.get((u, e), 0) for e in (*AUDIT_STEPS, "delivery_failed")},
                         received.get(u, 0), objects.get(u, 0), counts.get((u, "delivered"), 0),
                         counts.get((u, "delivery_dead"), 0)) for u in uids]


def _chain_ok(url: str) -> bool:
    from storage import audit
    from storage.db import make_engine, make_sessionmaker

    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            return bool(audit.verify(s).ok)
    finally:
        engine.dispose()


def run_soak(work: Path, studies: int, log: Any = print, timeout_per_study: float = 120, layout: str = "serve",
             database_url: str | None = None) -> SoakReport:
    """Send ``studies`` studies one after another and sample the node processes after each."""
    bundle = build_tiny_bundle(work / "bundle")
    pacs = StoreSCP(work / "pacs", "SOAKPACS").start()  # DCMTK storescp: one file per object received
    env = {"TRIAGE_BUNDLE_PATH": str(bundle), "TRIAGE_DESTINATIONS": f"SOAKPACS@127.0.0.1:{pacs.port}",
           "TRIAGE_LOG_LEVEL": "WARNING", "TRIAGE_STABLE_SECONDS": "2"}
    url = f"sqlite:///{work / 'node' / 'data' / 'triage.sqlite3'}"
    pg_port = 0
    if database_url:
        env["TRIAGE_DATABASE_URL"] = url = database_url
        pg_port = urlparse(database_url.replace("+psycopg", "")).port or 5432
    roles = ("serve",) if layout == "serve" else ("worker", "receiver", "web")
    nodes = {r: NodeProcess(work / "node", r, env=env) for r in roles}
    receiver = nodes["serve"] if layout == "serve" else nodes["receiver"]
    uids: list[str] = []
    report = SoakReport(studies, 0.0, per_process={r: {"rss_kib": [], "fds": [], "db_conns": []} for r in roles})
    t0 = time.monotonic()
    try:
        for node in nodes.values():
            node.start(timeout=180)
        pids = {r: n.proc.pid for r, n in nodes.items() if n.proc is not None}
        for i in range(studies):
            spec = SeriesSpec(slices=SLICES, size=64, accession=f"SOAK{i:04d}")
            paths = make_ct_series(work / "src" / f"{i:04d}", spec)
            r = storescu(receiver.dicom_port, paths)
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
                raise RuntimeError(f"study {i}: results not delivered in time\n"
                                   + "\n".join(n.tail(20) for n in nodes.values()))
            db_files: dict[str, int] = {}
            for role, pid in pids.items():
                s = report.per_process[role]
                s["rss_kib"].append(rss_kib(pid))
                s["fds"].append(fd_count(pid))
                if pg_port:
                    s["db_conns"].append(_tcp_conns(pid, pg_port))
                    db_files[role] = s["db_conns"][-1]
                else:  # connections and descriptors counted in the same look, so they agree
                    conns, db_files[role] = _sqlite_handles(pid)
                    s["db_conns"].append(conns)
            first = roles[0]
            report.rss_kib.append(report.per_process[first]["rss_kib"][-1])
            report.fds.append(report.per_process[first]["fds"][-1])
            report.db_files.append(db_files[first])
            log(f"study {i + 1:4d}/{studies}: " + "; ".join(
                f"{role} rss {s['rss_kib'][-1] / 1024:.1f} MiB fds {s['fds'][-1]} db {s['db_conns'][-1]}"
                for role, s in report.per_process.items()))
            for p in paths:  # keep the source disk use flat
                p.unlink()
        report.seconds = time.monotonic() - t0
    finally:
        for node in nodes.values():
            node.stop()
        pacs.stop()
    for step in AUDIT_STEPS:
        seen = {u for (u,) in db_rows(url, "select distinct study_uid from audit_events where event_type = :e", e=step)}
        missing = [u for u in uids if u not in seen]
        if missing:
            report.missing_audit[step] = missing
    report.accounts = _accounts(url, uids)
    report.audit_chain_ok = _chain_ok(url)
    from pydicom import dcmread

    at_pacs = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in pacs.files()}
    report.undelivered = [u for u in uids if u not in at_pacs]
    return report


def _fmt(v: object) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layout", choices=("serve", "roles"), default="serve")
    ap.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    with pg_schema() if args.database == "postgres" else contextlib.nullcontext(None) as url:
        rep = run_soak(work, args.studies, layout=args.layout, database_url=url)
    print()
    print(f"Soak: {rep.studies} studies in {rep.seconds:.0f} s ({60 * rep.studies / rep.seconds:.1f} studies/min), "
          f"layout {args.layout}, {args.database}, {os.cpu_count()} CPUs, warm-up {args.warmup} studies")
    rows = rep.process_table(args.warmup)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    print()
    complete = [a for a in rep.accounts if a.complete]
    print("| audit accounting (per study) | studies |")
    print("|---|---|")
    for step in AUDIT_STEPS:
        print(f"| with a `{step}` event | {sum(1 for a in rep.accounts if a.steps.get(step, 0) > 0)}/{rep.studies} |")
    print(f"| all {SLICES} instances recorded as received | "
          f"{sum(1 for a in rep.accounts if a.received_instances == SLICES)}/{rep.studies} |")
    print(f"| one `delivered` per result object, none dead | "
          f"{sum(1 for a in rep.accounts if a.delivered == a.result_objects > 0 and a.dead == 0)}/{rep.studies} |")
    retried = sum(a.steps["delivery_failed"] for a in rep.accounts)
    print(f"| retried deliveries (`delivery_failed` events) | {retried} |")
    print(f"| fully accounted for | {len(complete)}/{rep.studies} |")
    print(f"| results at the PACS | {rep.studies - len(rep.undelivered)}/{rep.studies} |")
    print(f"| audit hash chain verifies | {'yes' if rep.audit_chain_ok else 'NO'} |")
    for a in rep.accounts:
        if not a.complete:
            print(f"incomplete: {a}")
    ok = not rep.missing_audit and not rep.undelivered and len(complete) == rep.studies and rep.audit_chain_ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
