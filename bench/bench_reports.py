"""Benchmark of the result objects: SEG / SR / SC creation and encoding time.

Usage: ``.venv/bin/python bench/bench_reports.py [--slices 64] [--size 512] [--repeat 5]``

Prints a Markdown table (median and max of ``--repeat`` runs after one warm-up run, plus the
cold first call in this process). Synthetic series and masks from ``reports.dicom.synthetic``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from reports.dicom import build_sc, build_seg, build_sr
from reports.dicom.synthetic import IDENTITY, make_prediction, make_series
from triage.labels import SUBTYPES


def _encode(ds) -> int:  # noqa: ANN001
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.tell()


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float, float, float, object]:
    """(first call wall s, median wall s, max wall s, median CPU s of this process, last result)."""
    t0 = time.perf_counter()
    out = fn()
    cold = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return cold, statistics.median(times), max(times), statistics.median(cpu), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sources, volume = make_series(n_slices=args.slices, size=args.size, pixel_spacing=0.45, with_pixels=False)
    rows = []
    for name, subtypes in [("2 segments", ("intraparenchymal", "subdural")), ("5 segments", SUBTYPES)]:
        pred = make_prediction(volume, subtypes=tuple(subtypes))
        nz = sum(int(pred.masks[s][k].any()) for s in subtypes for k in range(args.slices))
        *t, seg = timed(lambda p=pred: build_seg(sources, p, IDENTITY), args.repeat)
        rows.append((f"SEG build, {name} ({nz} non-empty frames)", *t))
        *t, size = timed(lambda s=seg: _encode(s), args.repeat)
        rows.append((f"SEG encode (Explicit VR LE, {size / 1e6:.2f} MB)", *t))
        if name == "2 segments":
            *t, _ = timed(lambda p=pred, s=seg: build_sr(sources, p, IDENTITY, s), args.repeat)
            rows.append(("SR build (6 groups, with segment refs)", *t))
            *t, scs = timed(lambda p=pred: build_sc(sources, volume, p, IDENTITY), args.repeat)
            rows.append((f"SC build incl. key-image rendering ({len(scs)} images)", *t))
    print(
        f"Series {args.slices} x {args.size} x {args.size}; {platform.processor() or platform.machine()}; "
        f"numpy {np.__version__}; repeat {args.repeat} after warm-up\n"
    )
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| step | first call (s) | median (s) | max (s) | median CPU (s) |")
    print("|---|---|---|---|---|")
    for label, cold, med, mx, cpu in rows:
        print(f"| {label} | {cold:.3f} | {med:.3f} | {mx:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
