"""Time to result through the whole node: last instance acknowledged → last result object acknowledged.

    .venv/bin/python bench/pipeline.py [--studies 20] [--stable 5] [--size 512]

A real ``triage serve`` process (SQLite, default shipped bundle) receives synthetic head CT studies
sent one after another by DCMTK ``storescu``; its destination is a pynetdicom storage SCP in this
process that timestamps every result object it acknowledges. For each study the clock runs from
``storescu`` returning (its last instance acknowledged by the node) to the last SEG/SR/SC
acknowledged by the PACS stand-in. Stages come from the node's audit trail and results:
completion (early, or the quiet period), queue wait, read, preprocess, detection, segmentation,
Grad-CAM, result objects, delivery (inferred -> last object acknowledged) and "other" (the rest:
bookkeeping between the stages). Prints p50/p95 of the time to result and, per stage, p50, p95,
mean and its share of the mean time to result. Timings depend on the load of the machine: the
load average is printed with them.

``--thick-thin``: every study carries two reconstructions of one positive phantom scan, a thick
series (5 mm, ~30 slices) and a thin one (0.58 mm, ~240 slices), sent in one association, thin
first for half of the studies and thick first for the other half (``--studies`` per order). The
clock runs from the last instance of the study acknowledged by the node to the flag at the PACS:
the first result object of a positive result acknowledged by the stand-in (0 when the thin series
was flagged before the thick one was even sent). Also printed: the time until the study's last
result object arrived, and what reached the PACS per study (series delivered, negatives withheld).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for triage/storage/reports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pynetdicom import AE, AllStoragePresentationContexts, evt  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from tests.node_process import NodeProcess  # noqa: E402
from tests.peers import dcmtk_env, free_port  # noqa: E402
from triage.phantom.dicom_writer import Identity, write_study  # noqa: E402
from triage.phantom.generator import PhantomOptions, generate_study  # noqa: E402


class PacsStandIn:
    """A storage SCP that records when each instance was acknowledged, by study UID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title="BENCHPACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

        self.by_sop: dict[str, float] = {}

    def _on_store(self, event: Any) -> int:
        import io

        import pydicom

        raw = event.encoded_dataset()  # file meta + dataset as received; no decoding of the objects
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, force=True)
        uid = str(ds.StudyInstanceUID)
        now = time.time()
        with self.lock:
            self.received.setdefault(uid, []).append(now)
            self.by_sop[str(ds.SOPInstanceUID)] = now
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--stable", type=float, default=5.0, help="stable_seconds (default: the node's default, 5)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="TRIAGE_INFERENCE_THREADS (0 = the node's auto)")
    ap.add_argument("--json", help="also write the raw rows here")
    ap.add_argument("--thick-thin", action="store_true",
                    help="studies of a thick (5 mm) and a thin (0.58 mm) series; --studies per sending order")
    ap.add_argument("--pairs", type=int, default=5, help="--thick-thin: distinct phantom scans (reused, new UIDs)")
    args = ap.parse_args()
    if args.thick_thin:
        return thick_thin(args)

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    print(f"generating {args.studies} studies ...", flush=True)
    studies = []
    for i in range(args.studies):
        seed = 880000 + i
        opts = PhantomOptions(size=args.size, kind="positive" if i % 2 == 0 else "negative")
        st = generate_study(seed, opts)
        ident = Identity(index=8000 + i, seed=seed)
        files = write_study(st, ident, work / f"s{i:03d}")["head"]
        studies.append({"uid": ident.study_uid, "files": files, "kind": st.kind, "slices": len(files)})

    pacs = PacsStandIn()
    node = NodeProcess(work / "node", "serve", env={
        "TRIAGE_STABLE_SECONDS": str(args.stable),
        "TRIAGE_DESTINATIONS": f"BENCHPACS@127.0.0.1:{pacs.port}",
        "TRIAGE_LOG_LEVEL": "INFO",  # for the worker's "worker warm" line
        "TRIAGE_INFERENCE_THREADS": str(args.threads),
    })
    rows: list[dict[str, Any]] = []
    load_start = os.getloadavg()[0]
    try:
        node.start(timeout=180)
        deadline = time.time() + 180  # a started node is warm before its first study (bundle, highdicom)
        while '"worker warm"' not in node.log_path.read_text(errors="replace"):
            if time.time() > deadline or not node.alive():
                raise SystemExit(f"the node's worker did not warm up:\n{node.tail()}")
            time.sleep(0.2)
        for i, st in enumerate(studies):
            t0 = time.time()
            subprocess.run(["storescu", "-aec", "ICHTRIAGE", "-aet", "BENCHSCU", "127.0.0.1", str(node.dicom_port),
                           *map(str, st["files"])], check=True, env=dcmtk_env(), capture_output=True)
            acked = time.time()
            expected = None
            deadline = acked + 600
            while time.time() < deadline:
                expected = expected or _objects_expected(node, st["uid"])
                got = len(pacs.received.get(st["uid"], []))
                if expected and got >= expected:
                    break
                time.sleep(0.05)
            else:
                raise SystemExit(f"study {i} results did not arrive:\n{node.tail()}")
            last = max(pacs.received[st["uid"]])
            row = {"study": i, "kind": st["kind"], "slices": st["slices"], "send_s": acked - t0,
                   "time_to_result_s": last - acked, **_stages(node, st["uid"], acked, last)}
            rows.append(row)
            print(f"  study {i:2d} {st['kind']:28s} {st['slices']} slices: {row['time_to_result_s']:.2f} s", flush=True)
    finally:
        node.stop()
        pacs.stop()

    report(rows, args.stable, load_start, os.getloadavg()[0], args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _copy_with_new_uids(files: dict[str, list[Path]], out: Path, index: int) -> dict[str, list[Path]]:
    """The series of one phantom scan as a new study: every UID replaced, identifiers numbered."""
    from pydicom.uid import generate_uid

    study_uid = generate_uid()
    copies: dict[str, list[Path]] = {}
    for name, paths in files.items():
        series_uid = generate_uid()
        (out / name).mkdir(parents=True, exist_ok=True)
        copies[name] = []
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.AccessionNumber = f"TT{index:04d}"
            ds.SeriesNumber = 2 if name == "thick" else 3
            ds.SeriesDescription = "HEAD 5mm STD" if name == "thick" else "HEAD 0.58mm STD"
            target = out / name / p.name
            ds.save_as(target, enforce_file_format=True)
            copies[name].append(target)
    return copies


def _study_state(node: NodeProcess, study_uid: str) -> dict[str, Any]:
    """Positive results' object UIDs, all delivered object UIDs, and whether the node still works
    on the study (a series not final, or deliveries that may run within a minute)."""
    eng = _db(node)
    try:
        with eng.connect() as c:
            pos = [r[0] for r in c.execute(text(
                "select o.sop_instance_uid from result_objects o join results r on r.id = o.result_id "
                "join studies s on s.id = r.study_id where s.study_uid = :u and r.positive = 1"), {"u": study_uid})]
            pending = c.execute(text(
                "select count(*) from series x join studies s on s.id = x.study_id where s.study_uid = :u and "
                "x.state in ('receiving', 'complete', 'selected', 'processing')"), {"u": study_uid}).scalar()
            soon = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + 60))
            jobs = c.execute(text(
                "select count(*) from jobs j join studies s on s.id = j.study_id where s.study_uid = :u and "
                "j.state in ('queued', 'running', 'failed') and j.run_after < :soon"),
                {"u": study_uid, "soon": soon}).scalar()
            results = [dict(r._mapping) for r in c.execute(text(
                "select x.description, r.positive, r.summary from results r join series x on x.id = r.series_id "
                "join studies s on s.id = r.study_id where s.study_uid = :u order by r.id"), {"u": study_uid})]
            flagged = c.execute(text("select flagged from studies where study_uid = :u"), {"u": study_uid}).scalar()
    finally:
        eng.dispose()
    return {"positive_objects": pos, "busy": bool(pending or jobs), "results": results, "flagged": bool(flagged)}


