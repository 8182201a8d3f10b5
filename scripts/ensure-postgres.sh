#!/usr/bin/env bash
# Start the local PostgreSQL cluster if it is installed but not answering (no systemd here).
set -uo pipefail
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then exit 0; fi
if command -v pg_ctlcluster >/dev/null 2>&1; then
  ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  if [ -n "$ver" ]; then
    echo "ensure-postgres: starting cluster $ver/main"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && exit 0; sleep 1; done
  fi
fi
echo "ensure-postgres: PostgreSQL is not available at 127.0.0.1:5432; PostgreSQL tests will fail" >&2
exit 0
