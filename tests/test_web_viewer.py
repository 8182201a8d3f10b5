"""The study page's series viewer in real headless Chromium (Playwright) against uvicorn.

The study has 40 stored slices and a SEG made by the real inference job (tests/viewer_support.py);
instance numbers run against the slice order and start at 101, so the captions must come from
the source. With ``TRIAGE_UPDATE_SCREENSHOTS=1`` the screenshots are copied to docs/screenshots/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.test_web_browser import CHROMIUM, TIMEOUT_MS, login, shot  # noqa: F401 - skips without Chromium
from tests.viewer_support import hu_of, seed_imaged_study
from tests.web_support import add_user, live_server
from triage.context import AppContext

pytestmark = pytest.mark.browser

N_SLICES = 40
SIZE = 128


@pytest.fixture
def site(sqlite_ctx: AppContext) -> Iterator[dict[str, Any]]:
    ctx = sqlite_ctx
    add_user(ctx, "rad", "radiologist")
    token = add_user(ctx, "tok", "radiologist", token=True)
    study = seed_imaged_study(ctx, n_slices=N_SLICES, size=SIZE, accession="CT-VIEW-1")
    with live_server(ctx) as base:
        yield {"ctx": ctx, "base": base, "study": study, "token": token}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    from tests.test_web_browser import ARGS

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Any, base: str, **kw: Any) -> Any:
    opts = {"viewport": {"width": 1400, "height": 1000}, **kw}
    context = browser.new_context(base_url=base, locale="en-GB", timezone_id="UTC", **opts)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return page


def state(page: Any) -> dict[str, Any]:
    return page.evaluate("""() => { const v = document.getElementById('viewer');
        return {index: +v.dataset.index, number: v.dataset.instanceNumber, rendered: +(v.dataset.rendered || 0),
                caption: document.getElementById('viewer-slice').textContent, heat: v.dataset.heatShown}; }""")


def pixel(page: Any, x: float, y: float) -> list[int]:
    """The canvas pixel showing image pixel (x, y) of the 128 x 128 matrix (no zoom or pan)."""
    return page.evaluate(f"""() => {{ const c = document.getElementById('viewer-canvas');
        const px = Math.floor(({x} + 0.5) / {SIZE} * c.width), py = Math.floor(({y} + 0.5) / {SIZE} * c.height);
        return Array.from(c.getContext('2d').getImageData(px, py, 1, 1).data); }}""")


def wait_rendered_after(page: Any, count: int) -> None:
    page.wait_for_function(f"() => +(document.getElementById('viewer').dataset.rendered || 0) > {count}")


def test_viewer_scroll_window_overlay(site: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    st = site["study"]
    numbers = [n for _sop, n, _ in st.slices]  # source instance numbers in slice order
    page = new_page(browser, site["base"])
    login(page, "rad")
    page.wait_for_url(f"{site['base']}/")
    page.goto(f"/studies/{st.study_id}")
    page.wait_for_function("() => +(document.getElementById('viewer').dataset.rendered || 0) > 0")
    s0 = state(page)
    # The viewer opens on the first present finding's key slice (volume index 20 = source slice 20).
    assert s0["index"] == 20 and s0["number"] == str(numbers[20]) == "120"
    assert s0["caption"].startswith(f"Im {numbers[20]} (21/{N_SLICES})")
    assert page.evaluate("() => +document.getElementById('viewer').dataset.slices") == N_SLICES
    # The findings table and key image captions use the same numbering.
    assert f"Im {numbers[20]}" in page.locator("#findings").inner_text()
    assert f"Im {numbers[20]}" in page.locator(".keyimages figcaption").first.inner_text()

    # Scroll: the wheel, the keys and the slider; the slice number follows the source's.
    page.locator("#viewer-canvas").hover()
    for step in range(1, 4):
        page.mouse.wheel(0, 120)
        page.wait_for_function(f"() => +document.getElementById('viewer').dataset.index === {20 + step}")
        s = state(page)
        assert s["number"] == str(numbers[20 + step]) and s["caption"].startswith(f"Im {numbers[20 + step]} ")
    page.mouse.wheel(0, -120)
    page.wait_for_function("() => +document.getElementById('viewer').dataset.index === 22")
    page.keyboard.press("ArrowDown")
    page.wait_for_function("() => +document.getElementById('viewer').dataset.index === 23")
    page.keyboard.press("End")
    page.wait_for_function(f"() => +document.getElementById('viewer').dataset.index === {N_SLICES - 1}")
    assert state(page)["number"] == str(numbers[-1]) == "101"
    page.locator("#viewer-slider").fill("5")
    page.wait_for_function("() => +document.getElementById('viewer').dataset.index === 5")
    assert state(page)["caption"].startswith(f"Im {numbers[5]} (6/{N_SLICES})")

    # Window presets change the pixels: brain tissue (HU 32) at image (30, 64).
    hu = hu_of(st.slices[5][2])
    assert hu[64, 30] == 32
    page.wait_for_function("() => document.getElementById('viewer').dataset.index === '5' && "
                           "document.getElementById('viewer-slice').textContent.startsWith('Im')")
    page.click("#preset-brain")
    brain = pixel(page, 30, 64)
    assert abs(brain[0] - 32 / 80 * 255) <= 3 and brain[0] == brain[1] == brain[2]
    before = state(page)["rendered"]
    page.click("#preset-bone")
    wait_rendered_after(page, before)
    bone = pixel(page, 30, 64)
    assert abs(bone[0] - (32 + 800) / 2800 * 255) <= 3, bone
    assert "W 2800 / L 600" in page.locator("#viewer-wl").inner_text()
    # Drag to window: moving right widens the window (the tissue gets closer to mid-grey).
    page.click("#preset-brain")
    box = page.locator("#viewer-canvas").bounding_box()
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 400, box["y"] + 200, steps=4)
    page.mouse.up()
    assert "W 80 " not in page.locator("#viewer-wl").inner_text()
    page.click("#preset-brain")

    # Overlay: the SEG's intraparenchymal blob on the key slice, toggled; the heatmap layer too.
    page.click("button.key-jump >> nth=0")
    page.wait_for_function("() => +document.getElementById('viewer').dataset.index === 20")
    page.wait_for_function("() => document.getElementById('viewer').dataset.heatShown === 'true'")
    page.uncheck("#heat-toggle")
    page.wait_for_function("() => document.getElementById('viewer').dataset.heatShown === 'false'")
    blob = pixel(page, 51, 48)  # inside the intraparenchymal segment
    assert blob[0] > blob[1] + 30, blob  # red-tinted
    shot_png = page.locator("#viewer-canvas").screenshot()
    assert len(shot_png) > 5000
    before = state(page)["rendered"]
    page.uncheck("#seg-intraparenchymal")
    wait_rendered_after(page, before)
    plain = pixel(page, 51, 48)
    assert plain[0] == plain[1] == plain[2], plain
    before = state(page)["rendered"]
    page.check("#heat-toggle")
    wait_rendered_after(page, before)
    assert state(page)["heat"] == "true"
    assert pixel(page, 51, 48) != plain
    page.check("#seg-intraparenchymal")
    page.locator("#viewer-section").scroll_into_view_if_needed()
    shot_el(page, tmp_path, "viewer")

    # Phone size: the viewer fits (no horizontal scroll); the drag tool is "Scroll" on touch screens.
    phone = new_page(browser, site["base"], viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                     device_scale_factor=2)
    login(phone, "rad")
    phone.wait_for_url(f"{site['base']}/")
    phone.goto(f"/studies/{st.study_id}")
    phone.wait_for_function("() => +(document.getElementById('viewer').dataset.rendered || 0) > 0")
    assert phone.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    assert phone.locator("button.tool.chosen").inner_text() == "Scroll"
    phone.locator("#viewer-section").scroll_into_view_if_needed()
    shot_el(phone, tmp_path, "viewer-phone")
    # Touch: one finger up/down scrolls slices; two fingers pinch to zoom.
    cdp = phone.context.new_cdp_session(phone)
    box = phone.locator("#viewer-canvas").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def touch(kind: str, points: list[tuple[float, float]]) -> None:
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [
            {"x": x, "y": y, "id": i} for i, (x, y) in enumerate(points)]})

    start = state(phone)["index"]
    touch("touchStart", [(cx, cy - 60)])
    for dy in range(-40, 61, 20):
        touch("touchMove", [(cx, cy + dy)])
    touch("touchEnd", [])
    phone.wait_for_function(f"() => +document.getElementById('viewer').dataset.index > {start}")
    touch("touchStart", [(cx - 30, cy), (cx + 30, cy)])
    for d in range(40, 121, 20):
        touch("touchMove", [(cx - d, cy), (cx + d, cy)])
    touch("touchEnd", [])
    phone.wait_for_function("() => document.getElementById('viewer-wl').textContent.includes('×')")
    phone.context.close()
    page.context.close()


def shot_el(page: Any, out: Path, name: str) -> None:
    """A screenshot of the window scrolled to the viewer (the full page is not useful for it)."""
    import os
    import shutil

    from tests.test_web_browser import DOCS_SHOTS

    path = out / f"{name}.png"
    page.evaluate("() => document.getElementById('viewer-section').scrollIntoView()")
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000 and path.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("TRIAGE_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SHOTS / path.name)


def test_viewer_data_is_the_stored_hu_and_stays_in_its_study(site: dict[str, Any]) -> None:
    """The slice endpoint sends the stored HU; another study's instance id is refused."""
    st, base = site["study"], site["base"]
    auth = {"Authorization": f"Bearer {site['token']}"}
    m = httpx.get(f"{base}/studies/{st.study_id}/viewer.json", headers=auth).json()
    assert [sl["number"] for sl in m["slices"]] == [n for _s, n, _d in st.slices]
    assert [sg["label"] for sg in m["segments"]] == ["intraparenchymal", "subdural"]
    assert sum(sl["overlay"] for sl in m["slices"]) > 0
    first = m["slices"][7]
    raw = httpx.get(f"{base}/studies/{st.study_id}/viewer/slice/{first['id']}", headers=auth).content
    got = np.frombuffer(raw, dtype="<i2").reshape(SIZE, SIZE)
    assert np.array_equal(got, hu_of(st.slices[7][2]).astype(np.int16))
    assert httpx.get(f"{base}/studies/{st.study_id + 1}/viewer/slice/{first['id']}", headers=auth).status_code == 404
    assert httpx.get(f"{base}/studies/{st.study_id}/viewer/slice/{first['id']}").status_code in (401, 303)
    # A file gone from the store (e.g. purged) is a missing slice, not a server error.
    from sqlalchemy import select

    from storage.db import session_scope
    from storage.models import Instance

    gone = m["slices"][9]
    with session_scope(site["ctx"].sessions) as s:
        rel = s.scalars(select(Instance.path).where(Instance.id == gone["id"])).one()
    site["ctx"].store.path(rel).unlink()
    assert httpx.get(f"{base}/studies/{st.study_id}/viewer/slice/{gone['id']}", headers=auth).status_code == 404


