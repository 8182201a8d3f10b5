#!/usr/bin/env bash
# Quick start: set up, migrate and run the all-in-one node on embedded defaults
# (SQLite and the file store in ./var, DICOM on 11112 as ICHTRIAGE, web on 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/triage db upgrade
exec .venv/bin/triage serve "$@"
