"""Database rows for received instances, committed in groups.

Every association thread hands its instance to one writer thread, writes the file meanwhile
(:meth:`FileStore.write_new`: content and name fsynced, the two flushes overlapping), and
waits. The writer takes whatever has queued up (up to ``MAX_BATCH``) and runs the batch's
statements in one transaction *while* those files are being written; before it commits, it
waits until every file of the batch is durable (at most ``OVERLAP_WAIT`` s). If a file failed
or is slow, it rolls back and takes the careful path: wait for the files outside the
transaction, drop a record whose file failed (its thread gets the error), record the rest.
Only after the commit are the waiting threads released, and they acknowledge with 0x0000. So no
row is committed before its file (content and name) is durable and no instance is acknowledged
before its rows are committed; with one association, the statements' CPU no longer adds to the
flush latency of each instance. (The careful path keeps a slow disk from holding the database's
write lock; the overlapped one holds it for one file flush at most ``OVERLAP_WAIT``.) With
several associations sending at once, the per-transaction cost and the lock are shared. A
caller whose writers do not sync directories passes ``sync_dirs`` (e.g.
:meth:`FileStore.sync_dirs`): each directory of a batch is then fsynced once, after its files
and before the transaction (the careful path only).

Per batch and series: the study and series rows are created or refreshed, a series that had
already completed is reopened (:func:`storage.lifecycle.receive`: generation + 1, audit
``series_reopened``), the instances are inserted, and one audit event ``received`` lists the SOP
Instance UIDs it recorded.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage import audit, lifecycle
from storage.models import Instance, Series, utcnow
from triage.dicom.header import Header
from triage.logging import get_logger

log = get_logger(__name__)

MAX_BATCH = 64
RETRIES = 5
OVERLAP_WAIT = 2.0  # seconds an open transaction waits for its batch's files before falling back


@dataclass
class InstanceRecord:
    """One received instance, written to the file store, waiting for its rows."""

    header: Header
    rel: str
    size: int
    sha256: str
    transfer_syntax: str
    calling_aet: str
    peer: str | None
    #: Set (result ``None`` or an exception) by the thread writing the file.
    written: Future[None] | None = None
    #: The receiving process (its worker id), named in the audit event: with several receiver
    #: processes on one port (``dicom_reuse_port``) it says which one took the instance.
    receiver: str = ""


WRITE_TIMEOUT = 300.0


def _write_error(record: InstanceRecord) -> BaseException | None:
    """Wait for the record's file; the exception its write raised, if any."""
    if record.written is None:
        return None
    try:
        return record.written.exception(timeout=WRITE_TIMEOUT)
    except TimeoutError as exc:
        return exc


_SERIES, _INSTANCES = Series.__table__, Instance.__table__
# Built once (building and keying a Core statement per batch cost more CPU than running it).
_KNOWN = select(_INSTANCES.c.sop_instance_uid, _INSTANCES.c.sha256, _INSTANCES.c.path).where(
    _INSTANCES.c.sop_instance_uid.in_(bindparam("b_uids", expanding=True)))
_REFRESH = (update(_INSTANCES).where(_INSTANCES.c.sop_instance_uid == bindparam("b_uid"))
            .values(sha256=bindparam("b_sha"), size=bindparam("b_size"), transfer_syntax=bindparam("b_ts"),
                    received_at=bindparam("b_now")))
_INSERT_INSTANCES = insert(_INSTANCES)
_COUNT = (update(_SERIES).where(_SERIES.c.id == bindparam("b_id"))
          .values(instance_count=_SERIES.c.instance_count + bindparam("b_n"), last_received_at=bindparam("b_now")))


