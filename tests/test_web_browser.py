"""End-to-end in real headless Chromium (Playwright driving /usr/bin/chromium) against uvicorn.

Also writes a screenshot of each page; with ``TRIAGE_UPDATE_SCREENSHOTS=1`` they are copied to
``docs/screenshots/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from storage import audit
from storage.db import session_scope
from storage.models import AuditEvent, Feedback
from tests.web_support import PASSWORD, add_user, heartbeat, live_server, seed_study
from triage.context import AppContext

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000
DOCS_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"

if not Path(CHROMIUM).exists():  # CI installs it (scripts/setup.sh); fail there, skip on a bare laptop
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing")
    pytest.skip(f"{CHROMIUM} not installed", allow_module_level=True)


@pytest.fixture
def site(sqlite_ctx: AppContext) -> Iterator[dict[str, Any]]:
    ctx = sqlite_ctx
    add_user(ctx, "alice", "admin")
    add_user(ctx, "rad", "radiologist")
    seed_study(ctx, accession="CT-24-0107", patient_name="SMITH^JOHN", patient_id="MRN5531", received_ago_s=240,
               probabilities={"any": 0.08, "subdural": 0.05, "epidural": 0.01})
    seed_study(ctx, accession="CT-24-0108", patient_name="NGUYEN^ANH", patient_id="MRN7719",
               status="skipped", status_reason="not a head CT: series description 'CHEST ROUTINE'", received_ago_s=180)
    seed_study(ctx, accession="CT-24-0109", patient_name="ROSSI^MARIA", patient_id="MRN1184", status="processing",
               received_ago_s=20)
    flagged = seed_study(ctx, accession="CT-24-0101", flagged=True, received_ago_s=1500, ttr_s=84,
                         probabilities={"any": 0.97, "subdural": 0.93, "subarachnoid": 0.61, "epidural": 0.04,
                                        "intraparenchymal": 0.12, "intraventricular": 0.03},
                         deliveries=(("PACS@10.1.2.3:104", True), ("ARCHIVE@10.1.2.9:11112", False)))
    heartbeat(ctx, "ct-node:4711:serve", role="serve")
    job = ctx.queue.enqueue("deliver", {"result_object_id": 1, "destination": "ARCHIVE@10.1.2.9:11112"},
                            study_id=flagged.study_id, max_attempts=1)
    claimed = ctx.queue.claim("ct-node:4711:serve:out")
    assert claimed is not None and claimed.id == job
    ctx.queue.fail(job, "ct-node:4711:serve:out", "association rejected: called AE title not recognized",
                   retry=False)
    with live_server(ctx) as base:
        yield {"ctx": ctx, "base": base, "flagged": flagged}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Any, base: str) -> Any:
    context = browser.new_context(base_url=base, viewport={"width": 1400, "height": 900}, locale="en-GB",
                                  timezone_id="UTC")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return page


def login(page: Any, username: str, password: str = PASSWORD) -> None:
    page.goto("/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login-submit")


def shot(page: Any, out: Path, name: str) -> None:
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000 and path.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("TRIAGE_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SHOTS / path.name)


def test_radiologist_and_admin_flow(site: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    ctx, base, flagged = site["ctx"], site["base"], site["flagged"]
    page = new_page(browser, base)
    page.goto("/")
    page.wait_for_url("**/login?next=*")
    shot(page, tmp_path, "login")
    login(page, "rad")
    page.wait_for_url(f"{base}/")
    rows = page.locator("#worklist-body tr.study")
    rows.first.wait_for()
    assert rows.first.get_attribute("data-flagged") == "true"
    assert "CT-24-0101" in rows.first.inner_text()
    assert "J.D." in rows.first.inner_text() and "DOE" not in page.content()
    assert "not for clinical use" in page.locator("#disclaimer").inner_text().lower()
    assert "not a head CT" not in page.locator("#worklist-body").inner_text()  # "to read": no skipped studies
    page.goto("/?view=all")
    assert "not a head CT" in page.locator("#worklist-body").inner_text()
    page.goto("/")

    # Live update: a new flagged study appears at the top without a reload.
    marker = page.evaluate("() => (window.__marker = Math.random())")
    seed_study(ctx, accession="CT-24-0110", flagged=True, received_ago_s=5, patient_name="LEE^SAM",
               probabilities={"any": 0.88, "epidural": 0.8},
               input_domain={"distance": 10.04, "threshold": 6.05, "in_domain": False})
    page.wait_for_function("() => document.querySelector('#worklist-body tr.study').innerText.includes('CT-24-0110')",
                           timeout=TIMEOUT_MS)
    assert page.evaluate("() => window.__marker") == marker, "the page reloaded"
    # A series unlike the model's training studies is marked, with the numbers on hover.
    badge = rows.first.locator(".ood-badge")
    assert badge.is_visible() and badge.inner_text() == "OUT OF DOMAIN"
    assert "distance 10.0 > 6.0" in (badge.get_attribute("title") or "")
    assert page.locator("#worklist-body .ood-badge").count() == 1
    shot(page, tmp_path, "worklist")

    # Open the flagged study: overlay image loaded, then acknowledge.
    page.click("a.open-study:text('CT-24-0101')")
    page.wait_for_url(f"**/studies/{flagged.study_id}")
    img = page.locator("img.keyimage").first
    img.wait_for()
    page.wait_for_function("() => { const i = document.querySelector('img.keyimage');"
                           " return i.complete && i.naturalWidth > 0; }")
    assert "/overlay" in (img.get_attribute("src") or "")
    page.click("#mode-plain")
    page.wait_for_function("() => { const i = document.querySelector('img.keyimage');"
                           " return i.src.endsWith('/plain') && i.complete && i.naturalWidth > 0; }")
    page.click("#mode-overlay")
    page.wait_for_function("() => document.querySelector('img.keyimage').src.endsWith('/overlay')")
    assert "Subdural hemorrhage" in page.locator("#findings").inner_text()
    assert "ARCHIVE@10.1.2.9:11112" in page.locator("#deliveries").inner_text()
    shot(page, tmp_path, "study")
    page.click(".study-actions button.fb-acknowledge")
    page.wait_for_function("() => document.querySelector('.study-actions .fb-state').innerText.includes('acknowledge')")
    with session_scope(ctx.sessions) as s:
        fb = s.scalars(select(Feedback).where(Feedback.study_id == flagged.study_id)).all()
    assert [f.action for f in fb] == ["acknowledge"]

    # CSRF: the same request without the token is refused.
    status = page.evaluate(f"""() => fetch('/studies/{flagged.study_id}/feedback', {{method: 'POST',
        headers: {{'Content-Type': 'application/json'}}, body: JSON.stringify({{action: 'agree'}})}})
        .then(r => r.status)""")
    assert status == 403

    # A radiologist may not open the audit page.
    resp = page.goto("/audit")
    assert resp is not None and resp.status == 403
    assert "may not open" in page.locator("#error-message").inner_text()
    page.goto("/")
    page.click("#logout")
    page.wait_for_url("**/login")

    # The admin finds the acknowledgement in the audit trail.
    login(page, "alice")
    page.wait_for_url(f"{base}/")
    page.goto("/audit")
    page.select_option("#f-event", "feedback")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/audit?*event_type=feedback*")
    row = page.locator("#audit tbody tr[data-event='feedback']").first
    row.wait_for()
    text = row.inner_text()
    assert "rad" in text and "acknowledge" in text and "CT-24-0101" in text
    assert "verified" in page.locator("#chain").inner_text()
    page.goto("/audit")
    shot(page, tmp_path, "audit")
    page.goto("/ops")
    assert "association rejected" in page.locator("#dead").inner_text()
    shot(page, tmp_path, "operations")
    page.click("#dead button.retry")
    page.wait_for_url("**/ops?msg=*")
    assert "queued again" in page.locator(".notice").inner_text()
    with session_scope(ctx.sessions) as s:
        retried = s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.JOB_RETRIED)).all()
    assert [e.actor for e in retried] == ["alice"]
    page.context.close()


def test_lockout_in_browser(site: dict[str, Any], browser: Any) -> None:
    page = new_page(browser, site["base"])
    for _ in range(site["ctx"].settings.lockout_attempts):
        login(page, "rad", "not the password")
        page.locator("#login-error").wait_for()
    assert "locked" in page.locator("#login-error").inner_text()
    login(page, "rad")
    assert "locked" in page.locator("#login-error").inner_text()
    assert page.url.startswith(site["base"] + "/login")
    page.context.close()
