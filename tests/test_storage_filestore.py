"""File store: layout, atomic replacement (also across a SIGKILL), free-space floor, deletion."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from storage.filestore import FREE_BYTES_ENV, DiskFullError, FileStore, StorePathError

REPO = Path(__file__).resolve().parent.parent
STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def test_layout_and_path_safety(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", floor_bytes=0)
    assert store.instance_rel(STUDY, SERIES, SOP) == f"instances/{STUDY}/{SERIES}/{SOP}.dcm"
    assert store.result_rel(STUDY, SERIES, "seg.dcm") == f"results/{STUDY}/{SERIES}/seg.dcm"
    assert store.path("instances/x.dcm") == (tmp_path / "store" / "instances" / "x.dcm").resolve()
    for bad in ("", "..", "../etc", "a/b", "/abs", ".hidden", "1.2\\3"):
        with pytest.raises(StorePathError):
            store.instance_rel(bad, SERIES, SOP)
    for bad_rel in ("/etc/passwd", "../outside", "instances/../../x", ""):
        with pytest.raises(StorePathError):
            store.path(bad_rel)


def test_write_atomic_writes_and_replaces(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", floor_bytes=0)
    rel = store.instance_rel(STUDY, SERIES, SOP)
    assert store.write_atomic(rel, b"first") == 5
    assert store.read_bytes(rel) == b"first"
    store.write_atomic(rel, b"second version")
    assert store.path(rel).read_bytes() == b"second version"
    assert leftovers(store.root) == []


def test_failed_write_keeps_old_content_and_no_temp(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", floor_bytes=0)
    rel = store.result_rel(STUDY, SERIES, "sr.dcm")
    store.write_atomic(rel, b"good")
    with pytest.raises(RuntimeError), store.open_atomic(rel) as fh:
        fh.write(b"half of a new ver")
        raise RuntimeError("encoder crashed")
    assert store.read_bytes(rel) == b"good"
    # ENOSPC from the writer surfaces as DiskFullError; the old file is untouched.
    with pytest.raises(DiskFullError), store.open_atomic(rel) as fh:
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert store.read_bytes(rel) == b"good"
    assert leftovers(store.root) == []


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", floor_bytes=0, fsync=False)
    rel = store.instance_rel(STUDY, SERIES, SOP)
    versions = [bytes([i]) * (2 * 1024 * 1024) for i in range(1, 4)]
    store.write_atomic(rel, versions[0])
    stop = threading.Event()
    seen: set[bytes] = set()
    torn: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            data = store.path(rel).read_bytes()
            if data not in versions:
                torn.append(len(data))
            seen.add(data[:1])

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            store.write_atomic(rel, versions[i % 3])
    finally:
        stop.set()
        t.join(60)
    assert torn == []
    assert len(seen) >= 2  # the reader did observe replacements


KILLED_WRITER = """
import sys, time
from storage.filestore import FileStore
store = FileStore(sys.argv[1], floor_bytes=0)
with store.open_atomic(sys.argv[2]) as fh:
    fh.write(b"NEW" * 100000)
    fh.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def test_sigkill_during_write_leaves_old_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", floor_bytes=0)
    rel = store.instance_rel(STUDY, SERIES, SOP)
    store.write_atomic(rel, b"OLD")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(store.root), rel], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.read_bytes(rel) == b"OLD"
    left = leftovers(store.root)
    assert len(left) == 1 and left[0].stat().st_size == 300000
    assert store.sweep_temp(older_than_seconds=3600) == 0  # too fresh: might be a live write
    assert store.sweep_temp(older_than_seconds=0) == 1
    assert leftovers(store.root) == []


def test_fsync_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    store = FileStore(tmp_path / "store", floor_bytes=0, fsync=True)
    store.write_atomic("results/a/b/c.dcm", b"x")
    # file + its directory + the three new directories' parents
    assert len(calls) == 5
    calls.clear()
    store.write_atomic("results/a/b/c.dcm", b"y")
    assert len(calls) == 2
    calls.clear()
    FileStore(tmp_path / "nosync", floor_bytes=0, fsync=False).write_atomic("results/a/b/c.dcm", b"x")
    assert calls == []


