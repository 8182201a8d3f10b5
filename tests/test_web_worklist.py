"""The worklist's views, search and filters, verdict reasons on the quality panel, the "open in
viewer" link and the study page's numbers (in-process HTTP, SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update
from starlette.testclient import TestClient

from reports.web.app import create_app
from storage import audit
from storage.db import session_scope
from storage.models import AuditEvent, Feedback, Finding, Study
from tests.test_web_pages import csrf_of, log_in
from tests.web_support import add_user, seed_study
from triage.context import AppContext


@pytest.fixture
def site(ctx: AppContext) -> Iterator[tuple[AppContext, TestClient, dict[str, int]]]:
    add_user(ctx, "rad", "radiologist")
    add_user(ctx, "alice", "admin")
    ids = {}
    for acc, kw in (("ACC-SDH", {"flagged": True, "probabilities": {"any": 0.9, "subdural": 0.9}}),
                    ("ACC-EDH", {"flagged": True, "probabilities": {"any": 0.9, "epidural": 0.8},
                                 "patient_name": "ROSSI^MARIA", "patient_id": "MRN1184"}),
                    ("ACC-NEG", {}),
                    ("ACC-SKIP", {"status": "skipped", "status_reason": "not a head CT"}),
                    ("ACC-RUN", {"status": "processing"})):
        ids[acc] = seed_study(ctx, accession=acc, **kw).study_id  # type: ignore[arg-type]
    with session_scope(ctx.sessions) as s:
        s.execute(update(Study).where(Study.id == ids["ACC-EDH"]).values(
            study_date="20260102", study_time="031500.25", patient_birth_date="19500101", patient_sex="F"))
        s.execute(update(Study).where(Study.id != ids["ACC-EDH"]).values(study_date="20251201"))
    with TestClient(create_app(ctx)) as client:
        yield ctx, client, ids


def accessions(html: str) -> list[str]:
    return re.findall(r'class="open-study">([^<]+)<', html)


def test_views_search_and_filters(site: tuple[AppContext, TestClient, dict[str, int]]) -> None:
    ctx, client, ids = site
    assert log_in(client, "rad")[0] == 303
    page = client.get("/").text
    assert accessions(page) == ["ACC-EDH", "ACC-SDH", "ACC-RUN", "ACC-NEG"]  # to read: no skipped study
    assert 'id="to-read-count">4<' in page
    assert sorted(accessions(client.get("/?view=all").text)) == ["ACC-EDH", "ACC-NEG", "ACC-RUN", "ACC-SDH", "ACC-SKIP"]
    rows = client.get
    assert accessions(rows("/worklist/rows?accession=SDH").text) == ["ACC-SDH"]
    assert accessions(rows("/worklist/rows?flag=flagged").text) == ["ACC-EDH", "ACC-SDH"]
    assert accessions(rows("/worklist/rows?flag=not-flagged&view=all").text) == ["ACC-RUN", "ACC-SKIP", "ACC-NEG"]
    assert accessions(rows("/worklist/rows?status=processing").text) == ["ACC-RUN"]
    assert accessions(rows("/worklist/rows?subtype=epidural").text) == ["ACC-EDH"]
    assert accessions(rows("/worklist/rows?date_from=2026-01-01&date_to=2026-01-31").text) == ["ACC-EDH"]
    assert rows("/worklist/rows").headers["x-to-read"] == "4"
    # Age, sex and study time from the header.
    edh = rows("/worklist/rows?accession=ACC-EDH").text
    assert "76 y · F" in edh and "2026-01-02 03:15" in edh
    # Patient search is for admins: a radiologist's is ignored (and there is no field for it).
    assert 'name="patient"' not in page
    assert len(accessions(rows("/worklist/rows?patient=ROSSI").text)) == 4
    client.post("/logout", data={"csrf_token": csrf_of(client, "/")})
    assert log_in(client, "alice")[0] == 303
    assert 'name="patient"' in client.get("/").text
    assert accessions(rows("/worklist/rows?patient=ROSSI").text) == ["ACC-EDH"]
    assert accessions(rows("/worklist/rows?patient=MRN1184").text) == ["ACC-EDH"]
    assert accessions(rows("/worklist/rows?patient=rossi maria").text) == ["ACC-EDH"]  # stored as ROSSI^MARIA
    assert accessions(rows("/worklist/rows?accession=acc-sdh").text) == ["ACC-SDH"]
    # Unknown filter values are ignored, not errors; a LIKE wildcard is taken literally.
    assert client.get("/worklist/rows?flag=maybe&status=nope&subtype=x&date_from=yesterday").status_code == 200
    assert accessions(rows("/worklist/rows?accession=%25").text) == []


def test_acknowledged_studies_leave_to_read_and_alerts(site: tuple[AppContext, TestClient, dict[str, int]]) -> None:
    ctx, client, ids = site
    assert log_in(client, "rad")[0] == 303
    alerts = client.get("/alerts").json()
    assert alerts["count"] == 2 and {a["accession"] for a in alerts["studies"]} == {"ACC-SDH", "ACC-EDH"}
    assert "DOE" not in str(alerts) and "ROSSI" not in str(alerts)  # no patient identifiers
    token = csrf_of(client, "/")
    r = client.post(f"/studies/{ids['ACC-SDH']}/feedback", json={"action": "acknowledge"},
                    headers={"X-CSRF-Token": token})
    assert r.status_code == 200
    assert "ACC-SDH" not in accessions(client.get("/worklist/rows").text)
    assert "ACC-SDH" in accessions(client.get("/worklist/rows?view=all").text)
    assert [a["accession"] for a in client.get("/alerts").json()["studies"]] == ["ACC-EDH"]
    # Disagree with a reason and free text: stored, audited, shown to admins on the quality panel.
    r = client.post(f"/studies/{ids['ACC-EDH']}/feedback",
                    json={"action": "disagree", "reason": "calcification", "comment": "dural calcification"},
                    headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["feedback"]["reason"] == "calcification"
    assert client.get("/alerts").json()["count"] == 0
    bad = client.post(f"/studies/{ids['ACC-EDH']}/feedback", json={"action": "agree", "reason": "calcification"},
                      headers={"X-CSRF-Token": token})
    assert bad.status_code == 400
    with session_scope(ctx.sessions) as s:
        fb = s.scalars(select(Feedback).where(Feedback.study_id == ids["ACC-EDH"])).one()
        assert (fb.action, fb.reason, fb.comment) == ("disagree", "calcification", "dural calcification")
        ev = s.scalars(select(AuditEvent).where(AuditEvent.event_type == audit.FEEDBACK)
                       .order_by(AuditEvent.id.desc())).first()
        assert ev is not None and ev.details["reason"] == "calcification"
    assert client.get("/ops").status_code == 403
    client.post("/logout", data={"csrf_token": csrf_of(client, "/")})
    assert log_in(client, "alice")[0] == 303
    ops = client.get("/ops").text
    panel = ops[ops.index('id="verdict-reasons"'):]
    assert "Calcification or contrast" in panel and "dural calcification" in panel and "ACC-EDH" in panel


def test_open_in_viewer_link_and_numbers_explained(ctx: AppContext) -> None:
    ctx = AppContext(ctx.settings.model_copy(update={
        "viewer_url_template": "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}"}), role="test")
    add_user(ctx, "rad", "radiologist")
    st = seed_study(ctx, accession="ACC-1", flagged=True, probabilities={"any": 0.9, "subdural": 0.9,
                                                                         "subarachnoid": 0.7})
    with session_scope(ctx.sessions) as s:  # SAH called from the slice scores, no region above threshold
        s.execute(update(Finding).where(Finding.result_id == st.result_id, Finding.label == "subarachnoid")
                  .values(volume_ml=0.0, abc2_ml=0.0))
    with TestClient(create_app(ctx)) as client:
        assert log_in(client, "rad")[0] == 303
        link = f"https://ohif.example.org/viewer?StudyInstanceUIDs={st.study_uid}"
        assert f'href="{link}"' in client.get("/").text
        page = client.get(f"/studies/{st.study_id}").text
        assert f'id="open-viewer" href="{link}"' in page
        findings = page[page.index('id="findings"'):]
        sah = findings[findings.index("Subarachnoid"):][:900]
        assert "detected on slice scores, no region above the segmentation threshold" in sah
        assert "Voxel volume" in findings and "ABC/2" in findings
        assert "ellipsoid estimate" in findings  # the tooltip and the note say what ABC/2 is
        sdh = findings[findings.index("Subdural"):][:900]
        assert "no region above" not in sdh  # a measured finding needs no excuse
    ctx.close()


def test_viewer_url_template_is_checked(tmp_path: object) -> None:
    from pydantic import ValidationError

    from triage.config import Settings

    assert Settings(viewer_url_template=" https://v.example/{study_uid} ").viewer_url_template == \
        "https://v.example/{study_uid}"
    for bad in ("https://v.example/viewer", "javascript:alert('{study_uid}')"):
        with pytest.raises(ValidationError):
            Settings(viewer_url_template=bad)
