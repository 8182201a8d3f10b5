"""Helpers for the resilience, fuzz, soak and scale tests (real processes, real databases).

* :func:`build_tiny_bundle`: an untrained 64-px model bundle (fast inference; exercises the
  whole path, findings are meaningless).
* :class:`PrivatePostgres`: a throw-away PostgreSQL server (initdb + pg_ctl) on a free port that a
  test may stop and start without touching the machine's shared server.
* :func:`pg_schema`: a private schema on the shared server (context manager).
* :class:`AckingSCU`: a pynetdicom SCU that sends files one by one and records which were
  acknowledged with 0x0000 (what a PACS considers delivered).
* :func:`slow_hook_dir`: a ``sitecustomize`` directory that slows ``Bundle.predict`` in a child
  process (fault injection: a worker that is busy when it gets killed).
* small database helpers (:func:`db_rows`, :func:`scalar`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from storage.db import normalise_url
from tests.peers import free_port, wait_for

TINY_SIZE = 64
TINY_WIDTHS = (4, 8, 16, 16, 24)


# --------------------------------------------------------------------------- model bundle
def build_tiny_bundle(out: Path, threshold: float = 0.5) -> Path:
    """Save an untrained small network as a bundle under ``out`` (seeded: always the same weights).

    ``threshold`` is used for every label: 0.0 makes every study positive, 1.0 every one negative.
    """
    import torch

    from triage.labels import LABELS
    from triage.models.bundle import save_bundle
    from triage.models.network import ICHNet, SequenceHead
    from triage.models.preprocess import PreprocessConfig

    torch.manual_seed(0)
    cfg = PreprocessConfig(size=TINY_SIZE)
    net = ICHNet(cfg.channels, TINY_WIDTHS)
    seq = SequenceHead(net.feat_dim, hidden=16)
    manifest = {"name": "tiny-untrained", "version": "0", "preprocessing": cfg.to_dict(),
                "architecture": {"gru_hidden": 16}, "exam_score": "sequence_max",
                "thresholds": dict.fromkeys(LABELS, float(threshold)), "training": {"note": "untrained, tests only"}}
    save_bundle(out, net.eval(), seq.eval(), manifest)
    return out


# --------------------------------------------------------------------------- databases
def pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` with initdb and pg_ctl, if any."""
    roots = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: float(p.parent.name), reverse=True)
    for root in roots:
        if (root / "initdb").exists() and (root / "pg_ctl").exists():
            return root
    return None


class PrivatePostgres:
    """A PostgreSQL server of its own in a temporary directory, on a free port.

    As root the server runs as the ``postgres`` user (PostgreSQL refuses root). ``stop()`` and
    ``start()`` may be called repeatedly (the data directory is kept); ``destroy()`` removes it.
    """

    def __init__(self) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="triage-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.root, self.user, self.user)
            self.root.chmod(0o700)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check,
                              stdin=subprocess.DEVNULL, cwd=self.root)

    def init(self) -> PrivatePostgres:
        self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        with (self.data / "postgresql.conf").open("a") as fh:
            fh.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                     "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n")
        return self

    def start(self, timeout: float = 60) -> PrivatePostgres:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-w", "-t", str(int(timeout)),
                  "start", timeout=timeout + 30)
        wait_for(self.ready, timeout=timeout, interval=0.2, message="private PostgreSQL")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        return self._run(self.bin / "pg_ctl", "-D", self.data, "status", check=False).returncode == 0

    def ready(self) -> bool:
        eng = create_engine(self.url)
        try:
            with eng.connect() as c:
                c.execute(text("select 1"))
            return True
        except Exception:
            return False
        finally:
            eng.dispose()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "server.log").read_text(errors="replace")[-4000:]
        return ""

    def destroy(self) -> None:
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh schema on the shared test server; yields its URL, drops it afterwards."""
    from tests.conftest import drop_pg_schema, make_pg_schema_url

    url, schema = make_pg_schema_url()
    try:
        yield url
    finally:
        drop_pg_schema(schema)


def engine(url: str) -> Engine:
    return create_engine(normalise_url(url), pool_pre_ping=True)


def db_rows(url: str, sql: str, **params: Any) -> list[Any]:
    eng = engine(url)
    try:
        with eng.connect() as c:
            return list(c.execute(text(sql), params))
    finally:
        eng.dispose()


def scalar(url: str, sql: str, **params: Any) -> Any:
    rows = db_rows(url, sql, **params)
    return rows[0][0] if rows else None


# --------------------------------------------------------------------------- DICOM
@dataclass
class AckingSCU:
    """Send CT files over one association, one C-STORE at a time, recording the outcome."""

    port: int
    called: str = "ICHTRIAGE"
    calling: str = "PACS"
    acked: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)  # SOP UID -> non-success status
    unanswered: list[str] = field(default_factory=list)  # no response (association gone)

    def send(self, paths: Sequence[Path], on_ack: Any = None, timeout: float = 30) -> None:
        from pydicom import dcmread

        ae = AE(ae_title=self.calling)
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called)
        if not assoc.is_established:
            raise ConnectionError(f"association to port {self.port} not established")
        try:
            for p in paths:
                ds = dcmread(p)
                uid = str(ds.SOPInstanceUID)
                if not assoc.is_established:
                    self.unanswered.append(uid)
                    continue
                try:
                    rsp = assoc.send_c_store(ds)
                except Exception:  # the peer vanished mid-send
                    self.unanswered.append(uid)
                    continue
                status = int(getattr(rsp, "Status", -1)) if rsp else -1
                if status == 0x0000:
                    self.acked.append(uid)
                    if on_ack is not None:
                        on_ack(len(self.acked))
                elif status == -1:
                    self.unanswered.append(uid)
                else:
                    self.refused[uid] = status
        finally:
            if assoc.is_established:
                assoc.release()


def echo_ok(port: int, called: str = "ICHTRIAGE", timeout: float = 20) -> bool:
    """C-ECHO with pynetdicom; True on status 0x0000."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return bool(rsp) and int(rsp.Status) == 0
    finally:
        assoc.release()


# --------------------------------------------------------------------------- fault injection
SLOW_HOOK = '''\
"""Test hook (tests/resilience_support.py): slow Bundle.predict down when TRIAGE_TEST_SLOW_PREDICT is set."""
import os

_delay = float(os.environ.get("TRIAGE_TEST_SLOW_PREDICT") or 0)
if _delay > 0:
    import time

    import triage.models.inference as _inference

    _predict = _inference.Bundle.predict

    def _slow_predict(self, *args, **kwargs):
        time.sleep(_delay)
        return _predict(self, *args, **kwargs)

    _inference.Bundle.predict = _slow_predict
'''


def slow_hook_dir(directory: Path) -> Path:
    """A directory with a ``sitecustomize.py`` that slows ``Bundle.predict`` by
    ``TRIAGE_TEST_SLOW_PREDICT`` seconds in processes that have it on PYTHONPATH."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(textwrap.dedent(SLOW_HOOK))
    return directory


# --------------------------------------------------------------------------- /proc
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(predicate: Any, timeout: float, message: str, interval: float = 0.2) -> Any:
    """:func:`tests.peers.wait_for` with a monotonic deadline message (re-exported for brevity)."""
    return wait_for(predicate, timeout=timeout, interval=interval, message=message)


def now() -> float:
    return time.monotonic()