def test_floor_refuses_writes_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path / "store", floor_bytes=1000)
    real_free = shutil.disk_usage(store.root).free
    assert abs(store.free_bytes() - real_free) < 64 * 1024 * 1024
    store.free_bytes_override = 1500
    assert not store.below_floor() and not store.below_floor(500)
    assert store.below_floor(501)
    store.write_atomic("results/s/x/ok.bin", b"a" * 400)
    with pytest.raises(DiskFullError, match="floor") as info:
        store.write_atomic("results/s/x/big.bin", b"a" * 600)
    assert info.value.errno == errno.ENOSPC
    assert not store.exists("results/s/x/big.bin") and leftovers(store.root) == []
    store.free_bytes_override = None
    monkeypatch.setenv(FREE_BYTES_ENV, "999")
    assert store.free_bytes() == 999 and store.below_floor()
    with pytest.raises(DiskFullError):
        store.write_atomic("results/s/x/tiny.bin", b"a")
    monkeypatch.delenv(FREE_BYTES_ENV)
    assert not store.below_floor()


def test_delete_study_removes_instances_and_results_only_of_that_study(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", floor_bytes=0, fsync=False)
    for sop in ("1.1", "1.2", "1.3"):
        store.write_atomic(store.instance_rel(STUDY, SERIES, sop), b"12345")
    store.write_atomic(store.result_rel(STUDY, SERIES, "seg.dcm"), b"123")
    other = store.instance_rel("9.9", "9.8", "9.7")
    store.write_atomic(other, b"keep")
    assert store.delete_study(STUDY) == (4, 18)
    assert store.study_dirs(STUDY) == []
    assert store.read_bytes(other) == b"keep"
    assert store.delete_study(STUDY) == (0, 0)


def test_write_new_makes_content_and_name_durable_with_overlapping_flushes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver's write: the file and its directory are both fsynced before it returns, and
    the two flushes run at the same time (one flush of latency instead of two in a row)."""
    import stat
    import time

    store = FileStore(tmp_path / "store", floor_bytes=0, fsync=True)
    rel = store.instance_rel(STUDY, SERIES, SOP)
    store.write_new(store.instance_rel(STUDY, SERIES, "1.2.9"), b"warm")  # directories exist from here on
    spans: dict[str, tuple[float, float]] = {}
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        start = time.monotonic()
        time.sleep(0.2)
        real(fd)
        spans[kind] = (start, time.monotonic())

    monkeypatch.setattr(os, "fsync", slow_fsync)
    t0 = time.monotonic()
    assert store.write_new(rel, b"DICM" * 1000) == 4000
    elapsed = time.monotonic() - t0
    assert set(spans) == {"file", "dir"}  # both flushed before it returned
    (fa, fb), (da, db) = spans["file"], spans["dir"]
    assert fa < db and da < fb, "the file and directory fsyncs did not overlap"
    assert elapsed < 0.38, f"{elapsed:.2f} s: the two 0.2 s flushes ran one after the other"
    assert store.read_bytes(rel) == b"DICM" * 1000
    assert leftovers(store.root) == []
    store.close()


def test_write_new_on_an_existing_name_replaces_it_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-sent instance (the name exists, e.g. left by a crash before its row) never exposes the
    name with partial content: that write goes through write_atomic (fsync before rename)."""
    store = FileStore(tmp_path / "store", floor_bytes=0, fsync=True)
    rel = store.instance_rel(STUDY, SERIES, SOP)
    store.write_new(rel, b"partial")
    order: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    store.write_new(rel, b"whole instance")
    assert store.read_bytes(rel) == b"whole instance"
    assert order[:2] == ["fsync", "replace"]  # content durable before the name moves
    assert leftovers(store.root) == []
    with pytest.raises(DiskFullError):
        store.free_bytes_override = 0
        store.floor_bytes = 1
        store.write_new(store.instance_rel(STUDY, SERIES, "1.2.10"), b"x")
    store.close()


def test_write_new_without_hard_links_takes_the_atomic_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses hard links (some network or FAT file systems) still stores."""
    def no_links(src: str, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = FileStore(tmp_path / "store", floor_bytes=0, fsync=True)
    rel = store.instance_rel(STUDY, SERIES, SOP)
    assert store.write_new(rel, b"content") == 7
    assert store.read_bytes(rel) == b"content"
    assert leftovers(store.root) == []
    store.close()
