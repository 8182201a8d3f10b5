"""The DICOM receiver: Verification and Storage SCP (pynetdicom).

An instance is acknowledged with 0x0000 only after its encoded bytes are durably in the file
store (atomic write, fsync) *and* its rows (study, series, instance, audit ``received``) are
committed. Pixel data is never decoded here: the header is parsed up to the pixel data element
(:mod:`triage.dicom.header`) and the bytes received are written as they came. Rows are
committed in groups by one writer thread (:mod:`triage.dicom.recorder`), which several
associations share.

Access control happens when the A-ASSOCIATE-RQ arrives, through pynetdicom's public extension
points only (pinned in pyproject.toml): an ``EVT_REQUESTED`` handler checks the calling AE title
(optionally bound to a host or network) and the called AE title, and answers a refusal with an
A-ASSOCIATE-RJ (``ACSE.send_reject``) plus an ``association_rejected`` audit event before
pynetdicom negotiates anything. Two backstops keep the filter closed should an upstream change
stop that hook from running: ``AE.require_calling_aet``/``require_called_aet`` hold the same AE
titles, and an ``EVT_ESTABLISHED`` handler aborts (and audits) any association that was not
admitted by the hook and fails the check.

Failure statuses (all in :mod:`triage.dicom.header` unless named here; docs/pacs-setup.md lists
them): 0xA700 file store below its free-space floor; 0xC210 unparseable dataset; 0xC211 truncated
pixel data; 0xC212 image without pixel data; 0xC213 missing/invalid UIDs (or a UID differing from
the request); 0xC214 NaN/infinity; 0xC215 integer out of range; 0xC216 control character;
0xC217 inconsistent CT image header; 0xC218 pixel data longer than described; 0xC219 pixel data
encoded other than the transfer syntax says; 0x0110 internal error (database unreachable: worth a
retry). Every refusal is audited (``rejected``) and the node keeps running.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import ssl
import struct
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from storage import audit
from storage.filestore import DiskFullError, StorePathError
from triage.context import AppContext
from triage.dicom.header import HeaderError, parse_encoded
from triage.dicom.recorder import WRITE_TIMEOUT, InstanceRecord, Recorder
from triage.logging import get_logger

log = get_logger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_UID_MISMATCH = 0xC213
RECENT_UIDS = 50_000  # duplicate fast path: UIDs this process recorded lately

NATIVE_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
COMPRESSED_SYNTAXES = [
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]


def decodable_syntaxes() -> list[str]:
    """Native syntaxes plus every compressed one a pydicom decoder plugin is installed for."""
    out = list(NATIVE_SYNTAXES)
    for uid in COMPRESSED_SYNTAXES:
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except (NotImplementedError, ValueError):
            continue
    return out


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 2, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information that pynetdicom's
    ``Event.encoded_dataset(include_meta=True)`` puts in front of a received dataset, byte for
    byte (``tests/test_dicom_scp.py`` compares them), built without a pydicom dataset: that
    costs a fraction of a millisecond per instance on the receiver's hot path."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\0")),
        _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"".join((b"\0" * 128, b"DICM", _meta_element(0x0000, b"UL", struct.pack("<I", len(body))), body))


def set_nodelay(sock: Any) -> None:
    """Disable Nagle's algorithm (each C-STORE would otherwise stall on delayed ACKs)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_server_ssl_context(settings: Any) -> ssl.SSLContext | None:
    """TLS for the SCP when ``tls_cert``/``tls_key`` are set (client certificates optional)."""
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key or None)
    if settings.tls_ca:
        context.load_verify_locations(cafile=settings.tls_ca)
    context.verify_mode = ssl.CERT_REQUIRED if settings.tls_verify_client else ssl.CERT_NONE
    return context


class ReusePortServer(ThreadedAssociationServer):
    """The association server with ``SO_REUSEPORT`` set before it binds: several receiver
    processes (``dicom_reuse_port``) listen on one port and the kernel hands each new association
    to one of them. Each process records through its own recorder; races between them on new
    study, series and instance rows are settled by the unique keys (:func:`record_with_retries`)."""

    def server_bind(self) -> None:
        if not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover - Linux and the BSDs have it
            raise OSError("dicom_reuse_port: this platform has no SO_REUSEPORT")
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


@dataclass
class StoreOutcome:
    status: int
    reason: str = ""
    duplicate: bool = False


