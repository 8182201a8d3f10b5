"""The probes the deployment files configure work against the real roles.

Starts ``triage web`` and ``triage receiver`` as the images and units do (separate processes,
configuration from ``TRIAGE_*`` variables only, SQLite and the file store in a data directory),
probes them with deploy/healthcheck.py as compose and Kubernetes do (``/healthz`` live,
``/readyz`` ready on a web-only process with no worker anywhere, the DICOM port open, the
database migrated),
then stops them with SIGTERM as an orchestrator does and expects a clean exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.peers import dcmtk_env

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "deploy" / "healthcheck.py"
TRIAGE = Path(sys.executable).parent / "triage"

pytestmark = pytest.mark.network
StartRole = Callable[[str], subprocess.Popen[str]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def role_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({
        "TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "TRIAGE_DISK_FLOOR_MB": "0",
        "TRIAGE_WEB_HOST": "127.0.0.1",
        "TRIAGE_WEB_PORT": str(_free_port()),
        "TRIAGE_DICOM_HOST": "127.0.0.1",
        "TRIAGE_DICOM_PORT": str(_free_port()),
        "TRIAGE_ALLOWED_AETS": "PACS@127.0.0.1",
        "TRIAGE_LOG_FORMAT": "json",
    })
    return env


def _load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", PROBE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hc = _load_probe()


@dataclass
class ProbeResult:
    returncode: int
    stderr: str


def _probe(env: dict[str, str], *args: str) -> ProbeResult:
    """deploy/healthcheck.py's main() in this process, with the role's environment (saves an interpreter start)."""
    saved = dict(os.environ)
    err = io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stderr(err):
            code = hc.main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ProbeResult(code, err.getvalue())


def _wait_for(env: dict[str, str], proc: subprocess.Popen[str], *args: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"role exited early with {proc.returncode}"
        if _probe(env, "--timeout", "2", *args).returncode == 0:
            return
        time.sleep(0.5)
    pytest.fail(f"probe {args} not healthy within {timeout} s")


@pytest.fixture
def start_role(role_env: dict[str, str], tmp_path: Path) -> Iterator[StartRole]:
    procs: list[subprocess.Popen[str]] = []

    def start(role: str) -> subprocess.Popen[str]:
        log = (tmp_path / f"{role}.log").open("w")
        proc = subprocess.Popen([str(TRIAGE), role], env=role_env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_web_role_probes(role_env: dict[str, str], start_role: StartRole, tmp_path: Path) -> None:
    web = start_role("web")
    _wait_for(role_env, web, "http")  # the image HEALTHCHECK and the liveness probe: /healthz
    port = role_env["TRIAGE_WEB_PORT"]
    ready = _probe(role_env, "http", f"http://127.0.0.1:{port}/readyz")
    # A web pod is ready when it can serve pages (database reachable and migrated): no worker runs
    # here, which /readyz reports without failing readiness (web and workers are separate pods).
    assert ready.returncode == 0, ready.stderr
    body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).read())
    assert body["ready"] is True and body["role"] == "web"
    assert body["checks"]["migrations"]["ok"] is True
    assert body["checks"]["worker"] == {**body["checks"]["worker"], "ok": False, "required": False}
    assert _probe(role_env, "db").returncode == 0  # the role migrated the database at start
    assert _stop(web) == 0, (tmp_path / "web.log").read_text()
    down = _probe(role_env, "--timeout", "2", "http")
    assert down.returncode == 1


def test_receiver_role_probes(role_env: dict[str, str], start_role: StartRole, tmp_path: Path) -> None:
    receiver = start_role("receiver")
    _wait_for(role_env, receiver, "tcp")  # the liveness probe: the DICOM port accepts connections
    assert _probe(role_env, "db").returncode == 0  # the readiness probe
    # A DICOM peer still gets its association after the TCP probes.
    if shutil.which("echoscu") is None:
        pytest.skip("DCMTK echoscu not installed")
    echo = subprocess.run(["echoscu", "-aet", "PACS", "-aec", "ICHTRIAGE", "127.0.0.1", role_env["TRIAGE_DICOM_PORT"]],
                          env={**role_env, "TCP_NODELAY": "1", "PATH": dcmtk_env()["PATH"]},
                          capture_output=True, text=True, timeout=120)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert _stop(receiver) == 0, (tmp_path / "receiver.log").read_text()
    assert _probe(role_env, "--timeout", "2", "tcp").returncode == 1
