"""Notifications of a result: webhook (JSON + HMAC-SHA256) and HL7 v2.5.1 ORU^R01 over MLLP.

Both senders raise :class:`NotifyError` on any failure (transport error, timeout, HTTP status
outside 2xx, missing or negative HL7 ACK) so the job queue retries with back-off. Message
layouts are documented in docs/results-format.md ("Notifications").

PHI: payloads carry patient and study identifiers (the receiving systems need them to file the
result); log lines never do, they name the study UID, result id, channel and status only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from triage.labels import DISPLAY, LABELS, SHORT
from triage.logging import get_logger
from triage.models.types import BundleIdentity, Prediction

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Triage-Signature"
TIMESTAMP_HEADER = "X-Triage-Timestamp"
EVENT_HEADER = "X-Triage-Event-Id"
PAYLOAD_VERSION = 1
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"

MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"
HL7_VERSION = "2.5.1"


class NotifyError(RuntimeError):
    """A notification could not be delivered (the caller retries)."""


@dataclass(frozen=True)
class StudyInfo:
    """What a notification says about the study (identifiers as in the ``studies`` row)."""

    study_uid: str
    series_uid: str = ""
    accession: str = ""
    patient_id: str = ""
    patient_name: str = ""  # DICOM PN form, e.g. "Doe^Jane"
    patient_birth_date: str = ""  # YYYYMMDD
    patient_sex: str = ""
    study_date: str = ""  # YYYYMMDD
    study_time: str = ""  # HHMMSS[.ffffff]
    study_description: str = ""
    result_id: int | None = None
    url: str = ""  # link to the study page of the web UI, if configured


@dataclass(frozen=True)
class FindingInfo:
    """One label of a result (mirrors the ``findings`` table)."""

    label: str
    probability: float
    threshold: float
    present: bool
    volume_ml: float = 0.0
    abc2_ml: float = 0.0


@dataclass(frozen=True)
class DeliveryReceipt:
    """What a successful send returns (recorded in ``deliveries.status``)."""

    channel: str
    status: str  # HTTP status code or HL7 acknowledgment code
    detail: dict[str, Any] = field(default_factory=dict)


def findings_from_prediction(prediction: Prediction) -> list[FindingInfo]:
    """The six findings of a prediction, in label order."""
    return [
        FindingInfo(
            label=label,
            probability=float(prediction.exam_probs.get(label, 0.0)),
            threshold=float(prediction.thresholds.get(label, 0.5)),
            present=bool(prediction.present.get(label, False)),
            volume_ml=float(prediction.volumes_ml.get(label, 0.0)),
            abc2_ml=float(prediction.abc2_ml.get(label, 0.0)),
        )
        for label in LABELS
    ]


def _ordered(findings: Sequence[FindingInfo]) -> list[FindingInfo]:
    by_label = {f.label: f for f in findings}
    unknown = set(by_label) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown finding labels: {sorted(unknown)}")
    if "any" not in by_label:
        raise ValueError("findings must include the 'any' label (the exam-level flag)")
    return [by_label[label] for label in LABELS if label in by_label]


def event_id(study: StudyInfo) -> str:
    """Stable id of one result's notification: a receiver can drop retried duplicates by it."""
    key = f"{study.study_uid}\x1f{study.series_uid}\x1f{study.result_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- webhook
