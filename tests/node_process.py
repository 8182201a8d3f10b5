"""Run real ``triage`` role processes for end-to-end and resilience tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.peers import free_port, wait_port

REPO = Path(__file__).resolve().parent.parent
TRIAGE = [sys.executable, "-m", "triage.cli"]


class NodeProcess:
    """One ``triage <role>`` process with its own environment and log file."""

    def __init__(self, workdir: Path, role: str = "serve", env: Mapping[str, str] | None = None,
                 args: tuple[str, ...] = (), name: str | None = None) -> None:
        self.workdir = workdir
        self.role = role
        self.args = args
        self.name = name or role
        self.dicom_port = free_port()
        self.web_port = free_port()
        self.env = {
            **os.environ,
            "TRIAGE_DATA_DIR": str(workdir / "data"),
            "TRIAGE_DICOM_PORT": str(self.dicom_port),
            "TRIAGE_WEB_PORT": str(self.web_port),
            "TRIAGE_DICOM_HOST": "127.0.0.1",
            "TRIAGE_WEB_HOST": "127.0.0.1",
            "TRIAGE_DISK_FLOOR_MB": "0",
            "TRIAGE_STABLE_SECONDS": "1",
            "TRIAGE_POLL_SECONDS": "0.2",
            "TRIAGE_RETRY_BASE_SECONDS": "0.5",
            "TRIAGE_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            **dict(env or {}),
        }
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self, timeout: float = 120.0) -> NodeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([*TRIAGE, self.role, *self.args], cwd=REPO, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        try:
            if self.role in ("serve", "receiver"):
                wait_port(self.dicom_port, timeout=max(1.0, deadline - time.monotonic()))
            if self.role in ("serve", "web"):
                self.wait_http("/healthz", timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{self.tail()}") from None
        return self

    def wait_http(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url}{path} not answering")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
