"""Training-set memory benchmark: the preprocessed studies held in the process, or memory-mapped.

Usage: ``.venv/bin/python bench/train_memory.py [--dataset 'phantom:100000-100100'] [--cache DIR]
[--size 256] [--stem 2] [--batches 50]``. Each mode runs in a fresh process: it loads the cached
studies as `triage train` does (``mmap`` since session 13; ``memory`` before), then draws slice
batches from them. Prints load time, seconds per batch of 16, peak RSS and the anonymous memory
held per mode, as a ratio to ``memory``. The first ``mmap`` run also writes the network-grid .npy
files (its load time includes that); run it twice to see the warm figure. Studies missing from the
cache are preprocessed first.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def one(mode: str, dataset: str, cache: Path, size: int, stem: int, batches: int) -> dict[str, float]:
    import numpy as np

    from triage.models.data import cached_studies, open_source
    from triage.models.preprocess import PreprocessConfig
    from triage.models.train import SliceSampler

    cfg = PreprocessConfig(size=size, base_size=max(PreprocessConfig.base_size, size))
    t0 = time.perf_counter()
    studies = cached_studies(open_source(dataset), cfg, cache, workers=2, progress=False,
                             target_size=size // stem, mmap=mode == "mmap")
    load = time.perf_counter() - t0
    sampler = SliceSampler(studies, np.random.default_rng(0))
    t0 = time.perf_counter()
    for _ in range(batches):
        sampler.batch(16)
    per_batch = (time.perf_counter() - t0) / batches
    slices = sum(s.windows.shape[0] for s in studies)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"studies": len(studies), "slices": slices, "load_s": load, "batch_s": per_batch, "peak_rss_mb": peak,
            "anon_mb": anon_mb()}


def anon_mb() -> float:
    """Resident anonymous memory (the process's own; mapped file pages the kernel can drop are not in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="phantom:100000-100100")
    ap.add_argument("--cache", default="/tmp/ich-cache")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--stem", type=int, default=2)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--mode", choices=("memory", "mmap"), help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(one(a.mode, a.dataset, Path(a.cache), a.size, a.stem, a.batches)))
        return 0
    rows = {}
    for mode in ("memory", "mmap"):
        cmd = [sys.executable, __file__, "--mode", mode, "--dataset", a.dataset, "--cache", a.cache,
               "--size", str(a.size), "--stem", str(a.stem), "--batches", str(a.batches)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    ref = rows["memory"]
    print(f"\n{a.dataset}: {ref['studies']} studies, {ref['slices']} slices, {a.size} px input, U-Net grid "
          f"{a.size // a.stem} px\n")
    print("| mode | load (s) | per batch of 16 (s) | peak RSS (MB) | anonymous RSS held (MB) | held vs memory |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['load_s']:.1f} | {r['batch_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['anon_mb']:.0f} | "
              f"{r['anon_mb'] / ref['anon_mb']:.2f} |")
    print("\npeak RSS counts the mapped file pages a process touched (the kernel can drop those under "
          "pressure);\nanonymous RSS held, after loading and drawing the batches, is what the process "
          "itself keeps.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
