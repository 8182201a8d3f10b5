"""The DICOM TLS recipe of docs/security.md works with the real node.

Runs the documented openssl block as written, starts the node's SCP with the resulting
certificates and client verification on, and checks the documented DCMTK ``echoscu +tls``
command: accepted with the PACS's client certificate, refused without one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.migrate import upgrade
from tests.conftest import make_settings
from tests.peers import dcmtk_env
from triage.context import AppContext

REPO = Path(__file__).resolve().parent.parent
SECURITY_MD = REPO / "docs" / "security.md"

pytestmark = pytest.mark.network


def _recipe() -> str:
    text = SECURITY_MD.read_text(encoding="utf-8")
    m = re.search(r"<!-- tls-recipe:[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert m, "docs/security.md lost its marked openssl block"
    return m.group(1)


def _echoscu_args() -> list[str]:
    """The documented echoscu command's options (host and port are replaced by the test's)."""
    m = re.search(r"`(echoscu \+tls [^`]*)`", SECURITY_MD.read_text(encoding="utf-8"))
    assert m, "docs/security.md lost its echoscu check"
    words = m.group(1).split()
    return words[1:-2]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    out = subprocess.run(["sh", "-eu"], input=_recipe(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "node.crt: OK" in out.stdout and "pacs.crt: OK" in out.stdout, out.stdout
    return tmp_path


@pytest.fixture
def tls_node(pki: Path, tmp_path: Path) -> Iterator[int]:
    from triage.dicom.scp import DicomNode

    url = f"sqlite:///{tmp_path / 'triage.sqlite3'}"
    upgrade(url)
    settings = make_settings(tmp_path, database_url=url, tls_cert=str(pki / "node.crt"), tls_key=str(pki / "node.key"),
                             tls_ca=str(pki / "ca.crt"), tls_verify_client="true", allowed_aets="PACS_MAIN@127.0.0.1")
    ctx = AppContext(settings, role="test")
    node = DicomNode(ctx, port=0, host="127.0.0.1")
    node.start()
    try:
        yield node.port
    finally:
        node.stop()
        ctx.close()


def _echoscu(args: list[str], port: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dcmtk_env()  # DCMTK's echoscu, not pynetdicom's script of the same name
    return subprocess.run(["echoscu", "-to", "20", "-ta", "20", "-td", "20", *args, "127.0.0.1", str(port)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_documented_tls_recipe_against_the_node(tls_node: int, pki: Path) -> None:
    if shutil.which("echoscu") is None:
        pytest.skip("DCMTK echoscu not installed")
    documented = _echoscu_args()
    assert documented[:3] == ["+tls", "pacs.key", "pacs.crt"]
    ok = _echoscu(documented, tls_node, pki)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Without a client certificate (anonymous TLS) the node refuses the connection.
    anonymous = ["+tla", *documented[3:]]
    refused = _echoscu(anonymous, tls_node, pki)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    # Plain DICOM on the TLS port gets nowhere either.
    plain = _echoscu(documented[5:], tls_node, pki)
    assert plain.returncode != 0, plain.stdout + plain.stderr