def build_payload(
    study: StudyInfo,
    findings: Sequence[FindingInfo],
    *,
    bundle: BundleIdentity | None = None,
    sent_at: dt.datetime | None = None,
    input_domain: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The webhook JSON document (schema in docs/results-format.md). ``input_domain``: the bundle's
    input-domain check of the series (``distance``, ``threshold``, ``in_domain``), None without one."""
    ordered = _ordered(findings)
    any_f = ordered[0]
    positive = bool(any_f.present)
    when = (sent_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return {
        "version": PAYLOAD_VERSION,
        "event": "ich.result",
        "event_id": event_id(study),
        "sent_at": when.isoformat().replace("+00:00", "Z"),
        "flag": "POSITIVE" if positive else "NEGATIVE",
        "priority": "urgent" if positive else "routine",
        "disclaimer": NOT_FOR_DIAGNOSIS,
        "study": asdict(study),
        "findings": [
            {
                "label": f.label,
                "code": SHORT[f.label],
                "name": DISPLAY[f.label],
                "probability": round(f.probability, 6),
                "threshold": round(f.threshold, 6),
                "present": bool(f.present),
                "volume_ml": round(f.volume_ml, 3),
                "abc2_ml": round(f.abc2_ml, 3),
            }
            for f in ordered
        ],
        "model": (
            {"name": bundle.name, "version": bundle.version, "sha256": bundle.sha256} if bundle is not None else None
        ),
        "input_domain": dict(input_domain) if input_domain else None,
    }


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Canonical body bytes (sorted keys, no spaces): what is signed is exactly what is sent."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(body: bytes, secret: str) -> str:
    """``sha256=<hex HMAC-SHA256 of the body with the shared secret>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secret: str) -> bool:
    """Receiver side: constant-time check of a :data:`SIGNATURE_HEADER` value."""
    return bool(header) and hmac.compare_digest(sign(body, secret), str(header))


