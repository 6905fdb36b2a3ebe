#!/usr/bin/env bash
# Set everything up, then lint and run the whole test suite against real clients.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
