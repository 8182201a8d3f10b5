"""Webhook notifications against a real local HTTP server that verifies the HMAC signature."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reports.dicom.synthetic import IDENTITY, make_prediction, make_series
from tests.conftest import make_settings
from tests.peers import serving
from triage import notify
from triage.labels import LABELS

SECRET = "s3cret-shared-key"


class Receiver(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.status = 200
        self.delay = 0.0


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        ok = notify.verify_signature(body, self.headers.get(notify.SIGNATURE_HEADER), SECRET)
        self.server.requests.append({"body": body, "headers": dict(self.headers), "signature_ok": ok})
        time.sleep(self.server.delay)
        status = self.server.status if ok else 401
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serving(Receiver()) as srv:
        yield srv


@pytest.fixture(scope="module")
def result() -> tuple[notify.StudyInfo, list[notify.FindingInfo]]:
    _, volume = make_series(n_slices=8, size=64, with_pixels=False, seed="notify")
    findings = notify.findings_from_prediction(make_prediction(volume))
    study = notify.StudyInfo(
        study_uid="1.2.826.0.1.1", series_uid="1.2.826.0.1.2", accession="ACC|42", patient_id="PID^7",
        patient_name="Doe^Jane", study_date="20260102", study_time="031500", result_id=42,
    )  # fmt: skip
    return study, findings


def url(srv: Receiver) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/hook"


def test_webhook_delivers_signed_payload(receiver: Receiver, result) -> None:  # noqa: ANN001
    study, findings = result
    payload = notify.build_payload(study, findings, bundle=IDENTITY)
    receipt = notify.send_webhook(url(receiver), payload, SECRET)
    assert receipt.status == "200" and receipt.channel == "webhook"
    (req,) = receiver.requests
    assert req["signature_ok"]
    assert req["headers"][notify.SIGNATURE_HEADER].startswith("sha256=")
    doc = json.loads(req["body"])
    assert req["headers"][notify.TIMESTAMP_HEADER] == doc["sent_at"]  # timestamp covered by the signature
    assert req["headers"][notify.EVENT_HEADER] == doc["event_id"] == notify.event_id(study)
    assert doc["flag"] == "POSITIVE" and doc["priority"] == "urgent"
    assert doc["study"]["accession"] == "ACC|42" and doc["study"]["study_uid"] == study.study_uid
    assert [f["label"] for f in doc["findings"]] == list(LABELS)
    assert doc["model"]["sha256"] == IDENTITY.sha256
    assert doc["disclaimer"] == "NOT FOR DIAGNOSTIC USE"
    # A tampered body fails verification.
    assert not notify.verify_signature(req["body"].replace(b"POSITIVE", b"NEGATIVE"), req["headers"][
        notify.SIGNATURE_HEADER], SECRET)  # fmt: skip


def test_webhook_wrong_secret_is_rejected_and_raises(receiver: Receiver, result) -> None:  # noqa: ANN001
    study, findings = result
    with pytest.raises(notify.NotifyError, match="HTTP 401"):
        notify.send_webhook(url(receiver), notify.build_payload(study, findings), "not-the-secret")
    assert receiver.requests[0]["signature_ok"] is False


def test_webhook_server_error_raises(receiver: Receiver, result) -> None:  # noqa: ANN001
    receiver.status = 503
    with pytest.raises(notify.NotifyError, match="HTTP 503"):
        notify.send_webhook(url(receiver), notify.build_payload(*result), SECRET)


def test_webhook_timeout_raises(receiver: Receiver, result) -> None:  # noqa: ANN001
    receiver.delay = 2.0
    with pytest.raises(notify.NotifyError, match="Timeout"):
        notify.send_webhook(url(receiver), notify.build_payload(*result), SECRET, timeout=0.3)


def test_webhook_connection_refused_raises(result) -> None:  # noqa: ANN001
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(notify.NotifyError, match="ConnectError"):
        notify.send_webhook(f"http://127.0.0.1:{port}/hook", notify.build_payload(*result), SECRET, timeout=5)


def test_webhook_requires_url_and_secret(result) -> None:  # noqa: ANN001
    with pytest.raises(notify.NotifyError, match="webhook_secret"):
        notify.send_webhook("http://127.0.0.1:9/x", notify.build_payload(*result), "")
    with pytest.raises(notify.NotifyError, match="webhook_url"):
        notify.send_webhook("", notify.build_payload(*result), SECRET)


def test_send_notification_uses_settings(receiver: Receiver, result, tmp_path) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path, webhook_url=url(receiver), webhook_secret=SECRET)
    assert notify.configured_channels(settings) == ["webhook"]
    receipt = notify.send_notification("webhook", settings, *result, bundle=IDENTITY)
    assert receipt.status == "200" and receiver.requests[0]["signature_ok"]
    assert json.loads(receiver.requests[0]["body"])["input_domain"] is None, "a bundle without the check says nothing"
    ood = {"distance": 40.1, "threshold": 9.5, "in_domain": False}
    notify.send_notification("webhook", settings, *result, bundle=IDENTITY, input_domain=ood)
    assert json.loads(receiver.requests[1]["body"])["input_domain"] == ood and receiver.requests[1]["signature_ok"]
    with pytest.raises(notify.NotifyError, match="unknown notification channel"):
        notify.send_notification("pager", settings, *result)
    with pytest.raises(notify.NotifyError, match="hl7_destination is not configured"):
        notify.send_notification("hl7", settings, *result)


def test_payload_rejects_bad_findings(result) -> None:  # noqa: ANN001
    study, findings = result
    with pytest.raises(ValueError, match="'any'"):
        notify.build_payload(study, findings[1:])
    with pytest.raises(ValueError, match="unknown finding labels"):
        notify.build_payload(study, [*findings, notify.FindingInfo("tumour", 0.9, 0.5, True)])