def record_batch(sessions: sessionmaker[Session], records: Sequence[InstanceRecord],
                 before_commit: Callable[[], None] | None = None) -> list[bool]:
    """Record ``records`` in one transaction; returns per record whether it was a duplicate.

    Their files must be durable before the commit: either already, or ``before_commit`` waits for
    them (it runs after the statements, inside the transaction; raising from it rolls back).
    Prebuilt Core statements on the session's connection (the ORM unit of work costs several
    milliseconds of CPU per instance); the audit event goes through :func:`storage.audit.record`.
    """
    now = utcnow()
    with sessions.begin() as s:
        c = s.connection()
        uids = [r.header.sop_instance_uid for r in records]
        known = {row.sop_instance_uid: row for row in c.execute(_KNOWN, {"b_uids": uids})}
        duplicate: list[bool] = []
        fresh: dict[str, list[InstanceRecord]] = {}
        replaced: list[InstanceRecord] = []
        seen: set[str] = set()
        for r in records:
            uid = r.header.sop_instance_uid
            dup = uid in known or uid in seen
            duplicate.append(dup)
            seen.add(uid)
            if not dup:
                fresh.setdefault(r.header.series_uid, []).append(r)
            elif uid in known and known[uid].path == r.rel and known[uid].sha256 != r.sha256:
                replaced.append(r)  # its file now holds these bytes (another transfer syntax, a correction)
        if replaced:  # before any series' locks and the audit chain's: a purge locks in that order too
            _refresh_rows(s, replaced, now)
        for series_uid, group in fresh.items():
            _record_series(s, series_uid, group, now)
        if before_commit is not None:
            before_commit()
    return duplicate


def _record_series(s: Session, series_uid: str, group: list[InstanceRecord], now: Any) -> None:
    c = s.connection()
    h = group[0].header
    _study_id, series_id, generation = lifecycle.receive(
        s, h.study_uid, series_uid, h.study, h.series, now, first_sop_uid=group[0].header.sop_instance_uid)
    c.execute(_INSERT_INSTANCES, [
        {"series_id": series_id, "sop_instance_uid": r.header.sop_instance_uid,
         "sop_class_uid": r.header.sop_class_uid, "instance_number": r.header.instance_number,
         "transfer_syntax": r.transfer_syntax, "path": r.rel, "size": r.size, "sha256": r.sha256,
         "calling_aet": r.calling_aet[:16], "received_at": now, "meta": r.header.meta}
        for r in group
    ])
    c.execute(_COUNT, {"b_id": series_id, "b_n": len(group), "b_now": now})
    audit.record(
        s, audit.RECEIVED, actor=group[0].calling_aet or "?", study_uid=h.study_uid, series_uid=series_uid,
        accession=h.study.get("accession", ""),
        details={"count": len(group), "sop_instance_uids": [r.header.sop_instance_uid for r in group],
                 "sop_classes": sorted({r.header.sop_class_uid for r in group}),
                 "transfer_syntaxes": sorted({r.transfer_syntax for r in group}),
                 "bytes": sum(r.size for r in group), "peers": sorted({str(r.peer) for r in group}),
                 "calling_aets": sorted({r.calling_aet for r in group}), "generation": generation,
                 "receivers": sorted({r.receiver for r in group if r.receiver})},
    )


def _refresh_rows(s: Session, replaced: list[InstanceRecord], now: Any) -> None:
    """A known instance sent again with other bytes was written over its file: its row takes the
    file's digest, size and transfer syntax (DICOMweb serves the file under the row's syntax), and the
    audit says so. The series is not reopened: a re-send is most often the same image in another
    transfer syntax, and reading it again would send the PACS a second set of results."""
    c = s.connection()
    c.execute(_REFRESH, [{"b_uid": r.header.sop_instance_uid, "b_sha": r.sha256, "b_size": r.size,
                          "b_ts": r.transfer_syntax, "b_now": now} for r in replaced])
    by_series: dict[str, list[InstanceRecord]] = {}
    for r in replaced:
        by_series.setdefault(r.header.series_uid, []).append(r)
    for series_uid, group in by_series.items():
        h = group[0].header
        audit.record(s, audit.RECEIVED, actor=group[0].calling_aet or "?", study_uid=h.study_uid,
                     series_uid=series_uid, accession=h.study.get("accession", ""),
                     details={"count": len(group), "replaced": True,
                              "sop_instance_uids": [r.header.sop_instance_uid for r in group],
                              "transfer_syntaxes": sorted({r.transfer_syntax for r in group})})