def test_enhanced_ct_frames_are_slices_in_position_order(site: dict[str, Any], tmp_path: Path) -> None:
    """A multi-frame Enhanced CT instance: one viewer slice per frame, ordered by the frames' own
    positions (stored top to bottom here), captioned with the frame, each frame's HU sent."""
    import hashlib

    from pydicom import dcmread

    from storage.db import session_scope
    from storage.models import Series
    from tests.test_dicom_assembly import make_enhanced_ct
    from triage.dicom.header import header_from_dataset
    from triage.dicom.recorder import InstanceRecord, record_batch

    ctx, base = site["ctx"], site["base"]
    path = tmp_path / "enh.dcm"
    make_enhanced_ct(path, frames=6, size=64)
    data = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    ds.StudyInstanceUID = site["study"].study_uid  # a second series of the viewer's study
    rel = ctx.store.instance_rel(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    full = dcmread(path)
    full.StudyInstanceUID = ds.StudyInstanceUID
    import io

    buf = io.BytesIO()
    full.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    ctx.store.write_atomic(rel, data)
    record_batch(ctx.sessions, [InstanceRecord(header_from_dataset(ds, True), rel, len(data),
                                               hashlib.sha256(data).hexdigest(), str(ds.file_meta.TransferSyntaxUID),
                                               "CT_SCANNER", "127.0.0.1")])
    with session_scope(ctx.sessions) as s:
        series_id = s.query(Series.id).filter(Series.series_uid == str(ds.SeriesInstanceUID)).scalar()
    auth = {"Authorization": f"Bearer {site['token']}"}
    m = httpx.get(f"{base}/studies/{site['study'].study_id}/viewer.json?series={series_id}", headers=auth).json()
    assert [sl["frame"] for sl in m["slices"]] == [6, 5, 4, 3, 2, 1]
    assert [sl["z"] for sl in m["slices"]] == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    assert m["slices"][0]["caption"].startswith("Im ") and " fr 6 (1/6) · z 0.0 mm" in m["slices"][0]["caption"]
    assert len(m["series"]) == 2 and not m["segments"]  # the result and its SEG belong to the other series
    for sl in m["slices"]:
        raw = httpx.get(f"{base}/studies/{site['study'].study_id}/viewer/slice/{sl['id']}?frame={sl['frame']}",
                        headers=auth).content
        hu = np.frombuffer(raw, dtype="<i2")
        assert hu.size == 64 * 64 and int(hu[0]) == int(sl["z"])  # HU = stored - 1024 = z in this file
    assert httpx.get(f"{base}/studies/{site['study'].study_id}/viewer/slice/{m['slices'][0]['id']}?frame=7",
                     headers=auth).status_code == 404