def send_webhook(
    url: str,
    payload: Mapping[str, Any],
    secret: str,
    *,
    timeout: float = 10.0,
    client: httpx.Client | None = None,
) -> DeliveryReceipt:
    """POST the payload; success is any 2xx. Raises :class:`NotifyError` otherwise.

    Headers: ``Content-Type: application/json``, :data:`SIGNATURE_HEADER` (HMAC over the exact
    body), :data:`TIMESTAMP_HEADER` (= the body's ``sent_at``, so it is covered by the
    signature) and :data:`EVENT_HEADER` (stable across retries).
    """
    if not url:
        raise NotifyError("webhook_url is not configured")
    if not secret:
        raise NotifyError("webhook_secret is not configured: refusing to send an unsigned webhook")
    body = encode_payload(payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "ich-triage-notify/1",
        SIGNATURE_HEADER: sign(body, secret),
        TIMESTAMP_HEADER: str(payload.get("sent_at", "")),
        EVENT_HEADER: str(payload.get("event_id", "")),
    }
    own = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False)
    try:
        resp = http.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("webhook_failed", event_id=payload.get("event_id"), error=type(exc).__name__)
        raise NotifyError(f"webhook POST to {_safe_url(url)} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if own:
            http.close()
    if not 200 <= resp.status_code < 300:
        log.warning("webhook_rejected", event_id=payload.get("event_id"), status=resp.status_code)
        raise NotifyError(f"webhook {_safe_url(url)} answered HTTP {resp.status_code}")
    log.info("webhook_sent", event_id=payload.get("event_id"), status=resp.status_code)
    return DeliveryReceipt("webhook", str(resp.status_code), {"event_id": payload.get("event_id")})


def _safe_url(url: str) -> str:
    """The URL without credentials or query (which may carry tokens) for error messages."""
    u = httpx.URL(url)
    return str(u.copy_with(username=None, password=None, query=None, fragment=None))


# --------------------------------------------------------------------------- HL7 v2 ORU^R01
def hl7_escape(text: object) -> str:
    """Escape HL7 delimiters (``| ^ ~ \\ &``) and drop segment/line breaks in a field value."""
    s = "" if text is None else str(text)
    s = s.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("~", "\\R\\")
    s = s.replace("&", "\\T\\")
    return s.replace("\r", " ").replace("\n", " ")


def _xpn(dicom_pn: str) -> str:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` -> HL7 XPN ``Family^Given^Middle^Suffix^Prefix``."""
    parts = (str(dicom_pn).split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (hl7_escape(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def _segment(name: str, fields: Mapping[int, str]) -> str:
    """A segment from {field number: already escaped value}; unset fields are empty."""
    values = [fields.get(i, "") for i in range(1, max(fields) + 1)]
    return "|".join([name, *values])


def _num(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if value == value else ""  # NaN -> empty


def build_oru(
    study: StudyInfo,
    findings: Sequence[FindingInfo],
    *,
    sending_application: str = "ICHTRIAGE",
    sending_facility: str = "ICHTRIAGE",
    receiving_application: str = "RIS",
    receiving_facility: str = "",
    control_id: str | None = None,
    bundle: BundleIdentity | None = None,
    now: dt.datetime | None = None,
    input_domain: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """An ORU^R01 (HL7 v2.5.1) message and its control id; segments separated by ``\\r``.

    MSH, PID, OBR (the AI triage observation of the accession), then OBX: the exam flag (CWE),
    for each label the probability (NM, UCUM 1), the presence (CWE) and the volume (NM, mL), the
    Study Instance UID, the model, whether the series is within the model's input domain (CWE,
    when the bundle checks it; abnormal flag ``A`` when it is not) and the disclaimer (ST). Result
    status ``P`` (preliminary: not verified by a physician).
    """
    ordered = _ordered(findings)
    control_id = control_id or uuid.uuid4().hex[:20]
    ts = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")
    positive = bool(ordered[0].present)
    e = hl7_escape
    msh = (
        f"MSH|^~\\&|{e(sending_application)}|{e(sending_facility)}|{e(receiving_application)}|"
        f"{e(receiving_facility)}|{ts}||ORU^R01^ORU_R01|{e(control_id)}|P|{HL7_VERSION}|||AL|NE||UNICODE UTF-8"
    )
    pid = _segment(
        "PID",
        {
            1: "1",
            3: e(study.patient_id),
            5: _xpn(study.patient_name),
            7: e(study.patient_birth_date),
            8: e(study.patient_sex),
        },
    )
    obr = _segment(
        "OBR",
        {
            1: "1",
            3: e(study.accession),  # filler order number: the accession the RIS knows
            4: "ICHAI^ICH AI triage^L",
            7: e((study.study_date + study.study_time.split(".")[0])[:14]),  # observation = study date/time
            18: e(study.accession),
            22: ts,  # results report / status change
            25: "P",  # preliminary: not verified by a physician
        },
    )
    segments = [msh, pid, obr]
    obx: list[str] = []

    def add(value_type: str, ident: str, value: str, units: str = "", abnormal: str = "") -> None:
        obx.append(f"OBX|{len(obx) + 1}|{value_type}|{ident}||{value}|{units}||{abnormal}|||P")

    flag = "POSITIVE^Positive for intracranial hemorrhage^L" if positive else "NEGATIVE^No hemorrhage flagged^L"
    add("CWE", "ICHFLAG^ICH AI exam flag^L", flag, abnormal="A" if positive else "N")
    for f in ordered:
        code, name = SHORT[f.label], e(DISPLAY[f.label])
        add("NM", f"ICHP-{code}^{name} probability^L", _num(f.probability), "1^no units^UCUM")
        presence = "52101004^Present^SCT" if f.present else "272519000^Absent^SCT"
        add("CWE", f"ICHF-{code}^{name}^L", presence, abnormal="A" if f.present else "N")
        add("NM", f"ICHV-{code}^{name} volume^L", _num(f.volume_ml), "mL^milliliter^UCUM")
    add("ST", "110180^Study Instance UID^DCM", e(study.study_uid))
    if bundle is not None:
        add("ST", "ICHMODEL^AI model^L", e(f"{bundle.name} {bundle.version} sha256:{bundle.sha256}"))
    if input_domain:
        inside = bool(input_domain.get("in_domain", True))
        add("CWE", "ICHDOMAIN^Series within the model's training domain^L", "Y^Yes^HL70136" if inside else
            "N^No^HL70136", abnormal="N" if inside else "A")
    add("ST", "ICHNOTE^Disclaimer^L", e(NOT_FOR_DIAGNOSIS))
    return "\r".join(segments + obx) + "\r", control_id


def parse_ack(message: str) -> tuple[str, str, str]:
    """(acknowledgment code, control id acknowledged, text) from an ACK's MSA segment."""
    for seg in message.replace("\n", "\r").split("\r"):
        if seg.startswith("MSA"):
            sep = seg[3:4] or "|"
            fields = seg.split(sep)
            code = fields[1] if len(fields) > 1 else ""
            ctrl = fields[2] if len(fields) > 2 else ""
            text = fields[3] if len(fields) > 3 else ""
            return code, ctrl, text
    raise NotifyError("HL7 answer has no MSA segment")


def send_mllp(host: str, port: int, message: str, *, timeout: float = 10.0, max_bytes: int = 1 << 20) -> str:
    """Send one MLLP-framed message and return the framed answer's content (decoded UTF-8)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            sock.sendall(MLLP_START + message.encode("utf-8") + MLLP_END)
            buf = b""
            while MLLP_END not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise NotifyError("HL7 peer closed the connection before acknowledging")
                buf += chunk
                if len(buf) > max_bytes:
                    raise NotifyError("HL7 acknowledgment too large")
    except NotifyError:
        raise
    except TimeoutError as exc:
        raise NotifyError(f"HL7 peer {host}:{port} did not acknowledge within {timeout:g} s") from exc
    except OSError as exc:
        raise NotifyError(f"HL7 connection to {host}:{port} failed: {exc}") from exc
    start = buf.find(MLLP_START)
    end = buf.find(MLLP_END)
    if start < 0 or end < start:
        raise NotifyError("HL7 answer is not MLLP-framed")
    return buf[start + 1 : end].decode("utf-8", errors="replace")


def send_hl7(
    destination: str,
    study: StudyInfo,
    findings: Sequence[FindingInfo],
    *,
    timeout: float = 10.0,
    **oru_kwargs: Any,
) -> DeliveryReceipt:
    """Send the ORU^R01 to ``host:port`` and require an AA or CA acknowledgment of it."""
    host, _, port_s = destination.rpartition(":")
    if not host or not port_s.isdigit():
        raise NotifyError(f"hl7_destination {destination!r} is not host:port")
    message, control_id = build_oru(study, findings, **oru_kwargs)
    answer = send_mllp(host, int(port_s), message, timeout=timeout)
    code, acked, text = parse_ack(answer)
    if acked != control_id:
        raise NotifyError(f"HL7 ACK is for control id {acked!r}, expected {control_id!r}")
    if code not in ("AA", "CA"):
        log.warning("hl7_rejected", study_uid=study.study_uid, ack=code)
        raise NotifyError(f"HL7 peer answered {code or 'nothing'}: {text}".rstrip(": "))
    log.info("hl7_sent", study_uid=study.study_uid, result_id=study.result_id, ack=code)
    return DeliveryReceipt("hl7", code, {"control_id": control_id})


# --------------------------------------------------------------------------- dispatch
def send_notification(
    channel: str,
    settings: Any,
    study: StudyInfo,
    findings: Sequence[FindingInfo],
    *,
    bundle: BundleIdentity | None = None,
    timeout: float = 10.0,
    input_domain: Mapping[str, Any] | None = None,
) -> DeliveryReceipt:
    """Send on ``channel`` ("webhook" or "hl7") as configured in :class:`~triage.config.Settings`."""
    if channel == "webhook":
        payload = build_payload(study, findings, bundle=bundle, input_domain=input_domain)
        return send_webhook(settings.webhook_url, payload, settings.webhook_secret, timeout=timeout)
    if channel == "hl7":
        if not settings.hl7_destination:
            raise NotifyError("hl7_destination is not configured")
        return send_hl7(
            settings.hl7_destination,
            study,
            findings,
            timeout=timeout,
            sending_application=settings.ae_title,
            sending_facility=settings.hl7_sending_facility,
            receiving_application=settings.hl7_receiving_application,
            bundle=bundle,
            input_domain=input_domain,
        )
    raise NotifyError(f"unknown notification channel {channel!r}")


def configured_channels(settings: Any) -> list[str]:
    """The channels a positive result is sent on, given the settings."""
    out = []
    if settings.webhook_url:
        out.append("webhook")
    if settings.hl7_destination:
        out.append("hl7")
    return out
