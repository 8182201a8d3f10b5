"""Inference benchmark: seconds per series by stage and peak RSS, for 32- and 64-slice 512x512 series.

Usage: ``.venv/bin/python bench/inference.py [--bundle DIR] [--repeat 3] [--slices 32,64]
[--runtimes torch,auto] [--tta bundle|flip,none]``: each runtime of the slice network in turn (``auto`` =
ONNX Runtime when the bundle has an ONNX export), and within it each test-time augmentation (``bundle``:
as the manifest says), with its total time as a ratio to the first row.

Series are synthetic phantom studies (positive, so Grad-CAM runs) generated once before timing;
"read+preprocess" is the bundle's preprocessing of the in-memory HU array (DICOM decoding is the
assembler's and is benchmarked in bench/ingest.py). Wall and process CPU seconds are reported:
on a shared, loaded machine CPU time is the better guide to cost.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from triage.imaging.volume import Volume  # noqa: E402
from triage.models.inference import load_bundle  # noqa: E402

STAGES = ("preprocess", "detection", "segmentation", "gradcam")


def make_series(slices: int, seed: int) -> Volume:
    from triage.phantom.generator import PhantomOptions, generate_study

    spacing = 160.0 / slices  # 32 slices at 5 mm, 64 at 2.5 mm: whole brain in both
    s = generate_study(seed, PhantomOptions(size=512, kind="positive", slice_spacing=spacing, tilt_deg=0.0))
    hu = s.hu
    if hu.shape[0] != slices:  # the generator picks the slab; trim or pad to the exact count
        idx = np.clip(np.round(np.linspace(0, hu.shape[0] - 1, slices)).astype(int), 0, hu.shape[0] - 1)
        hu = hu[idx]
    z = hu.shape[0]
    pos = np.stack([np.zeros(z), np.zeros(z), np.arange(z) * s.slice_spacing], axis=1)
    return Volume(hu=np.ascontiguousarray(hu, np.float32), pixel_spacing=s.pixel_spacing,
                  slice_spacing=s.slice_spacing, positions=pos)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slices", default="32,64")
    ap.add_argument("--runtimes", default="torch,auto",
                    help="slice-network runtimes to compare (torch, onnx, auto); the first is the reference")
    ap.add_argument("--tta", default="bundle",
                    help="test-time augmentation to compare per runtime: bundle (as the manifest says), flip, none")
    a = ap.parse_args()
    series = {n: make_series(n, 4242 + n) for n in (int(x) for x in a.slices.split(","))}
    rows = []
    for runtime in a.runtimes.split(","):
        t = time.perf_counter()
        bundle = load_bundle(a.bundle or None, device="cpu", runtime=runtime)
        load_s = time.perf_counter() - t
        print(f"bundle {bundle.identity}, runtime {runtime} -> {bundle.runtime}: load + warm-up {load_s:.2f} s")
        shipped = bundle.manifest.get("test_time_augmentation", "none")
        for tta in a.tta.split(","):
            bundle.manifest["test_time_augmentation"] = shipped if tta == "bundle" else tta
            label = bundle.runtime + (" + flip" if bundle.flip else "")
            for n, vol in series.items():
                runs = []
                for _ in range(a.repeat):
                    c0, w0 = time.process_time(), time.perf_counter()
                    pred = bundle.predict(vol)
                    runs.append((pred.timings, time.perf_counter() - w0, time.process_time() - c0, pred.positive))
                med = {k: float(np.median([r[0][k] for r in runs])) for k in STAGES}
                rows.append((label, n, vol.shape, med, float(np.median([r[1] for r in runs])),
                             float(np.median([r[2] for r in runs])), runs[0][3]))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    reference = {n: wall for rt, n, _, _, wall, _, _ in rows if rt == rows[0][0]}
    print("\n| runtime | slices | shape | read+preprocess | detection | segmentation | Grad-CAM | total wall "
          f"| vs {rows[0][0]} | total CPU | positive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rt, n, shape, med, wall, cpu, positive in rows:
        print(f"| {rt} | {n} | {'x'.join(map(str, shape))} | {med['preprocess']:.2f} | {med['detection']:.2f} | "
              f"{med['segmentation']:.2f} | {med['gradcam']:.2f} | {wall:.2f} | {wall / reference[n]:.2f} | "
              f"{cpu:.2f} | {positive} |")
    print(f"\npeak RSS {rss_mb:.0f} MB (whole process, incl. phantom generation and every runtime); "
          f"median of {a.repeat} runs")
    with open("/proc/loadavg") as fh:
        print(f"load average at end: {fh.read().split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
