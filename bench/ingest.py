"""Ingest benchmark: DCMTK storescu → DCMTK storescp, Orthanc and the node, same run.

Sends one synthetic CT series (default 300 slices of 512x512, 16 bit, uncompressed) over 1 and
over 4 associations (4 storescu processes, a quarter of the files each), to:

* DCMTK ``storescp`` writing files (no fsync; the reference),
* DCMTK ``storescp`` made durable: ``--exec-on-reception 'sync -d FILE DIR' --exec-sync`` runs before
  each response, so its ack, like the node's, waits for the file and its directory entry on disk
  (the apples-to-apples row; DCMTK has no fsync option of its own),
* Orthanc (``tests.peers.Orthanc``: started by the benchmark for every run with its own
  configuration and an empty storage and index directory, loopback, ``TCP_NODELAY=1``; its
  defaults otherwise, so ``SyncStorageArea`` is on: it fsyncs every file it stores),
* the node (:class:`triage.dicom.scp.DicomNode`, in this process) with durable writes
  (``fsync`` of every file and its directory) and its database rows committed before each ack.

Every DCMTK process and Orthanc run with ``TCP_NODELAY=1`` (see docs/benchmarks.md). The
receivers take turns within each repeat (interleaved), so all see the same machine load. Each
cell is the median of ``--repeat`` runs; every receiver gets a fresh database and store for
every run, so nothing is a duplicate. "receiver CPU" is the CPU time (user + system) of the
receiving process during the send: storescp's and Orthanc's from /proc, the node's from this
process, which runs only the node meanwhile. Prints a Markdown table with the node's ratios to
Orthanc and to the durable storescp (images/s).

Optional rows: ``--receivers N`` runs N real ``triage receiver`` processes sharing the port
(``dicom_reuse_port``; their CPU summed); ``--ceiling`` runs the node's own pynetdicom AE with a
C-STORE handler that stores nothing (no parsing, file, fsync or database): the fastest any receiver
built on pynetdicom can be on this machine; ``--compare-fsync`` the node with fsync off.

    .venv/bin/python bench/ingest.py [--slices 300] [--size 512] [--repeat 3] [--database-url URL]
        [--receivers 2] [--ceiling] [--compare-fsync]
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.peers import (  # noqa: E402
    Orthanc,
    SeriesSpec,
    StoreSCP,
    dcmtk_env,
    make_ct_series,
    node_context,
    running_node,
    wait_for,
)


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


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process and of its waited-for children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# storescp runs this (through /bin/sh) after writing each file and before answering the C-STORE
DURABLE_ARGS = ("--exec-on-reception", "sync -d #p/#f #p", "--exec-sync")


def run_storescp(paths: list[Path], associations: int, work: Path, durable: bool = False) -> tuple[float, float]:
    """(wall seconds, receiver CPU seconds)."""
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    with StoreSCP(out, "STORESCP", *(DURABLE_ARGS if durable else ())) as scp:
        assert scp.proc is not None
        cpu0 = proc_cpu_seconds(scp.proc.pid)
        seconds = send(scp.port, "STORESCP", paths, associations)
        cpu = proc_cpu_seconds(scp.proc.pid) - cpu0
        if len(scp.files()) != len(paths):
            raise RuntimeError(f"storescp wrote {len(scp.files())} of {len(paths)} files")
    return seconds, cpu


def run_orthanc(paths: list[Path], associations: int, work: Path) -> tuple[float, float]:
    """(wall seconds, receiver CPU seconds) of a fresh Orthanc receiving ``paths``. Orthanc answers
    a C-STORE after the instance is stored and indexed; the count is checked afterwards."""
    d = work / "orthanc"
    shutil.rmtree(d, ignore_errors=True)
    server = Orthanc(d, aet="ORTHANC")
    server.start()
    try:
        assert server.proc is not None
        cpu0 = proc_cpu_seconds(server.proc.pid)
        seconds = send(server.dicom_port, "ORTHANC", paths, associations)
        cpu = proc_cpu_seconds(server.proc.pid) - cpu0
        n = wait_for(lambda: server.get("/statistics")["CountInstances"] >= len(paths) and
                     server.get("/statistics")["CountInstances"], timeout=30, message="Orthanc's instance count")
        if n != len(paths):
            raise RuntimeError(f"Orthanc stored {n} of {len(paths)} instances")
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)
    return seconds, cpu


def fsync_latency_ms(directory: Path, n: int = 20) -> float:
    """Median time to write 512 KiB, fsync it, rename it and fsync the directory (the floor per
    durable instance on this disk)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(512 * 1024)
    times = []
    for i in range(n):
        t = time.perf_counter()
        tmp, target = directory / f".t{i}", directory / f"f{i}"
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fd = os.open(directory, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        times.append(time.perf_counter() - t)
    shutil.rmtree(directory, ignore_errors=True)
    return statistics.median(times) * 1000


def run_node(paths: list[Path], associations: int, work: Path, database_url: str | None, run: int,
             fsync: bool = True) -> tuple[float, float]:
    """(wall seconds, receiver CPU seconds: this process, which runs only the node meanwhile)."""
    from sqlalchemy import func, select

    from storage.models import Instance

    d = work / f"node-{associations}-{run}"
    ctx = node_context(d, database_url=database_url, fsync=str(fsync).lower(), log_level="WARNING")
    try:
        with running_node(ctx) as node:
            cpu0 = time.process_time()
            seconds = send(node.port, "ICHTRIAGE", paths, associations)
            cpu = time.process_time() - cpu0
        with ctx.sessions() as s:
            n = s.scalar(select(func.count()).select_from(Instance))
        if n != len(paths):
            raise RuntimeError(f"node recorded {n} of {len(paths)} instances")
    finally:
        ctx.close()
        shutil.rmtree(d, ignore_errors=True)
    return seconds, cpu


def run_receivers(paths: list[Path], associations: int, work: Path, database_url: str | None,
                  processes: int) -> tuple[float, float]:
    """``processes`` real ``triage receiver`` processes on one port (``dicom_reuse_port``), one
    file store and database: (wall seconds, CPU seconds of all of them during the send)."""
    from sqlalchemy import create_engine, text

    from storage.db import normalise_url
    from tests.node_process import NodeProcess
    from tests.peers import free_port

    d = work / f"receivers-{processes}-{associations}"
    shutil.rmtree(d, ignore_errors=True)
    port = free_port()
    env = {"TRIAGE_DICOM_REUSE_PORT": "true", "TRIAGE_DICOM_PORT": str(port), "TRIAGE_DATA_DIR": str(d / "data"),
           "TRIAGE_STABLE_SECONDS": "600"}
    if database_url:
        env["TRIAGE_DATABASE_URL"] = database_url
    rxs = [NodeProcess(d / f"rx{i}", "receiver", env=env, name=f"rx{i}") for i in range(processes)]
    try:
        for rx in rxs:
            rx.dicom_port = port
            rx.start()
            # the port answers as soon as the first listens: wait for this one's own listener
            wait_for(lambda rx=rx: _listening(rx), timeout=60, message=f"{rx.name} listening")
        pids = [rx.proc.pid for rx in rxs if rx.proc is not None]
        cpu0 = sum(proc_cpu_seconds(p) for p in pids)
        seconds = send(port, "ICHTRIAGE", paths, associations)
        cpu = sum(proc_cpu_seconds(p) for p in pids) - cpu0
        eng = create_engine(normalise_url(database_url or f"sqlite:///{d / 'data' / 'triage.sqlite3'}"))
        try:
            with eng.connect() as c:
                n = c.execute(text("select count(*) from instances")).scalar()
                if database_url:  # a shared server: leave it as found
                    c.execute(text("delete from instances"))
                    c.commit()
        finally:
            eng.dispose()
        if n != len(paths):
            raise RuntimeError(f"the receivers recorded {n} of {len(paths)} instances")
    finally:
        for rx in rxs:
            rx.stop()
        shutil.rmtree(d, ignore_errors=True)
    return seconds, cpu


def _listening(rx: Any) -> bool:
    """True once this receiver process bound its socket (its own log says so; the port alone
    may be another receiver's)."""
    return "dicom node listening" in rx.log_path.read_text(errors="replace") if rx.log_path.exists() else False


def run_bare_scp(paths: list[Path], associations: int, work: Path) -> tuple[float, float]:
    """The library's ceiling: the node's own pynetdicom AE (same presentation contexts, access
    hooks, TCP_NODELAY, log settings) whose C-STORE handler only takes the dataset's bytes and
    answers 0x0000: no parsing, no file, no fsync, no database. (wall seconds, CPU seconds)."""
    from triage.dicom.scp import DicomNode

    d = work / f"bare-{associations}"
    ctx = node_context(d, log_level="WARNING")
    try:
        node = DicomNode(ctx, host="127.0.0.1", port=0)
        node._on_store = lambda event: (event.encoded_dataset(include_meta=False), 0x0000)[1]  # type: ignore[method-assign]
        node.start()
        try:
            cpu0 = time.process_time()
            seconds = send(node.port, "ICHTRIAGE", paths, associations)
            cpu = time.process_time() - cpu0
        finally:
            node.stop()
    finally:
        ctx.close()
        shutil.rmtree(d, ignore_errors=True)
    return seconds, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--database-url", default=None, help="default: SQLite in the node's data dir")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory")
    ap.add_argument("--compare-fsync", action="store_true",
                    help="also run the node with fsync off (separates disk latency from software cost)")
    ap.add_argument("--receivers", type=int, default=1,
                    help="also run N 'triage receiver' processes sharing the port (dicom_reuse_port)")
    ap.add_argument("--ceiling", action="store_true",
                    help="also run the node's pynetdicom AE with a C-STORE handler that stores nothing: the "
                         "fastest any receiver built on pynetdicom can be here (ratios in its row are its own)")
    args = ap.parse_args(argv)

    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    from triage.logging import configure_logging

    configure_logging(level="WARNING")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        paths = make_ct_series(work / "series", SeriesSpec(slices=args.slices, size=args.size))
        mb = sum(p.stat().st_size for p in paths) / 1e6
        rows = []

        def med(runs: list[tuple[float, float]]) -> tuple[float, float]:
            return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

        for associations in (1, 4):
            ref: list[tuple[float, float]] = []
            durable: list[tuple[float, float]] = []
            orth: list[tuple[float, float]] = []
            node: list[tuple[float, float]] = []
            nosync: list[tuple[float, float]] = []
            bare: list[tuple[float, float]] = []
            multi: list[tuple[float, float]] = []
            for run in range(args.repeat):  # interleaved, so all see the same machine load
                ref.append(run_storescp(paths, associations, work))
                durable.append(run_storescp(paths, associations, work, durable=True))
                orth.append(run_orthanc(paths, associations, work))
                node.append(run_node(paths, associations, work, args.database_url, run))
                if args.compare_fsync:
                    nosync.append(run_node(paths, associations, work, args.database_url, run, fsync=False))
                if args.ceiling:
                    bare.append(run_bare_scp(paths, associations, work))
                if args.receivers > 1:
                    multi.append(run_receivers(paths, associations, work, args.database_url, args.receivers))
            refs = (med(ref)[0], med(orth)[0], med(durable)[0])
            rows.append((associations, "DCMTK storescp (no fsync)", *med(ref), None))
            rows.append((associations, "DCMTK storescp (durable: sync per file)", *med(durable), None))
            rows.append((associations, "Orthanc 1.10 (SyncStorageArea on)", *med(orth), None))
            rows.append((associations, "node (fsync on)", *med(node), refs))
            if nosync:
                rows.append((associations, "node (fsync off)", *med(nosync), refs))
            if multi:
                rows.append((associations, f"node, {args.receivers} receiver processes on one port", *med(multi), refs))
            if bare:
                rows.append((associations, "pynetdicom SCP storing nothing (the library's ceiling)", *med(bare), refs))
        db = "PostgreSQL" if args.database_url and "postgres" in args.database_url else "SQLite"
        load = os.getloadavg()[0]
        print(f"\n{args.slices} slices {args.size}x{args.size} ({mb:.0f} MB), median of {args.repeat}, "
              f"database {db}, {os.cpu_count()} CPUs, load average {load:.1f}, "
              f"write+fsync of 512 KiB here: {fsync_latency_ms(work / 'fsync-probe'):.1f} ms\n")
        print("| associations | receiver | seconds | images/s | MB/s | receiver CPU ms/image "
              "| node/storescp | node/Orthanc | node/durable storescp |")
        print("|---|---|---|---|---|---|---|---|---|")
        for associations, name, secs, cpu, ref_secs in rows:
            ratios = [f"{r / secs:.2f}" for r in ref_secs] if ref_secs else ["", "", ""]
            print(f"| {associations} | {name} | {secs:.2f} | {args.slices / secs:.0f} | {mb / secs:.0f} | "
                  f"{cpu / args.slices * 1000:.1f} | {' | '.join(ratios)} |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
