"""structlog set-up: JSON lines in production, readable console in development.

Patient names and IDs must never reach a log line. Call sites log UIDs and database ids only;
as a safety net, :func:`scrub_phi` drops any event key that names a PHI attribute, and
:func:`scrub_url_credentials` removes the user info (``user:secret@``) of any URL in a value.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import structlog

from triage.config import Settings
from triage.redact import strip_userinfo_deep

PHI_KEYS = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "accession",
        "accession_number",
        "accessionnumber",
        "other_patient_ids",
        "patient_address",
    }
)


def scrub_phi(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if key.lower() in PHI_KEYS:
            event[key] = "[redacted]"
    return event


def scrub_url_credentials(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Drop ``user:secret@`` from every URL in the event's values (e.g. a webhook URL in an error)."""
    for key, value in event.items():
        if isinstance(value, str | dict | list | tuple):
            event[key] = strip_userinfo_deep(value)
    return event


def configure_logging(settings: Settings | None = None, *, fmt: str | None = None, level: str | None = None) -> None:
    fmt = fmt or (settings.log_format if settings else "console")
    level_name = level or (settings.log_level if settings else "INFO")
    lvl = getattr(logging, level_name)
    logging.basicConfig(stream=sys.stderr, level=lvl, format="%(message)s", force=True)
    for noisy in ("pynetdicom", "uvicorn.access", "alembic", "highdicom"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    # "skipped: maximum number of running instances reached" is expected under load.
    logging.getLogger("apscheduler").setLevel(max(lvl, logging.ERROR))
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub_phi,
            structlog.processors.format_exc_info,
            scrub_url_credentials,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_StderrLogger.factory,
        cache_logger_on_first_use=False,
    )


class _StderrLogger:
    """Writes each line to the *current* ``sys.stderr`` (not the one at configure time), so a
    replaced or closed stream (test capture, daemonising) never breaks logging."""

    @staticmethod
    def factory(*_args: Any) -> _StderrLogger:
        return _StderrLogger()

    def msg(self, message: str) -> None:
        # A closed stream drops the line rather than failing the caller.
        with contextlib.suppress(ValueError, OSError):
            print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
