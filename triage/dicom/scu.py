"""C-STORE SCU: send files to a DICOM peer (pynetdicom, TCP_NODELAY, timeouts).

For every (SOP class, transfer syntax) of the files one presentation context is proposed with
that syntax alone, plus one per SOP class with the uncompressed syntaxes as a fallback. A file
whose own syntax the peer accepted goes out as read, without decoding (also when the peer picked
Implicit VR for the fallback context, as pynetdicom SCPs do); one whose own syntax it refused is
decompressed or re-encoded in an uncompressed syntax it accepted.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt

from triage.config import Destination
from triage.dicom.scp import set_nodelay
from triage.logging import get_logger

log = get_logger(__name__)

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
MAX_CONTEXTS = 128

# Local failures reported in place of a DIMSE status (negative so they never clash with one).
NO_CONTEXT = -1  # the peer accepted no presentation context usable for this file
SEND_FAILED = -2  # the association broke (abort, timeout) before a response came
UNREADABLE = -3  # the file could not be read or decompressed


class SendError(RuntimeError):
    """The association could not be established (refused, rejected, unreachable)."""


class NoConnection(SendError):
    """Not even a connection: the peer is down, unreachable or timed out (nothing it refused)."""


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    sop_class: str
    sop_uid: str
    syntax: str


def status_text(status: int) -> str:
    """``0x0000``-style text for a DIMSE status; a word for a local failure."""
    local = {NO_CONTEXT: "no-presentation-context", SEND_FAILED: "association-lost", UNREADABLE: "unreadable"}
    return local.get(status, f"0x{status:04X}")


def is_success(status: int) -> bool:
    """Success or warning (0xB000, 0x0107, 0x0116) counts as stored."""
    return status == 0x0000 or status in (0x0107, 0x0116) or (status >> 12) == 0xB


def _read_info(path: Path) -> _FileInfo:
    ds = dcmread(path, stop_before_pixels=True)
    return _FileInfo(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))


def _contexts(infos: Sequence[_FileInfo], allow_compressed: bool = True) -> list[Any]:
    wanted: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    for info in infos:
        for key, syntaxes in (((info.sop_class, info.syntax), [info.syntax]),
                              ((info.sop_class, "native"), UNCOMPRESSED)):
            if key[1] != "native" and UID(info.syntax).is_compressed and not allow_compressed:
                continue  # sent decompressed through the native context
            if key not in seen:
                seen.add(key)
                wanted.append((info.sop_class, list(syntaxes)))
    if len(wanted) > MAX_CONTEXTS:
        raise SendError(f"{len(wanted)} presentation contexts needed; DICOM allows {MAX_CONTEXTS} per association")
    return [build_context(sop, syntaxes) for sop, syntaxes in wanted]


def send_files(
    destination: Destination,
    paths: Sequence[str | Path],
    calling_aet: str,
    *,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    connection_timeout: float | None = 15.0,
    max_pdu: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    allow_compressed: bool = True,
) -> list[tuple[str, int]]:
    """Send ``paths`` over one association; return ``(sop_instance_uid, status)`` per file.

    ``allow_compressed=False`` sends compressed files decompressed (uncompressed contexts only).

    Raises :class:`SendError` when no association could be established. Per-file failures are
    statuses (DIMSE failure codes, or the negative local codes of this module).
    """
    results: list[tuple[str, int]] = []
    infos: list[_FileInfo] = []
    for p in paths:
        try:
            infos.append(_read_info(Path(p)))
        except Exception as exc:
            log.warning("file not sendable", path=str(p), error=str(exc)[:200])
            results.append((Path(p).stem, UNREADABLE))
    if not infos:
        return results
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = connection_timeout
    ae.maximum_pdu_size = max_pdu
    ae.requested_contexts = _contexts(infos, allow_compressed)
    opened: list[bool] = []

    def on_open(event: evt.Event) -> None:
        opened.append(True)
        _on_open(event)

    handlers = [(evt.EVT_CONN_OPEN, on_open)]
    tls_args = (ssl_context, destination.host) if ssl_context is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.aet, evt_handlers=handlers,
                         tls_args=tls_args)
    if not assoc.is_established:
        why = ("could not connect (refused, unreachable or timed out)" if not opened
               else "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established")
        raise (SendError if opened else NoConnection)(f"association with {destination} {why}")
    try:
        accepted = [cx for cx in assoc.accepted_contexts]
        for info in infos:
            results.append((info.sop_uid, _send_one(assoc, accepted, info)))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    sent = {uid for uid, _ in results}
    results.extend((info.sop_uid, SEND_FAILED) for info in infos if info.sop_uid not in sent)
    return results


def _on_open(event: evt.Event) -> None:
    set_nodelay(getattr(getattr(event.assoc.dul, "socket", None), "socket", None))


def _send_one(assoc: Any, accepted: Sequence[Any], info: _FileInfo) -> int:
    own = [cx for cx in accepted if cx.abstract_syntax == info.sop_class and cx.transfer_syntax[0] == info.syntax]
    native = [cx for cx in accepted if cx.abstract_syntax == info.sop_class and cx.transfer_syntax[0] in UNCOMPRESSED]
    try:
        if own:
            rsp = assoc.send_c_store(info.path)  # sent as read, without decoding
        elif native:
            ds = dcmread(info.path)
            if UID(info.syntax).is_compressed:
                ds.decompress(generate_instance_uid=False)  # keep the UID: retries must not duplicate
            target = UID(native[0].transfer_syntax[0])
            ds.file_meta.TransferSyntaxUID = target
            # re-encode in the accepted syntax (pynetdicom refuses a dataset read as another one)
            ds.set_original_encoding(target.is_implicit_VR, target.is_little_endian, ds.original_character_set)
            rsp = assoc.send_c_store(ds)
        else:
            log.warning("no presentation context accepted", sop_class=info.sop_class, syntax=info.syntax)
            return NO_CONTEXT
    except Exception as exc:
        log.warning("c-store failed", sop_uid=info.sop_uid, error=str(exc)[:200])
        return UNREADABLE
    if rsp is None or "Status" not in rsp:
        return SEND_FAILED
    return int(rsp.Status)
