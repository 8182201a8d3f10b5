"""Receiver resilience with real processes: SIGKILL mid-association, and a full file system.

* A ``triage receiver`` on PostgreSQL is killed with SIGKILL while a PACS (a pynetdicom SCU that
  records every acknowledgement) is half-way through a 40-slice series. Every acknowledged instance
  is on disk and in the database, every instance row points at a whole file that parses (a
  temporary file of the interrupted write is never an instance), and when the PACS resends the
  whole series after the restart the series is selected and queued exactly once.
* The file store on a real small file system (tmpfs) reaches its free-space floor: new instances
  are refused with 0xA700 (audited ``disk_full``), the study already stored is still processed,
  and receiving resumes when space comes back.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.node_process import NodeProcess
from tests.peers import SeriesSpec, make_ct_series, storescu, wait_for
from tests.resilience_support import AckingSCU, build_tiny_bundle, db_rows, scalar, slow_hook_dir

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _instances(url: str) -> dict[str, str]:
    return {r[0]: r[1] for r in db_rows(url, "select sop_instance_uid, path from instances")}


@pytest.mark.postgres
def test_sigkill_mid_association_keeps_every_ack_and_resend_completes(tmp_path: Path, pg_url: str) -> None:
    spec = SeriesSpec(slices=40, size=256)  # 128 KiB per slice: the kill lands during writes
    paths = make_ct_series(tmp_path / "src", spec)
    env = {"TRIAGE_DATABASE_URL": pg_url, "TRIAGE_STABLE_SECONDS": "120"}  # completes only when all 40 are in
    rx = NodeProcess(tmp_path / "node", "receiver", env=env).start()
    scu = AckingSCU(rx.dicom_port)
    killer: list[threading.Thread] = []

    def on_ack(n: int) -> None:
        if n == 20 and not killer:  # about half acknowledged: crash while the next ones are in flight
            t = threading.Thread(target=rx.kill)
            t.start()
            killer.append(t)

    try:
        scu.send(paths, on_ack=on_ack, timeout=20)
        killer[0].join(30)
        assert not rx.alive()
        acked = set(scu.acked)
        assert 20 <= len(acked) < 40, f"{len(acked)} acknowledged: the kill did not land mid-association"
        assert len(scu.unanswered) + len(acked) + len(scu.refused) == 40 and not scu.refused

        # After the crash: every acknowledged instance is recorded and on disk, whole.
        store = tmp_path / "node" / "data" / "store"
        rows = _instances(pg_url)
        assert acked <= set(rows), f"acknowledged but not recorded: {sorted(acked - set(rows))[:3]}"
        for uid, rel in rows.items():
            assert ".tmp-" not in rel
            ds = dcmread(store / rel)
            assert str(ds.SOPInstanceUID) == uid and len(ds.PixelData) == 256 * 256 * 2
        temp_files = list(store.rglob(".tmp-*"))  # an interrupted write may leave one; it is no instance
        assert not {p.name for p in temp_files} & {Path(r).name for r in rows.values()}
        assert scalar(pg_url, "select instance_count from series") == len(rows)
        assert scalar(pg_url, "select state from series") == "receiving"

        # The PACS resends the whole series after the restart (some instances a second time).
        rx2 = NodeProcess(tmp_path / "node", "receiver", env=env, name="receiver2").start()
        try:
            r = storescu(rx2.dicom_port, paths)
            assert r.returncode == 0, r.stderr
            wait_for(lambda: scalar(pg_url, "select state from series") == "selected", timeout=60,
                     message="the resent series to be selected")
        finally:
            rx2.stop()
        assert len(_instances(pg_url)) == 40
        assert scalar(pg_url, "select instance_count from series") == 40
        jobs = db_rows(pg_url, "select dedupe_key, payload from jobs where kind = 'infer'")
        assert len(jobs) == 1, jobs
        assert jobs[0][0].endswith(":0")  # generation 0: one selection, one job
        queued = db_rows(pg_url, "select details from audit_events where event_type = 'queued'")
        completes = db_rows(pg_url, "select details from audit_events where event_type = 'series_complete'")
        assert len(queued) == 1 and len(completes) == 1
        assert completes[0][0]["instances"] == 40
        # Audit trail: every instance received exactly once, whatever was resent.
        received = [u for (d,) in db_rows(pg_url, "select details from audit_events where event_type = 'received'")
                    for u in d["sop_instance_uids"]]
        assert sorted(received) == sorted(_instances(pg_url))
    finally:
        rx.kill()


# --------------------------------------------------------------------------- disk floor
@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the floor is covered by test_dicom_scp with the test hook")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def test_disk_floor_refuses_new_instances_keeps_processing_and_recovers(tmp_path: Path) -> None:
    bundle = build_tiny_bundle(tmp_path / "bundle")
    hook = slow_hook_dir(tmp_path / "hook")
    first = make_ct_series(tmp_path / "a", SeriesSpec(slices=20, size=64, accession="ACC-A"))
    second = make_ct_series(tmp_path / "b", SeriesSpec(slices=20, size=64, accession="ACC-B"))
    store = tmp_path / "node" / "data" / "store"
    with tmpfs(store, 16):
        env = {"TRIAGE_BUNDLE_PATH": str(bundle), "TRIAGE_DISK_FLOOR_MB": "8",
               "TRIAGE_TEST_SLOW_PREDICT": "4",  # the floor is reached before study A is inferred
               "PYTHONPATH": str(hook)}
        node = NodeProcess(tmp_path / "node", "serve", env=env).start()
        url = f"sqlite:///{tmp_path / 'node' / 'data' / 'triage.sqlite3'}"
        try:
            r = storescu(node.dicom_port, first)
            assert r.returncode == 0, r.stderr
            wait_for(lambda: scalar(url, "select count(*) from jobs where kind = 'infer'") == 1, timeout=60,
                     message="study A queued")
            # Fill the file system until less than the floor is free (about 5 MiB left).
            free = os.statvfs(store).f_bavail * os.statvfs(store).f_frsize
            (store / "ballast.bin").write_bytes(b"\0" * (free - 5 * 1024 * 1024))
            scu = AckingSCU(node.dicom_port)
            scu.send(second[:5])
            assert not scu.acked and set(scu.refused.values()) == {0xA700}, scu
            assert scalar(url, "select count(*) from audit_events where event_type = 'disk_full'") == 5
            assert scalar(url, "select count(*) from instances") == 20

            # What is stored is still processed (results written, series done).
            wait_for(lambda: scalar(url, "select count(*) from series where state in ('done', 'failed')") == 1,
                     timeout=120, message="study A processed while below the floor")
            assert scalar(url, "select state from series where id = 1") == "done", node.tail()
            assert scalar(url, "select count(*) from result_objects") >= 1

            # Space comes back: the PACS resends and study B is received and processed.
            (store / "ballast.bin").unlink()
            r = storescu(node.dicom_port, second)
            assert r.returncode == 0, r.stderr
            wait_for(lambda: scalar(url, "select count(*) from series where state = 'done'") == 2, timeout=120,
                     message="study B processed after space returned")
            assert scalar(url, "select count(*) from instances") == 40
        finally:
            node.stop()
