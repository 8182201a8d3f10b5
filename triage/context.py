"""The objects every role needs, built once from :class:`~triage.config.Settings`."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, make_read_sessionmaker, make_sessionmaker
from triage.config import Settings


class Doorbell:
    """In-process wake-up for idle workers: whoever has committed new work (the series monitor an
    ``infer`` job, a worker the deliveries of a result) rings, and the workers of this process
    claim at once instead of at their next poll. Workers in other processes still poll."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rings = 0

    @property
    def rings(self) -> int:
        return self._rings

    def ring(self) -> None:
        with self._cond:
            self._rings += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Return once rung after ``seen`` (a previous :attr:`rings`) or after ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._rings != seen, timeout)
            return self._rings


@dataclass
class AppContext:
    """Settings plus the database engine, session factory, file store, queue and doorbell."""

    settings: Settings
    role: str = "serve"
    _engine: Engine | None = field(default=None, repr=False)
    doorbell: Doorbell = field(default_factory=Doorbell, repr=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.settings.effective_database_url)
        return self._engine

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        """Sessions for work that writes."""
        return make_sessionmaker(self.engine)

    @cached_property
    def reads(self) -> sessionmaker[Session]:
        """Sessions for reads only: on SQLite they never wait for (or hold up) a writer."""
        return make_read_sessionmaker(self.engine)

    @cached_property
    def store(self):  # noqa: ANN201 - storage.filestore.FileStore
        from storage.filestore import FileStore

        return FileStore(
            self.settings.store_dir,
            floor_bytes=self.settings.disk_floor_mb * 1024 * 1024,
            fsync=self.settings.fsync,
        )

    @cached_property
    def queue(self):  # noqa: ANN201 - storage.queue.JobQueue
        from storage.queue import JobQueue

        return JobQueue(self.sessions, reads=self.reads, **self.settings.queue_params)

    @cached_property
    def worker_id(self) -> str:
        return self.settings.worker_id or f"{socket.gethostname()}:{os.getpid()}:{self.role}"

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
