"""The study page's series viewer: time to first image and per-slice times for a 40-slice series.

    .venv/bin/python bench/viewer.py [--slices 40] [--size 512] [--runs 5]

A temporary node (SQLite, file store) receives a synthetic head CT of ``--slices`` slices of
``--size`` x ``--size`` through the receiver's recorder, and the real inference job writes its
result objects (SEG, SR, SC, previews; a stand-in model gives two subtype blobs,
tests/viewer_support.py). The web application runs under uvicorn. Then:

* HTTP (httpx, API token): the viewer manifest, the first (key) slice's HU and its SEG overlay with
  the server's slice cache cold, and every slice of the series cold and warm (cached);
* the browser (headless Chromium through Playwright, when installed): from navigation to the
  study page until the first slice is drawn on the canvas (``performance.now()`` at the first
  draw, i.e. since navigation start; server cache cold on each run), and, with all slices
  loaded, the time to draw one slice (windowing + overlay) while stepping through the series
  and the time to redraw for a window preset.

Prints a Markdown table (docs/benchmarks.md, "Series viewer").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"


def http_numbers(base: str, token: str, study_id: int, cache: Any) -> dict[str, Any]:
    import httpx

    h = {"Authorization": f"Bearer {token}"}
    out: dict[str, Any] = {}
    with httpx.Client(base_url=base, headers=h, timeout=60) as c:
        cache.clear()
        t0 = time.perf_counter()
        m = c.get(f"/studies/{study_id}/viewer.json").json()
        out["manifest"] = time.perf_counter() - t0
        first = m["slices"][m["keys"][0]["index"] if m["keys"] else len(m["slices"]) // 2]
        t1 = time.perf_counter()
        assert len(c.get(f"/studies/{study_id}/viewer/slice/{first['id']}").content) == 2 * m["rows"] * m["cols"]
        out["first_slice"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        c.get(f"/studies/{study_id}/viewer/overlay/{first['id']}")
        out["first_overlay"] = time.perf_counter() - t2
        out["first_total"] = time.perf_counter() - t0
        for label in ("cold", "warm"):
            if label == "cold":
                cache.clear()
            times = []
            for sl in m["slices"]:
                t = time.perf_counter()
                c.get(f"/studies/{study_id}/viewer/slice/{sl['id']}")
                times.append(time.perf_counter() - t)
            out[f"slice_{label}"] = times
        out["n"] = len(m["slices"])
        out["matrix"] = f"{m['rows']} x {m['cols']}"
    return out


def browser_numbers(base: str, study_id: int, cache: Any, runs: int) -> dict[str, Any] | None:
    if not Path(CHROMIUM).exists():
        return None
    from playwright.sync_api import sync_playwright

    from tests.web_support import PASSWORD

    out: dict[str, Any] = {"first_image": []}
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True)
        page = b.new_page(base_url=base, viewport={"width": 1400, "height": 1000})
        page.goto("/login")
        page.fill("#username", "reader")
        page.fill("#password", PASSWORD)
        page.click("#login-submit")
        page.wait_for_url(f"{base}/")
        for _ in range(runs):
            cache.clear()
            page.goto(f"/studies/{study_id}")
            page.wait_for_function("() => document.getElementById('viewer').dataset.firstImageMs", timeout=60_000)
            out["first_image"].append(float(page.evaluate(
                "() => +document.getElementById('viewer').dataset.firstImageMs")) / 1000)
        # All slices loaded (prefetch), then step through the series: one draw per key press.
        n = int(page.evaluate("() => +document.getElementById('viewer').dataset.slices"))
        page.wait_for_timeout(3000)
        page.locator("#viewer-canvas").hover()
        step = page.evaluate(f"""() => {{
            const v = document.getElementById('viewer');
            const start = +v.dataset.rendered;
            document.dispatchEvent(new KeyboardEvent('keydown', {{key: 'Home'}}));
            const t0 = performance.now();
            for (let i = 1; i < {n}; i++) document.dispatchEvent(new KeyboardEvent('keydown', {{key: 'ArrowDown'}}));
            const t = performance.now() - t0;
            return {{ms: t, draws: +v.dataset.rendered - start - 1}}; }}""")
        assert step["draws"] == n - 1, step  # every slice was in memory: each key press drew at once
        out["per_slice_draw"] = step["ms"] / 1000 / step["draws"]
        win = page.evaluate("""() => { const t0 = performance.now();
            for (let i = 0; i < 20; i++) document.getElementById(i % 2 ? 'preset-brain' : 'preset-bone').click();
            return (performance.now() - t0) / 20; }""")
        out["window_redraw"] = win / 1000
        b.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=5, help="browser page loads (cold server cache each)")
    args = p.parse_args()

    from reports.web import viewer
    from storage.migrate import upgrade
    from tests.conftest import make_settings
    from tests.viewer_support import seed_imaged_study
    from tests.web_support import add_user, live_server
    from triage.context import AppContext

    class Cache:
        @staticmethod
        def clear() -> None:
            viewer.CACHE.__init__(viewer.CACHE_BYTES)  # type: ignore[misc]
            viewer._SEG_CACHE.clear()

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/triage.sqlite3"
        upgrade(url)
        ctx = AppContext(make_settings(Path(tmp), database_url=url), role="bench")
        try:
            t0 = time.perf_counter()
            st = seed_imaged_study(ctx, n_slices=args.slices, size=args.size, accession="BENCH-VIEW")
            seed_s = time.perf_counter() - t0
            token = add_user(ctx, "reader", "radiologist", token=True)
            assert token
            with live_server(ctx) as base:
                h = http_numbers(base, token, st.study_id, Cache)
                b = browser_numbers(base, st.study_id, Cache, args.runs)
        finally:
            ctx.close()

    cold, warm = h["slice_cold"], h["slice_warm"]
    print(f"Series: {h['n']} slices of {h['matrix']} (int16 CT, Explicit VR LE), SEG with 2 segments; "
          f"stored and inferred in {seed_s:.1f} s. Host: {os.cpu_count()} CPUs.\n")
    print("| measure | time |")
    print("|---|---|")
    if b:
        fi = b["first_image"]
        print(f"| first image on screen (browser, navigation start → first canvas draw; cold server cache, "
              f"median of {len(fi)}) | {_ms(statistics.median(fi))} (min {_ms(min(fi))}, max {_ms(max(fi))}) |")
    print(f"| viewer manifest, cold (HTTP; slice order from the rows, decodes the SEG once) | {_ms(h['manifest'])} |")
    print(f"| first slice HU, cold (HTTP, decode from the file store) | {_ms(h['first_slice'])} |")
    print(f"| first slice SEG overlay (SEG decoded by the manifest) | {_ms(h['first_overlay'])} |")
    print(f"| manifest + first slice + overlay (HTTP) | {_ms(h['first_total'])} |")
    print(f"| per slice, cold (HTTP, median / p90 / max of {len(cold)}) | {_ms(statistics.median(cold))} / "
          f"{_ms(sorted(cold)[int(0.9 * (len(cold) - 1))])} / {_ms(max(cold))} |")
    print(f"| per slice, cached (HTTP, median) | {_ms(statistics.median(warm))} |")
    if b:
        print(f"| per slice draw in the browser (window + overlay, stepping through {h['n']}) | "
              f"{_ms(b['per_slice_draw'])} |")
        print(f"| window preset redraw (browser, no server round trip) | {_ms(b['window_redraw'])} |")
    else:
        print("| browser numbers | Chromium not installed |")


if __name__ == "__main__":
    main()