def record_with_retries(sessions: sessionmaker[Session], records: Sequence[InstanceRecord],
                        before_commit: Callable[[], None] | None = None) -> list[bool]:
    """:func:`record_batch`, again when a concurrent writer won a race (unique keys) or the
    database was briefly busy."""
    for attempt in range(RETRIES):
        try:
            return record_batch(sessions, records, before_commit)
        except IntegrityError:
            continue  # another receiver created the same study/series/instance: look again
        except OperationalError:
            if attempt == RETRIES - 1:
                raise
    raise RuntimeError("could not record the instances (unique-key races did not settle)")


class _NotWritten(Exception):
    """A file of the batch failed or is not durable yet (overlapped commit falls back)."""


class Recorder:
    """The writer thread that commits instance rows in groups (see the module docstring)."""

    def __init__(self, sessions: sessionmaker[Session], sync_dirs: Callable[[list[str]], None] | None = None,
                 *, overlap: bool = True) -> None:
        """``sync_dirs`` (e.g. :meth:`FileStore.sync_dirs`) makes the names of a batch's files
        durable before its rows are committed; ``None`` when the writers sync directories themselves.
        ``overlap``: run a batch's statements while its files are flushed (see :meth:`_commit_overlapped`)."""
        self.sessions = sessions
        self.sync_dirs = sync_dirs
        self.overlap = overlap
        self._queue: queue.Queue[tuple[InstanceRecord, Future[bool]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.recorded = 0
        self.overlapped = 0  # batches whose statements ran while their files were flushed

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dicom-recorder", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout=60)
                self._thread = None

    def submit(self, record: InstanceRecord) -> Future[bool]:
        """Queue one instance; the future resolves (True for a duplicate) once it is committed,
        or to the write error of its file."""
        future: Future[bool] = Future()
        if self._thread is None:  # not started (used without a server): record in this thread
            self._commit([(record, future)])
            return future
        self._queue.put((record, future))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[InstanceRecord, Future[bool]]]) -> None:
        if self.overlap and self.sync_dirs is None and self._commit_overlapped(batch):
            return
        ready = []
        for record, future in batch:
            error = _write_error(record)
            if error is not None:
                future.set_exception(error)  # its thread refuses the instance; no row for it
            else:
                ready.append((record, future))
        if not ready:
            return
        if self.sync_dirs is not None:
            try:
                self.sync_dirs([r.rel for r, _ in ready])
            except OSError as exc:  # the names are not durable: refuse the whole batch, record nothing
                log.error("file store directory fsync failed", error=str(exc)[:300])
                for _, future in ready:
                    future.set_exception(exc)
                return
        try:
            results = record_with_retries(self.sessions, [r for r, _ in ready])
        except Exception as exc:
            if len(ready) > 1:
                for one in ready:  # find the record that makes the group fail; record the others
                    self._commit([one])
                return
            log.error("instance rows not recorded", error=str(exc)[:300])
            ready[0][1].set_exception(exc)
            return
        self._done(ready, results)

    def _done(self, ready: list[tuple[InstanceRecord, Future[bool]]], results: list[bool]) -> None:
        self.batches += 1
        self.recorded += len(ready)
        for (_, future), dup in zip(ready, results, strict=True):
            future.set_result(dup)

    def _commit_overlapped(self, batch: list[tuple[InstanceRecord, Future[bool]]]) -> bool:
        """The batch's statements run while its files are still being written and flushed; the
        commit waits (at most ``OVERLAP_WAIT`` s) until every file is durable. False, with nothing
        recorded, when a write failed or is slow: :meth:`_commit` then takes the careful path
        (wait outside the transaction, drop failed records, split a failing group)."""
        records = [r for r, _ in batch]

        def files_durable() -> None:
            deadline = time.monotonic() + OVERLAP_WAIT
            for r in records:
                if r.written is None:
                    continue
                try:
                    if r.written.exception(timeout=max(0.0, deadline - time.monotonic())) is not None:
                        raise _NotWritten
                except TimeoutError:
                    raise _NotWritten from None

        try:
            results = record_with_retries(self.sessions, records, before_commit=files_durable)
        except Exception:  # _NotWritten or a database error: the careful path looks at each record
            return False
        self.overlapped += 1
        self._done(batch, results)
        return True
