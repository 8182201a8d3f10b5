"""The file store: received instances and result objects on local disk, written atomically.

Layout under ``root`` (paths in the database are relative to it)::

    instances/<study_uid>/<series_uid>/<sop_instance_uid>.dcm
    results/<study_uid>/<series_uid>/<name>

A write goes to a temporary file in the target directory, is flushed and fsynced, renamed over
the target, and the directory is fsynced, so a reader (or a crash) sees the old file or the whole
new one, never a part. Temporary files start with ``.tmp-``; :meth:`FileStore.sweep_temp`
removes ones left by a crash. A writer of many files into one directory (the receiver) may pass
``sync_dir=False`` and call :meth:`FileStore.sync_dirs` once for the whole group before it relies
on the files being durable: one directory fsync instead of one per file.

Free-space floor: a write that would leave less than ``floor_bytes`` free raises
:class:`DiskFullError` before anything is written. Tests simulate a full disk explicitly, either
with the attribute ``free_bytes_override`` or the environment variable ``TRIAGE_TEST_FREE_BYTES``
(an integer number of bytes reported as free); both are read by :meth:`FileStore.free_bytes`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

FREE_BYTES_ENV = "TRIAGE_TEST_FREE_BYTES"
TEMP_PREFIX = ".tmp-"
_COMPONENT_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")


class DiskFullError(OSError):
    """The file store is (or would fall) below its free-space floor, or the disk is full."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StorePathError(ValueError):
    """A UID or name cannot be used as a path component (empty, separators, '..')."""


def _component(value: str, what: str) -> str:
    value = str(value).strip()
    if not _COMPONENT_RE.match(value) or ".." in value:
        raise StorePathError(f"{what} {value!r} cannot be used in a file store path")
    return value


