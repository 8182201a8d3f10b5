"""The process registry (table ``workers``): every running role process and its last heartbeat,
shown on the operations page and in ``/metrics``.

A process registers at start, refreshes its heartbeat every ``heartbeat_seconds`` and removes
itself on a clean stop. A process killed with SIGKILL cannot remove itself: each heartbeat tick
of any process prunes rows whose heartbeat is older than the stale limit, so the page never shows
dead processes for long.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Worker, utcnow


def stale_after(heartbeat_seconds: float) -> float:
    """Seconds without a heartbeat after which a process is taken as gone (missed beats, with a floor)."""
    return max(30.0, 6.0 * float(heartbeat_seconds))


class WorkerRegistry:
    """Register, refresh, remove and prune process rows."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def register(self, worker_id: str, role: str = "worker", meta: dict[str, Any] | None = None) -> None:
        """Insert or refresh this process's row."""
        now = utcnow()
        with self.sessions.begin() as s:
            s.merge(Worker(id=worker_id, role=role, host=socket.gethostname(), pid=os.getpid(), started_at=now,
                           heartbeat_at=now, current_job_id=None, meta=dict(meta or {})))

    def heartbeat(self, worker_id: str, current_job_id: int | None = None) -> bool:
        """Refresh the heartbeat; False when the row is gone (pruned while the database was away)."""
        with self.sessions.begin() as s:
            res = s.execute(update(Worker).where(Worker.id == worker_id)
                            .values(heartbeat_at=utcnow(), current_job_id=current_job_id))
            return res.rowcount == 1

    def unregister(self, worker_id: str) -> None:
        with self.sessions.begin() as s:
            s.execute(delete(Worker).where(Worker.id == worker_id))

    def prune(self, stale_after_seconds: float) -> int:
        """Delete rows whose heartbeat is older than ``stale_after_seconds`` (processes killed
        without a clean stop); returns how many."""
        cutoff = utcnow() - dt.timedelta(seconds=stale_after_seconds)
        with self.sessions.begin() as s:
            return int(s.execute(delete(Worker).where(Worker.heartbeat_at < cutoff)).rowcount or 0)
