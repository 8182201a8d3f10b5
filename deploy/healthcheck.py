#!/usr/bin/env python3
"""Container and orchestrator probes for the triage node's roles.

Used by the image's HEALTHCHECK, the compose file, the systemd units' ``ExecStartPost`` and the
Kubernetes init containers. Exit status 0 = healthy, 1 = unhealthy (reason on stderr).

    healthcheck.py http [URL]        GET URL (default http://127.0.0.1:$TRIAGE_WEB_PORT/healthz) -> 2xx
    healthcheck.py tcp [HOST:PORT]   TCP connect (default 127.0.0.1:$TRIAGE_DICOM_PORT): the SCP listens
    healthcheck.py db [--wait S]     database reachable and migrated to the head revision; with --wait,
                                     poll up to S seconds (an init container waiting for the migration Job)

``http`` and ``tcp`` need only the standard library, so they stay cheap enough to run every few
seconds. ``db`` imports the project (it needs the configuration and the migration scripts).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import urllib.error
import urllib.request


def _env_port(key: str, default: int) -> int:
    raw = os.environ.get(key, "")
    return int(raw) if raw.strip() else default


def check_http(url: str, timeout: float) -> str | None:
    """None when ``url`` answers 2xx, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - local probe URL
            if 200 <= resp.status < 300:
                return None
            return f"{url}: HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"


def check_tcp(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to ``host:port`` opens, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return None
    except OSError as exc:
        return f"{host}:{port}: {exc}"


def check_db(config: str | None) -> str | None:
    """None when the configured database is reachable and at the head migration, else the reason."""
    from storage.migrate import current_revision, head_revision
    from triage.config import ConfigError, load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        return f"configuration: {exc}"
    try:
        current = current_revision(settings.effective_database_url)
    except Exception as exc:  # driver errors differ between SQLite and PostgreSQL
        return f"database unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    head = head_revision()
    if current != head:
        return f"database at revision {current or '(empty)'}, expected {head}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="healthcheck.py", description="Probe a triage node role")
    p.add_argument("--timeout", type=float, default=5.0, help="Seconds for one attempt (default 5)")
    sub = p.add_subparsers(dest="check", required=True)
    h = sub.add_parser("http", help="GET a URL, expect 2xx")
    h.add_argument("url", nargs="?", default="")
    t = sub.add_parser("tcp", help="open a TCP connection")
    t.add_argument("address", nargs="?", default="", help="HOST:PORT")
    d = sub.add_parser("db", help="database reachable and migrated")
    d.add_argument("--config", default=None, help="TOML configuration file (or TRIAGE_CONFIG)")
    d.add_argument("--wait", type=float, default=0.0, help="Poll up to this many seconds")
    args = p.parse_args(argv)

    if args.check == "http":
        url = args.url or f"http://127.0.0.1:{_env_port('TRIAGE_WEB_PORT', 8080)}/healthz"
        reason = check_http(url, args.timeout)
    elif args.check == "tcp":
        host, port = "127.0.0.1", _env_port("TRIAGE_DICOM_PORT", 11112)
        if args.address:
            host, _, port_text = args.address.rpartition(":")
            port = int(port_text)
        reason = check_tcp(host.strip("[]") or "127.0.0.1", port, args.timeout)
    else:
        deadline = time.monotonic() + args.wait
        while (reason := check_db(args.config)) is not None and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
    if reason is not None:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
