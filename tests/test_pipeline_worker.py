"""The worker loop and the process's doorbell: work queued in this process is claimed at once,
not at the next poll, and a stopping worker leaves its idle wait at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.peers import node_context, wait_for
from triage.pipeline.worker import Worker


class RecordingWorker(Worker):
    """The real loop, queue and doorbell; the handler only records when it ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ran: list[float] = []

    def _handler(self, kind: str) -> Callable[[Any], Any]:
        return lambda job: self.ran.append(time.monotonic())


def test_idle_worker_claims_when_rung_and_stops_without_waiting_for_its_poll(tmp_path: Path) -> None:
    ctx = node_context(tmp_path, poll_seconds=30)
    try:
        w = RecordingWorker(ctx, ("notify",), name="test-worker")
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        time.sleep(0.5)  # idle now: its next poll is 30 s away
        ctx.queue.enqueue("notify", {"result_id": 1, "channel": "webhook"})
        time.sleep(1.0)
        assert w.ran == [], "without a ring the job waits for the poll"
        rung = time.monotonic()
        ctx.doorbell.ring()
        wait_for(lambda: w.ran, timeout=10, message="the job claimed after the ring")
        assert w.ran[0] - rung < 5
        assert ctx.doorbell.rings >= 2  # the worker rang after completing it (its follow-up work)
        stopping = time.monotonic()
        w.stop()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - stopping < 10
    finally:
        ctx.close()
