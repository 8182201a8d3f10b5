"""A 2,000-slice series (0.625 mm, 256x256) stays under the documented memory limit: the worker reads
it as at most ``inference_max_slices`` averaged slabs (docs/deploy.md, "Sizing"). Measured in a child
process (peak RSS) that reads, runs a bundle and builds the SEG and SR as the ``infer`` job does.
(Unbounded, the same series peaked at 4,050 MiB and took 6x longer: bench/large_series.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import SeriesSpec, make_ct_series
from tests.resilience_support import build_tiny_bundle
from triage.config import Settings

ROOT = Path(__file__).resolve().parents[1]
# docs/deploy.md: one 256x256 series of any length, default inference_max_slices (400), under 2.5 GiB
# (measured 1.3-2.1 GiB across runs: allocator arenas vary with load; unbounded: 4.0 GiB).
DOCUMENTED_LIMIT_MIB_256 = 2560


def probe(series: Path, bundle: Path, max_slices: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.large_series_probe", str(series), str(bundle), str(max_slices)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_2000_slice_series_stays_under_the_documented_memory_limit(tmp_path: Path) -> None:
    default = Settings.model_fields["inference_max_slices"].default
    paths = make_ct_series(tmp_path / "series", SeriesSpec(slices=2000, size=256, spacing=0.625, thickness=0.625,
                                                            pixel_spacing=0.9))
    assert len(paths) == 2000
    bundle = build_tiny_bundle(tmp_path / "bundle", threshold=0.0)  # positive: masks and a SEG are built
    out = probe(tmp_path / "series", bundle, default)
    assert out["shape"] == [400, 256, 256]
    assert out["slab"] == {"slices_per_slab": 5, "source_slices": 2000, "max_slices": default}
    assert out["span_mm"] > 0.99 * 1999 * 0.625  # the whole series is covered, not a part of it
    assert out["peak_mib"] < DOCUMENTED_LIMIT_MIB_256, out