class DicomNode:
    """The receiving DICOM node of one process. ``start()`` returns at once; ``stop()`` closes."""

    def __init__(self, ctx: AppContext, *, port: int | None = None, host: str | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self._port = self.settings.dicom_port if port is None else port
        self._host = self.settings.dicom_host if host is None else host
        self._server: Any = None
        self._lock = threading.Lock()
        self._recent: dict[str, None] = {}  # SOP Instance UIDs recorded lately (insertion-ordered)
        self._admitted: weakref.WeakSet[Any] = weakref.WeakSet()  # associations the access check let in
        # FileStore.write_new makes each file's name durable itself (its directory fsync overlaps
        # the file's), so the recorder has no directories left to sync.
        self.recorder = Recorder(ctx.sessions, sync_dirs=None)
        self.receiver_id = ctx.worker_id
        self.ae = self._make_ae()

    # ------------------------------------------------------------------ set-up
    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        # The EVT_REQUESTED handler checks (and audits) first; pynetdicom's own AE title checks
        # are a backstop that still refuses unknown titles if that hook were ever bypassed.
        ae.require_called_aet = s.check_called_aet
        ae.require_calling_aet = sorted({p.aet for p in s.allowed_aets})
        syntaxes = decodable_syntaxes()
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # Every storage class is accepted (non-CT objects are recorded, not processed) in the
        # syntaxes we can decode, so whatever is stored can later be read.
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        self.transfer_syntaxes = syntaxes
        return ae

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    @property
    def listening(self) -> bool:
        """True between :meth:`start` and :meth:`stop` while the listening socket is open."""
        server = self._server
        try:
            return server is not None and server.socket.fileno() != -1
        except OSError:
            return False

    def start(self) -> None:
        s = self.settings
        if not s.allowed_aets:
            log.warning("no allowed_aets configured: associations from ANY calling AE title are accepted")
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            # pynetdicom's "standard" handlers format a summary of every PDU and DIMSE message
            # (CPU per instance) that would only be dropped by the log level anyway.
            _config.LOG_HANDLER_LEVEL = "none"
        self.recorder.start()
        server_class = ReusePortServer if s.dicom_reuse_port else ThreadedAssociationServer
        self._server = self.ae.make_server((self._host, self._port), evt_handlers=handlers,
                                           ssl_context=make_server_ssl_context(s), server_class=server_class)
        # what AE.start_server(block=False) does, with our server class: the AE keeps its servers
        # (AE.shutdown and the server's own shutdown expect to find it there)
        self.ae._servers.append(self._server)
        threading.Thread(target=self._server.serve_forever, name="dicom-acceptor", daemon=True).start()
        set_nodelay(self._server.socket)
        log.info("dicom node listening", ae_title=s.ae_title, host=self._host, port=self.port,
                 tls=bool(s.tls_cert), syntaxes=len(self.transfer_syntaxes))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        self.recorder.stop()
        self.ctx.store.close()

    def __enter__(self) -> DicomNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ access control
    def check_peer(self, calling: str, called: str, address: str | None) -> str | None:
        """``None`` when the association may proceed, else the reason to reject it."""
        s = self.settings
        if s.check_called_aet and called != s.ae_title:
            return f"called AE title {called!r} is not {s.ae_title!r}"
        if s.allowed_aets and not any(p.matches(calling, address) for p in s.allowed_aets):
            return f"calling AE title {calling!r} from {address} is not in allowed_aets"
        return None

    def audit_rejection(self, calling: str, called: str, address: str | None, reason: str) -> None:
        try:
            with self.ctx.sessions.begin() as session:
                audit.record(session, audit.ASSOCIATION_REJECTED, actor=calling or "?", outcome=audit.FAILURE,
                             details={"calling_aet": calling, "called_aet": called, "peer": address,
                                      "reason": reason})
        except Exception:  # the rejection itself must still happen
            log.exception("could not audit association rejection")

    # ------------------------------------------------------------------ handlers
    def _on_conn_open(self, event: evt.Event) -> None:
        with_socket = getattr(event.assoc.dul, "socket", None)
        set_nodelay(getattr(with_socket, "socket", None))

    def _on_requested(self, event: evt.Event) -> None:
        """The A-ASSOCIATE-RQ arrived: admit it, or reject it before pynetdicom negotiates.

        A notification handler's exceptions are only logged by pynetdicom, which would then go on
        and accept: so any error here rejects (fail closed)."""
        assoc = event.assoc
        if not assoc.is_acceptor:
            return
        calling = called = ""
        address = None
        try:
            rq = assoc.requestor.primitive
            calling = str(rq.calling_ae_title or "").strip()
            called = str(rq.called_ae_title or "").strip()
            address = assoc.requestor.address
            reason = self.check_peer(calling, called, address)
        except Exception as exc:
            log.exception("access check failed: association rejected")
            reason = f"access check failed: {type(exc).__name__}"
        if reason is None:
            with self._lock:
                self._admitted.add(assoc)
            return
        # PS3.8 9.3.4: rejected-permanent, service user, 0x07 called / 0x03 calling AE title not recognised
        diagnostic = 0x07 if reason.startswith("called") else 0x03
        log.warning("association rejected", calling_aet=calling, called_aet=called, peer=address, reason=reason)
        self.audit_rejection(calling, called, address, reason)
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _on_established(self, event: evt.Event) -> None:
        """Backstop: an association that did not pass :meth:`_on_requested` is checked here and
        aborted when refused (it would mean pynetdicom no longer calls that hook)."""
        assoc = event.assoc
        if not assoc.is_acceptor:
            return
        with self._lock:
            if assoc in self._admitted:
                return
        rq = assoc.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        address = assoc.requestor.address
        log.error("association established without the access check of EVT_REQUESTED: checking now",
                  calling_aet=calling, peer=address)
        try:
            reason = self.check_peer(calling, called, address)
        except Exception as exc:
            reason = f"access check failed: {type(exc).__name__}"
        if reason is None:
            with self._lock:
                self._admitted.add(assoc)
            return
        log.warning("association aborted", calling_aet=calling, called_aet=called, peer=address, reason=reason)
        self.audit_rejection(calling, called, address, reason)
        assoc.abort()

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        calling = (event.assoc.requestor.ae_title or "").strip()
        address = event.assoc.requestor.address
        request = event.request
        syntax = str(event.context.transfer_syntax)
        try:
            dataset = event.encoded_dataset(include_meta=False)
            outcome = self.store(
                dataset,
                syntax,
                # with the dataset, the same bytes as event.encoded_dataset(include_meta=True), built cheaply
                file_meta=lambda: file_meta_bytes(str(request.AffectedSOPClassUID or ""),
                                                  str(request.AffectedSOPInstanceUID or ""), syntax),
                calling_aet=calling,
                peer=address,
                request_sop_uid=str(event.request.AffectedSOPInstanceUID or ""),
                request_sop_class=str(event.request.AffectedSOPClassUID or ""),
            )
        except Exception as exc:  # never let a handler exception kill the association silently
            log.exception("store failed", calling_aet=calling)
            self._audit_reject(calling, address, str(event.request.AffectedSOPInstanceUID or ""), "", "",
                               STATUS_PROCESSING_FAILURE, f"internal error: {exc}")
            return STATUS_PROCESSING_FAILURE
        return outcome.status

    # ------------------------------------------------------------------ the store operation
    def store(
        self,
        dataset_bytes: bytes,
        transfer_syntax: str,
        *,
        file_meta: Callable[[], bytes],
        calling_aet: str,
        peer: str | None,
        request_sop_uid: str = "",
        request_sop_class: str = "",
    ) -> StoreOutcome:
        """Validate, write and record one instance; return the status to send back.

        ``file_meta()`` gives the preamble and File Meta Information to write before the dataset."""
        try:
            header = parse_encoded(dataset_bytes, transfer_syntax)
        except HeaderError as exc:
            self._audit_reject(calling_aet, peer, request_sop_uid, "", "", exc.status, str(exc),
                               sop_class=request_sop_class)
            log.warning("instance rejected", status=hex(exc.status), reason=str(exc), calling_aet=calling_aet)
            return StoreOutcome(exc.status, str(exc))
        if request_sop_uid and header.sop_instance_uid != request_sop_uid:
            reason = "SOP Instance UID in the dataset differs from the C-STORE request"
            self._audit_reject(calling_aet, peer, request_sop_uid, header.study_uid, header.series_uid,
                               STATUS_UID_MISMATCH, reason, sop_class=request_sop_class)
            return StoreOutcome(STATUS_UID_MISMATCH, reason)
        try:
            rel = self.ctx.store.instance_rel(header.study_uid, header.series_uid, header.sop_instance_uid)
        except StorePathError as exc:
            self._audit_reject(calling_aet, peer, request_sop_uid, header.study_uid, header.series_uid,
                               STATUS_UID_MISMATCH, str(exc), sop_class=request_sop_class)
            return StoreOutcome(STATUS_UID_MISMATCH, str(exc))

        # the file is looked for too: a study purged since (retention) is stored again when re-sent
        if header.sop_instance_uid in self._recent and self.ctx.store.path(rel).is_file():
            log.info("duplicate instance ignored", sop_uid=header.sop_instance_uid)
            return StoreOutcome(STATUS_SUCCESS, "duplicate", duplicate=True)

        # The recorder thread gathers this instance into its next group while this thread
        # writes the file (content and name fsynced); it records the group once every file of it
        # is durable, and the ack waits for that commit. A duplicate this process has not seen lately is rewritten
        # with the same bytes under the same name and then recognised by the database.
        # meta and dataset are hashed and written one after the other: joining 0.5 MB copies it
        parts = (file_meta(), dataset_bytes)
        digest = hashlib.sha256(parts[0])
        digest.update(parts[1])
        size = len(parts[0]) + len(parts[1])
        record = InstanceRecord(header, rel, size, digest.hexdigest(), transfer_syntax, calling_aet, peer,
                                written=Future(), receiver=self.receiver_id)
        try:
            self.ctx.store.ensure_space(size)
        except DiskFullError as exc:
            return self._refuse_full(exc, header, calling_aet, peer)
        overlap = self.recorder.running  # without the writer thread: write first, then record inline
        pending = self.recorder.submit(record) if overlap else None
        try:
            self.ctx.store.write_new(rel, parts)  # content and name durable when it returns
        except BaseException as exc:  # any failure must resolve the record, or the recorder waits for it
            assert record.written is not None
            record.written.set_exception(exc)
            if pending is not None:
                with contextlib.suppress(Exception):
                    pending.result(timeout=WRITE_TIMEOUT)
            if not isinstance(exc, OSError):
                raise
            if isinstance(exc, DiskFullError):
                return self._refuse_full(exc, header, calling_aet, peer)
            self._audit_reject(calling_aet, peer, header.sop_instance_uid, header.study_uid, header.series_uid,
                               STATUS_OUT_OF_RESOURCES, f"write failed: {exc}", sop_class=header.sop_class_uid)
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, str(exc))
        assert record.written is not None
        record.written.set_result(None)
        try:
            duplicate = (pending or self.recorder.submit(record)).result(timeout=WRITE_TIMEOUT)
        except OSError as exc:
            if not isinstance(exc, TimeoutError):  # the directory fsync failed: not durable
                self._audit_reject(calling_aet, peer, header.sop_instance_uid, header.study_uid, header.series_uid,
                                   STATUS_OUT_OF_RESOURCES, f"write failed: {exc}", sop_class=header.sop_class_uid)
                return StoreOutcome(STATUS_OUT_OF_RESOURCES, str(exc))
            return self._not_recorded(exc, header, calling_aet, peer)
        except Exception as exc:
            return self._not_recorded(exc, header, calling_aet, peer)
        self._remember(header.sop_instance_uid)
        return StoreOutcome(STATUS_SUCCESS, "duplicate" if duplicate else "", duplicate=duplicate)

    def _not_recorded(self, exc: Exception, header: Any, calling_aet: str, peer: str | None) -> StoreOutcome:
        reason = f"database error: {getattr(exc, 'orig', None) or exc}"
        self._audit_reject(calling_aet, peer, header.sop_instance_uid, header.study_uid, header.series_uid,
                           STATUS_PROCESSING_FAILURE, reason, sop_class=header.sop_class_uid)
        log.error("instance not recorded", error=str(exc)[:300])
        return StoreOutcome(STATUS_PROCESSING_FAILURE, reason)

    def _refuse_full(self, exc: Exception, header: Any, calling_aet: str, peer: str | None) -> StoreOutcome:
        self._audit_reject(calling_aet, peer, header.sop_instance_uid, header.study_uid, header.series_uid,
                           STATUS_OUT_OF_RESOURCES, str(exc), event=audit.DISK_FULL,
                           sop_class=header.sop_class_uid, accession=header.study.get("accession", ""))
        log.error("file store below floor: instance refused", free_bytes=self.ctx.store.free_bytes())
        return StoreOutcome(STATUS_OUT_OF_RESOURCES, str(exc))

    def _remember(self, sop_uid: str) -> None:
        with self._lock:
            self._recent[sop_uid] = None
            while len(self._recent) > RECENT_UIDS:
                self._recent.pop(next(iter(self._recent)))

    def _audit_reject(self, calling: str, peer: str | None, sop_uid: str, study_uid: str, series_uid: str,
                      status: int, reason: str, *, event: str = audit.REJECTED, sop_class: str = "",
                      accession: str = "") -> None:
        try:
            with self.ctx.sessions.begin() as s:
                audit.record(s, event, actor=calling or "?", study_uid=study_uid, series_uid=series_uid,
                             accession=accession, outcome=audit.FAILURE,
                             details={"sop_instance_uid": sop_uid, "sop_class_uid": sop_class,
                                      "status": f"0x{status:04X}", "reason": reason[:1000], "peer": peer})
        except Exception:
            log.exception("could not audit rejected instance")
