#!/usr/bin/env bash
# Run the whole test suite: sets up, makes sure PostgreSQL is up, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_queue.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/ensure-postgres.sh
export TRIAGE_TEST_POSTGRES_URL=${TRIAGE_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
.venv/bin/ruff check triage storage reports tests bench
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
