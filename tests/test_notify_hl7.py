"""HL7 v2 ORU^R01 over MLLP against a real local TCP listener that answers ACKs."""

from __future__ import annotations

import socket
import socketserver
import time
from collections.abc import Iterator

import pytest

from reports.dicom.synthetic import IDENTITY, make_prediction, make_series
from tests.conftest import make_settings
from tests.peers import serving
from triage import notify


class MLLPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), MLLPHandler)
        self.messages: list[str] = []
        self.ack_code = "AA"
        self.mode = "ack"  # ack | wrong_control | close | silent | garbage


class MLLPHandler(socketserver.BaseRequestHandler):
    server: MLLPServer

    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(10)
        buf = b""
        while notify.MLLP_END not in buf:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            buf += chunk
        msg = buf[buf.index(notify.MLLP_START) + 1 : buf.index(notify.MLLP_END)].decode("utf-8")
        self.server.messages.append(msg)
        msh = msg.split("\r")[0].split("|")
        control = msh[9]
        mode = self.server.mode
        if mode == "close":
            return
        if mode == "silent":
            time.sleep(3)
            return
        if mode == "garbage":
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            return
        if mode == "wrong_control":
            control = "someone-else"
        ack = "\r".join(
            [
                f"MSH|^~\\&|RIS||{msh[2]}|{msh[3]}|20260102030405||ACK^R01^ACK|A{control}|P|2.5.1",
                f"MSA|{self.server.ack_code}|{control}|{'' if self.server.ack_code in ('AA', 'CA') else 'rejected'}",
            ]
        )
        self.request.sendall(notify.MLLP_START + ack.encode() + notify.MLLP_END)


@pytest.fixture
def listener() -> Iterator[MLLPServer]:
    with serving(MLLPServer()) as srv:
        yield srv


@pytest.fixture(scope="module")
def result() -> tuple[notify.StudyInfo, list[notify.FindingInfo]]:
    _, volume = make_series(n_slices=8, size=64, with_pixels=False, seed="hl7")
    study = notify.StudyInfo(
        study_uid="1.2.826.0.1.1", accession="ACC|42", patient_id="PID^7", patient_name="O'Neil^Mary & Jo",
        patient_birth_date="19500101", patient_sex="F", study_date="20260102", study_time="031500.25", result_id=42,
    )  # fmt: skip
    return study, notify.findings_from_prediction(make_prediction(volume))


def dest(srv: MLLPServer) -> str:
    return f"127.0.0.1:{srv.server_address[1]}"


def fields(msg: str, name: str) -> list[list[str]]:
    return [seg.split("|") for seg in msg.split("\r") if seg.startswith(name + "|")]


@pytest.mark.parametrize("code", ["AA", "CA"])
def test_oru_delivered_and_acknowledged(listener: MLLPServer, result, code: str) -> None:  # noqa: ANN001
    listener.ack_code = code
    receipt = notify.send_hl7(dest(listener), *result, bundle=IDENTITY, receiving_application="RIS")
    assert receipt.status == code and receipt.channel == "hl7"
    (msg,) = listener.messages
    msh = fields(msg, "MSH")[0]
    assert msh[8] == "ORU^R01^ORU_R01" and msh[11] == "2.5.1" and msh[9] == receipt.detail["control_id"]
    pid = fields(msg, "PID")[0]
    assert pid[3] == "PID\\S\\7"  # delimiters escaped
    assert pid[5] == "O'Neil^Mary \\T\\ Jo" and pid[7] == "19500101" and pid[8] == "F"
    obr = fields(msg, "OBR")[0]
    assert obr[3] == "ACC\\F\\42" and obr[7] == "20260102031500" and obr[25] == "P"
    obx = fields(msg, "OBX")
    assert [int(o[1]) for o in obx] == list(range(1, len(obx) + 1))
    assert obx[0][3].startswith("ICHFLAG^") and obx[0][5].startswith("POSITIVE^") and obx[0][8] == "A"
    by_id = {o[3].split("^")[0]: o for o in obx}
    assert by_id["ICHP-ICH"][5] == "0.97" and by_id["ICHP-ICH"][6] == "1^no units^UCUM"
    assert by_id["ICHF-SDH"][5].startswith("52101004^Present") and by_id["ICHF-EDH"][5].startswith("272519000^Absent")
    assert by_id["ICHV-ICH"][6] == "mL^milliliter^UCUM" and float(by_id["ICHV-ICH"][5]) > 0
    assert by_id["110180"][5] == "1.2.826.0.1.1"
    assert "NOT FOR DIAGNOSTIC USE" in by_id["ICHNOTE"][5]


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
def test_negative_ack_raises(listener: MLLPServer, result, code: str) -> None:  # noqa: ANN001
    listener.ack_code = code
    with pytest.raises(notify.NotifyError, match=f"answered {code}"):
        notify.send_hl7(dest(listener), *result)


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("wrong_control", "control id"),
        ("close", "closed the connection"),
        ("silent", "did not acknowledge"),
        ("garbage", "closed the connection|not MLLP"),
    ],
)
def test_bad_peer_behaviour_raises(listener: MLLPServer, result, mode: str, match: str) -> None:  # noqa: ANN001
    listener.mode = mode
    with pytest.raises(notify.NotifyError, match=match):
        notify.send_hl7(dest(listener), *result, timeout=1.0)


def test_connection_refused_raises(result) -> None:  # noqa: ANN001
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(notify.NotifyError, match="connection to 127.0.0.1"):
        notify.send_hl7(f"127.0.0.1:{port}", *result, timeout=5)
    with pytest.raises(notify.NotifyError, match="not host:port"):
        notify.send_hl7("nohost", *result)


def test_send_notification_hl7_from_settings(listener: MLLPServer, result, tmp_path) -> None:  # noqa: ANN001
    settings = make_settings(tmp_path, hl7_destination=dest(listener), hl7_receiving_application="PACSRIS")
    assert notify.configured_channels(settings) == ["hl7"]
    receipt = notify.send_notification("hl7", settings, *result, bundle=IDENTITY)
    assert receipt.status == "AA"
    msh = fields(listener.messages[0], "MSH")[0]
    assert msh[2] == settings.ae_title and msh[4] == "PACSRIS"
    assert not any(o[3].startswith("ICHDOMAIN") for o in fields(listener.messages[0], "OBX"))
    for inside, value, abnormal in ((False, "N^No^HL70136", "A"), (True, "Y^Yes^HL70136", "N")):
        notify.send_notification("hl7", settings, *result, bundle=IDENTITY,
                                 input_domain={"distance": 3.0, "threshold": 9.5, "in_domain": inside})
        obx = [o for o in fields(listener.messages[-1], "OBX") if o[3].startswith("ICHDOMAIN^")]
        assert len(obx) == 1 and obx[0][5] == value and obx[0][8] == abnormal, obx


def test_negative_exam_message(result) -> None:  # noqa: ANN001
    study, findings = result
    negative = [notify.FindingInfo(f.label, 0.01, f.threshold, False) for f in findings]
    msg, control = notify.build_oru(study, negative, control_id="C1")
    assert control == "C1"
    obx = fields(msg, "OBX")
    assert obx[0][5].startswith("NEGATIVE^") and obx[0][8] == "N"