class FileStore:
    """Atomic file writes under one root directory, with a free-space floor."""

    def __init__(self, root: str | os.PathLike[str], floor_bytes: int = 0, fsync: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.floor_bytes = max(0, int(floor_bytes))
        self.fsync = bool(fsync)
        #: Free bytes to report instead of the real value (tests: simulate a full disk).
        self.free_bytes_override: int | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # ------------------------------------------------------------------ layout
    @staticmethod
    def instance_rel(study_uid: str, series_uid: str, sop_uid: str) -> str:
        return "/".join(
            (
                "instances",
                _component(study_uid, "study UID"),
                _component(series_uid, "series UID"),
                _component(sop_uid, "SOP instance UID") + ".dcm",
            )
        )

    @staticmethod
    def result_rel(study_uid: str, series_uid: str, name: str) -> str:
        parts = (_component(study_uid, "study UID"), _component(series_uid, "series UID"), _component(name, "name"))
        return "/".join(("results", *parts))

    def path(self, rel: str | os.PathLike[str]) -> Path:
        """Absolute path of a store-relative path; refuses paths that leave the root."""
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts or not rel_path.parts:
            raise StorePathError(f"{str(rel)!r} is not a path inside the file store")
        return self.root / rel_path

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    # ------------------------------------------------------------------ space
    def free_bytes(self) -> int:
        """Bytes available to us on the store's file system (or the test override)."""
        if self.free_bytes_override is not None:
            return int(self.free_bytes_override)
        env = os.environ.get(FREE_BYTES_ENV)
        if env:
            return int(env)
        return int(shutil.disk_usage(self.root).free)

    def below_floor(self, extra_bytes: int = 0) -> bool:
        """True when writing ``extra_bytes`` more would leave less than the floor free."""
        return self.free_bytes() - max(0, int(extra_bytes)) < self.floor_bytes

    def ensure_space(self, extra_bytes: int = 0) -> None:
        """Raise :class:`DiskFullError` when ``extra_bytes`` more would cross the floor."""
        if self.below_floor(extra_bytes):
            raise DiskFullError(
                f"file store {self.root} below its free-space floor: {self.free_bytes()} bytes free, "
                f"{extra_bytes} needed, floor {self.floor_bytes}"
            )

    # ------------------------------------------------------------------ writing
    def _fsync_dir(self, directory: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` and fsync each parent whose entries changed."""
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            self._fsync_dir(d.parent)

    def sync_dirs(self, rels: Iterable[str]) -> None:
        """fsync, once each, the directories holding ``rels`` (after ``sync_dir=False`` writes)."""
        for directory in sorted({self.path(rel).parent for rel in rels}):
            self._fsync_dir(directory)

    @contextmanager
    def open_atomic(self, rel: str, expected_size: int = 0, *, enforce_floor: bool = True,
                    sync_dir: bool = True) -> Iterator[BinaryIO]:
        """A binary file object; on a clean exit its content replaces ``rel`` atomically.

        On an exception the temporary file is removed and ``rel`` is left as it was. With
        ``enforce_floor=False`` (result objects of studies already stored) the write may use the
        space below the floor, so processing goes on at the floor; only a really full disk stops it.
        With ``sync_dir=False`` the file is fsynced but its directory is not: the new name is
        durable only after :meth:`sync_dirs`.
        """
        if enforce_floor:
            self.ensure_space(expected_size)
        target = self.path(rel)
        self._makedirs(target.parent)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
            if sync_dir:
                self._fsync_dir(target.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, DiskFullError):
                raise DiskFullError(f"disk full writing {rel}: {exc.strerror}") from exc
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_atomic(self, rel: str, data: bytes, *, enforce_floor: bool = True, sync_dir: bool = True) -> int:
        """Write ``data`` to ``rel`` atomically; return the number of bytes written."""
        with self.open_atomic(rel, expected_size=len(data), enforce_floor=enforce_floor, sync_dir=sync_dir) as fh:
            fh.write(data)
        return len(data)

    def _dir_sync_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-dirsync")
            return self._pool

    def write_new(self, rel: str, data: bytes | Sequence[bytes]) -> int:
        """Write a file that should not exist yet (a received instance); return the bytes written.

        ``data`` may be given in parts (e.g. the file meta and the received dataset), written one
        after the other without joining them in memory first.

        When this returns, the content *and* the name are durable, like :meth:`write_atomic`, but
        the two flushes overlap: the data is written under a temporary name, hard-linked to ``rel``
        (which fails if ``rel`` exists, so a name is never given to another writer's file), and the
        file and its directory are fsynced at the same time (the directory on a pool thread). On
        this project's disks that costs one flush instead of two in a row (docs/benchmarks.md).

        Readers never see a partial file (the name appears after the last ``write``). A crash before
        this returns may leave ``rel`` with incomplete content: the caller records nothing for it
        before this returns, and a later write of the same name (a re-sent instance) finds it
        existing and takes :meth:`write_atomic`'s path, which replaces it atomically. When ``rel``
        already exists that path is taken from the start: a recorded file is never exposed.
        """
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        size = sum(len(p) for p in parts)
        self.ensure_space(size)
        target = self.path(rel)
        self._makedirs(target.parent)
        if target.exists():
            return self.write_atomic(rel, b"".join(parts))
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=".part")
        try:
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view):]
                try:
                    os.link(tmp_name, target)
                except FileExistsError:  # another writer got there first: replace atomically instead
                    return self.write_atomic(rel, b"".join(parts))
                except OSError as exc:  # a file system without hard links: the classic path
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    return self.write_atomic(rel, b"".join(parts))
                finally:
                    os.unlink(tmp_name)
                if self.fsync:
                    directory = self._dir_sync_pool().submit(self._fsync_dir, target.parent)
                    try:
                        os.fsync(fd)
                    finally:
                        directory.result()
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, DiskFullError):
                raise DiskFullError(f"disk full writing {rel}: {exc.strerror}") from exc
            raise
        return size

    def close(self) -> None:
        """Stop the directory-sync threads (if :meth:`write_new` started them)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # ------------------------------------------------------------------ deleting
    def delete(self, rel: str) -> bool:
        try:
            self.path(rel).unlink()
            return True
        except FileNotFoundError:
            return False

    def study_dirs(self, study_uid: str) -> list[Path]:
        uid = _component(study_uid, "study UID")
        return [d for d in (self.root / "instances" / uid, self.root / "results" / uid) if d.exists()]

    def delete_study(self, study_uid: str) -> tuple[int, int]:
        """Remove every file of a study (instances and results); return (files, bytes)."""
        files = size = 0
        for d in self.study_dirs(study_uid):
            for p in d.rglob("*"):
                if p.is_file():
                    files += 1
                    size += p.stat().st_size
            shutil.rmtree(d)
            self._fsync_dir(d.parent)
        return files, size

    def sweep_temp(self, older_than_seconds: float = 3600.0) -> int:
        """Delete temporary files left by interrupted writes; return how many."""
        return self.sweep_temp_report(older_than_seconds)[0]

    def sweep_temp_report(self, older_than_seconds: float = 3600.0) -> tuple[int, int]:
        """Delete temporary files older than ``older_than_seconds``; return (files, bytes).

        Every write holds its temporary file for well under a second (the data is in memory), so
        any age above a minute is safe with other processes writing to the same store.
        """
        cutoff = time.time() - older_than_seconds
        removed = size = 0
        for p in self.root.rglob(f"{TEMP_PREFIX}*"):
            try:
                st = p.stat()
                if p.is_file() and st.st_mtime < cutoff:
                    p.unlink()
                    removed += 1
                    size += st.st_size
            except FileNotFoundError:
                continue
        return removed, size