def thick_thin(args: argparse.Namespace) -> int:
    """The --thick-thin benchmark (module docstring)."""
    work = Path(tempfile.mkdtemp(prefix="bench-thickthin-"))
    pairs = []
    print(f"generating {args.pairs} thick + thin scans ...", flush=True)
    for k in range(args.pairs):
        seed = 990000 + k
        files: dict[str, list[Path]] = {}
        for name, spacing in (("thick", 5.0), ("thin", 0.58)):
            st = generate_study(seed, PhantomOptions(size=args.size, kind="positive", slice_spacing=spacing,
                                                     tilt_deg=0.0))
            files[name] = write_study(st, Identity(index=9000 + k, seed=seed), work / f"scan{k}" / name)["head"]
        pairs.append(files)
    pacs = PacsStandIn()
    node = NodeProcess(work / "node", "serve", env={
        "TRIAGE_STABLE_SECONDS": str(args.stable),
        "TRIAGE_DESTINATIONS": f"BENCHPACS@127.0.0.1:{pacs.port}",
        "TRIAGE_LOG_LEVEL": "INFO",
        "TRIAGE_INFERENCE_THREADS": str(args.threads),
    })
    rows: list[dict[str, Any]] = []
    load_start = os.getloadavg()[0]
    try:
        node.start(timeout=180)
        deadline = time.time() + 180
        while '"worker warm"' not in node.log_path.read_text(errors="replace"):
            if time.time() > deadline or not node.alive():
                raise SystemExit(f"the node's worker did not warm up:\n{node.tail()}")
            time.sleep(0.2)
        for i in range(2 * args.studies):
            order = ("thin", "thick") if i % 2 == 0 else ("thick", "thin")
            copies = _copy_with_new_uids(pairs[(i // 2) % len(pairs)], work / f"study{i:03d}", i)
            study_uid = str(pydicom.dcmread(copies["thick"][0], stop_before_pixels=True).StudyInstanceUID)
            files = [*copies[order[0]], *copies[order[1]]]
            t0 = time.time()
            subprocess.run(["storescu", "-aec", "ICHTRIAGE", "-aet", "BENCHSCU", "127.0.0.1", str(node.dicom_port),
                            *map(str, files)], check=True, env=dcmtk_env(), capture_output=True)
            acked = time.time()
            deadline = acked + 600
            flag = None
            while time.time() < deadline:
                state = _study_state(node, study_uid)
                with pacs.lock:
                    arrived = [pacs.by_sop[u] for u in state["positive_objects"] if u in pacs.by_sop]
                if arrived and flag is None:
                    flag = min(arrived)
                if flag is not None and not state["busy"]:
                    break
                time.sleep(0.05)
            else:
                raise SystemExit(f"study {i} was not flagged / finished:\n{node.tail()}")
            with pacs.lock:
                last = max(pacs.received.get(study_uid, [flag]))
            # per result: series, +/- and how it went to the PACS (now / hold: released or withdrawn / withhold)
            delivered = [f"{r['description']} {'+' if r['positive'] else '-'} "
                         f"{json.loads(r['summary']).get('delivery')}" for r in state["results"]]
            row = {"study": i, "order": "-".join(order), "slices": {k: len(v) for k, v in copies.items()},
                   "send_s": acked - t0, "time_to_flag_s": max(0.0, flag - acked), "flag_before_last": flag < acked,
                   "time_to_last_object_s": last - acked, "results": [
                       (r["description"], bool(r["positive"]), json.loads(r["summary"]).get("delivery"))
                       for r in state["results"]], "flagged": state["flagged"]}
            rows.append(row)
            early = " (before the last instance)" if row["flag_before_last"] else ""
            print(f"  study {i:2d} {row['order']:10s} {row['slices']}: send {row['send_s']:.1f} s, "
                  f"flag {row['time_to_flag_s']:.2f} s{early}, last object {row['time_to_last_object_s']:.2f} s, "
                  f"results {delivered}", flush=True)
            shutil.rmtree(work / f"study{i:03d}", ignore_errors=True)
    finally:
        node.stop()
        pacs.stop()
    load_end = os.getloadavg()[0]
    print()
    print(f"Thick + thin, {len(rows)} positive studies ({args.studies} per order), stable_seconds={args.stable:g}, "
          f"{os.cpu_count()} CPUs, load average {load_start:.1f} at start, {load_end:.1f} at end")
    print()
    print("| order | studies | flag p50 (s) | flag p95 (s) | flag max (s) | flagged before the last instance "
          "| last object p50 (s) | last object p95 (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for order in ("thin-thick", "thick-thin", "all"):
        sel = [r for r in rows if order == "all" or r["order"] == order]
        flags = [r["time_to_flag_s"] for r in sel]
        lasts = [r["time_to_last_object_s"] for r in sel]
        print(f"| {order} | {len(sel)} | {pct(flags, 50):.2f} | {pct(flags, 95):.2f} | {max(flags):.2f} | "
              f"{sum(r['flag_before_last'] for r in sel)} | {pct(lasts, 50):.2f} | {pct(lasts, 95):.2f} |")
    conflicting = sum(1 for r in rows if any(d == "now" and not p for _, p, d in r["results"])
                      and any(p for _, p, _ in r["results"]))
    print(f"\nstudies flagged: {sum(r['flagged'] for r in rows)}/{len(rows)}; studies whose PACS got a negative "
          f"next to a positive: {conflicting}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


STAGES = ["completion", "queue_wait", "read", "preprocess", "detection", "segmentation", "gradcam", "objects",
          "delivery", "other"]


def report(rows: list[dict[str, Any]], stable: float, load_start: float, load_end: float, threads: int) -> None:
    """Markdown tables: time to result p50/p95, then every stage's p50, p95, mean and share."""
    ttr = [r["time_to_result_s"] for r in rows]
    early = sum(1 for r in rows if r.get("early"))
    print()
    print(f"Time to result, {len(rows)} studies ({sum(r['kind'] == 'positive' for r in rows)} positive), "
          f"stable_seconds={stable:g}, completed early: {early}/{len(rows)}, {os.cpu_count()} CPUs, "
          f"inference threads {threads or 'auto'}, load average {load_start:.1f} at start, {load_end:.1f} at end")
    print()
    print("| figure | p50 (s) | p95 (s) | max (s) |")
    print("|---|---|---|---|")
    print(f"| last instance acked -> last result object acked | {pct(ttr, 50):.2f} | {pct(ttr, 95):.2f} | "
          f"{max(ttr):.2f} |")
    mean_ttr = statistics.fmean(ttr) or 1.0
    print()
    print("| stage | p50 (s) | p95 (s) | mean (s) | share of mean time to result |")
    print("|---|---|---|---|---|")
    for k in STAGES:
        vals = [float(r.get(k, 0.0)) for r in rows]
        m = statistics.fmean(vals)
        print(f"| {k} | {pct(vals, 50):.2f} | {pct(vals, 95):.2f} | {m:.2f} | {100 * m / mean_ttr:.0f}% |")
    print(f"| **total** | | | {mean_ttr:.2f} | 100% |")


def _db(node: NodeProcess) -> Any:
    return create_engine(f"sqlite:///{node.workdir / 'data' / 'triage.sqlite3'}")


def _objects_expected(node: NodeProcess, study_uid: str) -> int | None:
    """How many result objects the node produced for the study (None until inferred)."""
    eng = _db(node)
    try:
        with eng.connect() as c:
            n = c.execute(text(
                "select count(*) from result_objects o join results r on r.id = o.result_id "
                "join studies s on s.id = r.study_id where s.study_uid = :u and r.superseded = 0"), {"u": study_uid}
            ).scalar()
        return int(n) or None
    except Exception:
        return None
    finally:
        eng.dispose()


def _stages(node: NodeProcess, study_uid: str, acked: float, last: float) -> dict[str, float]:
    eng = _db(node)
    try:
        with eng.connect() as c:
            ev = {r[0]: r[1] for r in c.execute(text(
                "select event_type, min(ts) from audit_events where study_uid = :u group by event_type"),
                {"u": study_uid})}
            early = bool(json.loads(c.execute(text(
                "select details from audit_events where study_uid = :u and event_type = 'series_complete' "
                "order by id limit 1"), {"u": study_uid}).scalar() or "{}").get("early"))
            timings = json.loads(c.execute(text(
                "select r.timings from results r join studies s on s.id = r.study_id where s.study_uid = :u "
                "order by r.id desc limit 1"), {"u": study_uid}).scalar() or "{}")
    finally:
        eng.dispose()

    def ts(name: str) -> float:
        import datetime as dt

        v = ev.get(name)
        if v is None:
            return float("nan")
        d = dt.datetime.fromisoformat(str(v))
        return (d if d.tzinfo else d.replace(tzinfo=dt.UTC)).timestamp()

    out: dict[str, Any] = {"completion": ts("series_complete") - acked,
                           "queue_wait": ts("processing") - ts("series_complete")}
    for k in ("read", "preprocess", "detection", "segmentation", "gradcam", "objects"):
        out[k] = float(timings.get(k, 0.0))
    out["delivery"] = last - ts("inferred")
    out["other"] = (last - acked) - sum(out.values())
    out["early"] = early
    return out


if __name__ == "__main__":
    raise SystemExit(main())
