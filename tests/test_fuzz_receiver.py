"""Fuzzing the receiver: 1,000 mutated CT instances and malformed PDUs, reproducible by seed.

The real DICOM node (pynetdicom SCP, SQLite, file store) gets datasets whose encoded bytes were
bit-flipped, truncated or had tag/length/VR bytes corrupted (the file meta stays valid so the
C-STORE request names the instance), sent as raw bytes over a few pooled associations, plus raw
socket garbage: random bytes, PDUs with wrong lengths, truncated A-ASSOCIATE-RQs and an A-ASSOCIATE-RQ
for the wrong called AE title. Afterwards the node answers C-ECHO and stores a valid series, every
refused instance has its ``rejected`` audit row, every accepted one is recorded with a file that
parses, and the wrong-AE association has an ``association_rejected`` row.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import func, select

from storage.models import AuditEvent, Instance
from tests.peers import SeriesSpec, make_ct_series, node_context, running_node, storescu
from tests.resilience_support import echo_ok

pytestmark = [pytest.mark.network]

SEED = 20261123
N_DATASETS = 1000
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _meta_end(blob: bytes) -> int:
    """Offset of the first dataset element after the file meta group (0002,xxxx)."""
    pos = 132
    while blob[pos:pos + 2] == b"\x02\x00":
        vr = blob[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            pos += 12 + struct.unpack("<I", blob[pos + 8:pos + 12])[0]
        else:
            pos += 8 + struct.unpack("<H", blob[pos + 6:pos + 8])[0]
    return pos


def mutate(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of the dataset part (after the file meta) of ``blob``."""
    start = _meta_end(blob)
    body = bytearray(blob[start:])
    kind = rng.choice(["bitflip", "truncate", "tag", "length", "vr", "splice", "zero"])
    if kind == "bitflip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(body))
            body[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        body = body[:rng.randrange(len(body))]
    elif kind in ("tag", "length", "vr"):
        # Corrupt the header bytes of an element: find element starts by scanning for group 0x0008..0x0028.
        starts = [i for i in range(0, min(len(body) - 8, 1200), 2) if body[i + 1] == 0 and body[i] in (8, 0x10, 0x18,
                                                                                                      0x20, 0x28)]
        i = rng.choice(starts) if starts else 0
        if kind == "tag":
            body[i:i + 4] = rng.randbytes(4)
        elif kind == "length":
            body[i + 6:i + 8] = rng.randbytes(2)
        else:
            body[i + 4:i + 6] = rng.choice([b"SQ", b"OB", b"UN", b"\x00\x00", b"ZZ", b"UT"])
    elif kind == "splice":
        i, j = sorted(rng.sample(range(len(body)), 2))
        body[i:j] = rng.randbytes(rng.randint(0, 64))
    else:
        i = rng.randrange(len(body))
        body[i:i + rng.randint(1, 256)] = bytes(min(256, len(body) - i))
    return kind, blob[:start] + bytes(body)


class Sender:
    """Raw-bytes C-STORE over a pooled association; reconnects when the node aborts one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ae = AE("FUZZSCU")
        self.ae.add_requested_context(CT, EXPLICIT)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 20
        self.assoc = None
        self.reconnects = 0

    def send(self, path: Path) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="ICHTRIAGE")
            self.reconnects += 1
            assert self.assoc.is_established, "the node no longer accepts associations"
        try:
            rsp = self.assoc.send_c_store(path)
        except Exception:
            return None
        return int(rsp.Status) if rsp and "Status" in rsp else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def _raw_pdus(rng: random.Random) -> list[bytes]:
    """Malformed PDUs for raw sockets (each sent on its own connection)."""
    def assoc_rq(called: bytes, calling: bytes = b"FUZZ".ljust(16)) -> bytes:
        app = b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1"
        body = b"\x00\x01\x00\x00" + called.ljust(16) + calling + b"\x00" * 32 + app
        return b"\x01\x00" + struct.pack(">I", len(body)) + body

    good = assoc_rq(b"ICHTRIAGE")
    pdus = [rng.randbytes(rng.randint(1, 2048)) for _ in range(20)]
    pdus += [good[:n] for n in (1, 5, 6, 10, 40, len(good) - 1)]  # truncated A-ASSOCIATE-RQ
    pdus += [good[:2] + struct.pack(">I", n) + good[6:] for n in (0, 3, 0xFFFFFFFF, len(good) + 500)]  # bad lengths
    pdus += [bytes([t]) + good[1:] for t in (0x00, 0x02, 0x04, 0x07, 0x09, 0xFF)]  # wrong PDU types
    pdus += [b"\x04\x00" + struct.pack(">I", 12) + b"\x00\x00\x00\x08\x01\x03" + b"\x00" * 6]  # P-DATA, no assoc
    pdus += [good[:10] + rng.randbytes(len(good) - 10)]
    return pdus


def _send_raw(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.settimeout(3)
            sock.recv(4096)


def test_fuzzed_datasets_and_pdus_never_crash_or_hang_and_are_audited(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    ctx = node_context(tmp_path, acse_timeout=5, network_timeout=10)
    sources = make_ct_series(tmp_path / "src", SeriesSpec(slices=8, size=32))
    blobs = [p.read_bytes() for p in sources]
    fuzz_dir = tmp_path / "fuzz"
    fuzz_dir.mkdir()
    statuses: dict[str, int] = {}
    with running_node(ctx) as node:
        sender = Sender(node.port)
        old = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are
        no_answer = 0
        try:
            for i in range(N_DATASETS):
                kind, data = mutate(rng.choice(blobs), rng)
                path = fuzz_dir / f"{i:04d}-{kind}.dcm"
                path.write_bytes(data)
                status = sender.send(path)
                if status is None:
                    no_answer += 1
                else:
                    statuses[path.name] = status
                path.unlink()
        finally:
            pynetdicom_config.STORE_SEND_CHUNKED_DATASET = old
            sender.close()
        for pdu in _raw_pdus(rng):
            _send_raw(node.port, pdu)
        # The wrong called AE title: an A-ASSOCIATE-RJ and its audit row.
        wrong = AE("FUZZSCU")
        wrong.add_requested_context(CT, EXPLICIT)
        assert not wrong.associate("127.0.0.1", node.port, ae_title="NOTTHENODE").is_established

        assert echo_ok(node.port)
        good = make_ct_series(tmp_path / "good", SeriesSpec(slices=3))
        r = storescu(node.port, good)
        assert r.returncode == 0, r.stderr

    refused = [s for s in statuses.values() if s != 0]
    accepted = len(statuses) - len(refused)
    assert len(statuses) + no_answer == N_DATASETS
    assert no_answer <= N_DATASETS // 20, f"{no_answer} C-STOREs without an answer"
    assert len(refused) >= N_DATASETS // 4, "the mutations should be refused often"
    # A malformed dataset is a permanent fault: refused with 0xCxxx, never 0x0110 (which invites a
    # retry and used to come back when the database rejected what the header check let through).
    assert all(0xC000 <= s <= 0xCFFF for s in refused), sorted({hex(s) for s in refused})
    with ctx.sessions() as s:
        rejected = s.scalar(select(func.count()).select_from(AuditEvent)
                            .where(AuditEvent.event_type == "rejected")) or 0
        assoc_rejected = s.scalar(select(func.count()).select_from(AuditEvent)
                                  .where(AuditEvent.event_type == "association_rejected")) or 0
        rows = s.execute(select(Instance.sop_instance_uid, Instance.path)).all()
    assert rejected >= len(refused), (rejected, len(refused))
    assert assoc_rejected >= 1
    assert accepted >= 1 and len(rows) >= 3
    for uid, rel in rows:
        ds = dcmread(ctx.store.path(rel), stop_before_pixels=True)
        assert str(ds.SOPInstanceUID) == uid
    assert not list(ctx.store.root.rglob(".tmp-*"))
    print(f"fuzz seed {SEED}: {len(statuses)} answered ({accepted} accepted, {len(refused)} refused, "
          f"statuses {sorted({hex(s) for s in refused})}), {no_answer} unanswered, {sender.reconnects} associations")
