"""Alerts and the "to read" worklist in real headless Chromium (Playwright) against uvicorn.

A new flagged study raises the title count and a browser notification (permission granted in
the test) within 5 s of its result; acknowledging removes it from "to read", and an
acknowledgement by another user stops the alert; at phone width the worklist has no horizontal
scroll.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from storage.db import session_scope
from storage.models import Feedback
from tests.test_web_browser import ARGS, CHROMIUM, TIMEOUT_MS, login, shot
from tests.web_support import add_user, live_server, seed_study
from triage.context import AppContext

pytestmark = pytest.mark.browser

# Records every Notification the page creates (the real one is still created).
CAPTURE_NOTIFICATIONS = """
window.__notifications = [];
if (window.Notification) {
  const Real = window.Notification;
  window.Notification = class extends Real {
    constructor(title, options) {
      window.__notifications.push({title: title, body: (options || {}).body || "", at: Date.now()});
      super(title, options);
    }
  };
}
"""


@pytest.fixture
def site(sqlite_ctx: AppContext) -> Iterator[dict[str, Any]]:
    ctx = sqlite_ctx
    add_user(ctx, "rad", "radiologist")
    add_user(ctx, "alice", "admin")
    other = add_user(ctx, "rad2", "radiologist", token=True)
    seed_study(ctx, accession="CT-A-0001", received_ago_s=900, probabilities={"any": 0.05})
    seed_study(ctx, accession="CT-A-0002", status="skipped", status_reason="not a head CT", received_ago_s=800)
    old = seed_study(ctx, accession="CT-A-0003", flagged=True, received_ago_s=700,
                     probabilities={"any": 0.9, "subdural": 0.85})
    with live_server(ctx) as base:
        yield {"ctx": ctx, "base": base, "old": old, "other_token": other}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Any, base: str, **kw: Any) -> Any:
    opts = {"viewport": {"width": 1400, "height": 900}, **kw}
    context = browser.new_context(base_url=base, locale="en-GB", timezone_id="UTC", **opts)
    context.grant_permissions(["notifications"], origin=base)
    context.add_init_script(CAPTURE_NOTIFICATIONS)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return page


def rows(page: Any) -> list[str]:
    return page.eval_on_selector_all("#worklist-body tr.study a.open-study", "els => els.map(e => e.textContent)")


def test_new_flagged_study_alerts_and_acknowledging_reads_it(site: dict[str, Any], browser: Any) -> None:
    ctx, base = site["ctx"], site["base"]
    page = new_page(browser, base)
    login(page, "rad")
    page.wait_for_url(f"{base}/")
    # "To read": the skipped study is not there (it is under All studies).
    assert sorted(rows(page)) == ["CT-A-0001", "CT-A-0003"]
    page.click("#view-all")
    page.wait_for_url("**/?view=all")
    assert sorted(rows(page)) == ["CT-A-0001", "CT-A-0002", "CT-A-0003"]
    page.click("#view-to-read")
    page.wait_for_url("**/?view=to-read")
    # The unread flagged study already there counts in the title, without a notification.
    page.wait_for_function("() => document.title.startsWith('(1) ')")
    time.sleep(2.5)  # at least one more poll
    assert page.evaluate("() => window.__notifications.length") == 0

    # A new flagged study: the title count and a notification within 5 s of its result.
    t0 = time.monotonic()
    new = seed_study(ctx, accession="CT-A-0099", flagged=True, received_ago_s=30, ttr_s=29,
                     probabilities={"any": 0.95, "epidural": 0.9})
    page.wait_for_function("() => document.title.startsWith('(2) ') && window.__notifications.length === 1",
                           timeout=5000)
    assert time.monotonic() - t0 < 5.0
    note = page.evaluate("() => window.__notifications[0]")
    assert note["title"] == "Flagged: CT-A-0099" and "EDH" in note["body"]
    assert "DOE" not in note["title"] + note["body"]  # no patient identifiers in notifications
    assert page.evaluate("() => window.__alertsRaised") == 1
    page.wait_for_function("() => document.querySelector('#worklist-body tr.study a.open-study')"
                           ".textContent === 'CT-A-0099'", timeout=10_000)

    # Acknowledge it here: it leaves "to read" (also after the next refresh) and the count drops.
    page.click(f"#worklist-body tr[data-study-id='{new.study_id}'] button.fb-acknowledge")
    page.wait_for_function(f"() => !document.querySelector(\"#worklist-body tr[data-study-id='{new.study_id}']\")")
    page.wait_for_function("() => document.title.startsWith('(1) ')", timeout=5000)
    time.sleep(6)  # a worklist refresh
    assert "CT-A-0099" not in rows(page)
    assert page.locator("#to-read-count").inner_text() == "2"  # CT-A-0001 and CT-A-0003

    # Acknowledged by someone else (another radiologist, through the API token): the alert stops here.
    r = httpx.post(f"{base}/studies/{site['old'].study_id}/feedback", json={"action": "acknowledge"},
                   headers={"Authorization": f"Bearer {site['other_token']}"})
    assert r.status_code == 200
    page.wait_for_function("() => !document.title.startsWith('(')", timeout=5000)
    assert page.locator("#alert-count").inner_text() == "0"
    page.wait_for_function("() => !document.querySelector('#worklist-body a.open-study') || "
                           "![...document.querySelectorAll('#worklist-body a.open-study')]"
                           ".some(a => a.textContent === 'CT-A-0003')", timeout=10_000)
    assert page.evaluate("() => window.__notifications.length") == 1  # nothing new raised

    # The sound can be switched off (kept in the browser).
    assert page.locator("#sound-toggle").inner_text() == "Sound on"
    page.click("#sound-toggle")
    assert page.locator("#sound-toggle").inner_text() == "Sound off"
    page.reload()
    assert page.locator("#sound-toggle").inner_text() == "Sound off"

    # Disagree takes an optional reason (list) and free text before it is saved.
    row = page.locator("#worklist-body tr.study", has_text="CT-A-0001")
    row.locator("button.fb-disagree").click()
    page.select_option("#fb-reason", "artifact")
    page.fill("#fb-comment", "streak artefact from dental fillings")
    page.click("#fb-save")
    page.wait_for_function("() => ![...document.querySelectorAll('#worklist-body a.open-study')]"
                           ".some(a => a.textContent === 'CT-A-0001')")
    with session_scope(ctx.sessions) as s:
        fb = s.scalars(select(Feedback).where(Feedback.action == "disagree")).one()
    assert (fb.reason, fb.comment) == ("artifact", "streak artefact from dental fillings")
    page.context.close()


def test_worklist_at_phone_width_has_no_horizontal_scroll(site: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    page = new_page(browser, site["base"], viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                    device_scale_factor=2)
    login(page, "alice")
    page.wait_for_url(f"{site['base']}/")
    page.goto("/?view=all")
    page.locator("#worklist-body tr.study").first.wait_for()
    sizes = page.evaluate("""() => { const t = document.getElementById('worklist');
        return {doc: document.documentElement.scrollWidth, win: window.innerWidth, table: t.scrollWidth,
                tableBox: t.clientWidth}; }""")
    assert sizes["doc"] <= sizes["win"] == 390, sizes
    assert sizes["table"] <= sizes["tableBox"], sizes
    # Buttons stay usable: the acknowledge button is inside the viewport.
    box = page.locator("#worklist-body tr.study button.fb-acknowledge").first.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    shot(page, tmp_path, "worklist-phone")
    page.context.close()
