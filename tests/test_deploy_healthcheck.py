"""deploy/healthcheck.py, the probe behind the image HEALTHCHECK, compose and Kubernetes.

Real sockets (a local HTTP server, a listening TCP socket, a closed port) and real databases
(SQLite and PostgreSQL through the ``db_url`` fixture, migrated with the project's migrations).
"""

from __future__ import annotations

import http.server
import importlib.util
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from storage.migrate import upgrade

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "healthcheck.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hc = _load()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        status = {"/healthz": 200, "/readyz": 503}.get(self.path, 404)
        body = b'{"status": "ok"}' if status == 200 else b'{"ready": false}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output clean
        pass


@pytest.fixture
def web_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """An environment with no TRIAGE_* variable but the ones a test sets (load_settings rejects unknown keys)."""
    import os

    for key in list(os.environ):
        if key.startswith("TRIAGE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def test_http_ok_and_failures(web_server: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert hc.main(["http", f"http://127.0.0.1:{web_server}/healthz"]) == 0
    assert hc.main(["http", f"http://127.0.0.1:{web_server}/readyz"]) == 1
    assert "HTTP 503" in capsys.readouterr().err
    assert hc.main(["--timeout", "2", "http", f"http://127.0.0.1:{_free_port()}/healthz"]) == 1
    assert "unhealthy" in capsys.readouterr().err


def test_http_default_url_follows_web_port(web_server: int, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TRIAGE_WEB_PORT", str(web_server))
    assert hc.main(["http"]) == 0
    clean_env.setenv("TRIAGE_WEB_PORT", str(_free_port()))
    assert hc.main(["--timeout", "2", "http"]) == 1


def test_tcp_open_and_closed_port(clean_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        assert hc.main(["tcp", f"127.0.0.1:{port}"]) == 0
        clean_env.setenv("TRIAGE_DICOM_PORT", str(port))
        assert hc.main(["tcp"]) == 0  # default: 127.0.0.1:$TRIAGE_DICOM_PORT
    assert hc.main(["--timeout", "2", "tcp", f"127.0.0.1:{port}"]) == 1


def test_db_reports_unmigrated_then_healthy(db_url: str, clean_env: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("TRIAGE_DATABASE_URL", db_url)
    assert hc.main(["db"]) == 1
    assert "expected" in capsys.readouterr().err  # reachable, but not at the head revision
    upgrade(db_url)
    assert hc.main(["db"]) == 0


def test_db_unreachable_and_bad_config(tmp_path: Path, clean_env: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on the port: connection refused at once.
    clean_env.setenv("TRIAGE_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/test")
    assert hc.main(["db"]) == 1
    assert "database unreachable" in capsys.readouterr().err
    clean_env.setenv("TRIAGE_NO_SUCH_KEY", "1")
    assert hc.main(["db"]) == 1
    assert "configuration" in capsys.readouterr().err


def test_db_wait_polls_until_migrated(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """The init containers' mode: wait for the migration Job instead of failing at once."""
    url = f"sqlite:///{tmp_path / 'triage.sqlite3'}"
    clean_env.setenv("TRIAGE_DATABASE_URL", url)
    migrator = threading.Timer(1.5, upgrade, args=(url,))
    started = time.monotonic()
    migrator.start()
    try:
        assert hc.main(["db", "--wait", "120"]) == 0
    finally:
        migrator.join(timeout=60)
    assert time.monotonic() - started >= 1.0  # it really waited for the migration


def test_script_runs_standalone(web_server: int, tmp_path: Path) -> None:
    """As the image runs it: a separate interpreter, exit status only."""
    ok = subprocess.run([sys.executable, str(SCRIPT), "http", f"http://127.0.0.1:{web_server}/healthz"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "--timeout", "2", "tcp", f"127.0.0.1:{_free_port()}"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "unhealthy" in bad.stderr
