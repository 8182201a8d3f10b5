"""Large-series benchmark: peak RSS and wall time of one ``infer``-style pass (read the DICOM files,
run a bundle, build SEG and SR) on a long thin series, bounded by ``inference_max_slices`` (slabs)
and unbounded (the reference, same run).

Usage: ``.venv/bin/python bench/large_series.py [--slices 2000] [--size 256] [--bundle DIR]
[--max-slices 400] [--skip-unbounded]``. Without ``--bundle`` an untrained tiny bundle (64 px) is
used, which measures the pipeline's own memory (volume, masks, result objects) rather than the
network's. Each pass runs in a fresh child process (``tests/large_series_probe.py``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.peers import SeriesSpec, make_ct_series  # noqa: E402
from tests.resilience_support import build_tiny_bundle  # noqa: E402


def run(series: Path, bundle: Path, max_slices: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tests.large_series_probe", str(series), str(bundle), str(max_slices)],
                       cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--bundle", default="")
    ap.add_argument("--max-slices", type=int, default=400)
    ap.add_argument("--skip-unbounded", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_ct_series(work / "series", SeriesSpec(slices=args.slices, size=args.size, spacing=0.625,
                                                   thickness=0.625, pixel_spacing=230.0 / args.size))
        bundle = Path(args.bundle) if args.bundle else build_tiny_bundle(work / "bundle", threshold=0.0)
        rows = [("bounded", args.max_slices)] + ([] if args.skip_unbounded else [("unbounded", 0)])
        print(f"{args.slices} slices of {args.size}x{args.size}, bundle {bundle.name}")
        print(f"{'read':<10} {'max_slices':>10} {'analysed':>9} {'peak MiB':>9} {'wall s':>7} {'RSS ratio':>9}")
        first = None
        for name, cap in rows:
            out, wall = run(work / "series", bundle, cap)
            first = first or out["peak_mib"]
            print(f"{name:<10} {cap or '-':>10} {out['shape'][0]:>9} {out['peak_mib']:>9.0f} {wall:>7.1f} "
                  f"{out['peak_mib'] / first:>9.2f}")


if __name__ == "__main__":
    main()
