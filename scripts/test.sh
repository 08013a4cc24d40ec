#!/usr/bin/env bash
# The test suite: install (once), check formatting and lint, run every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest -n "${RECIPEBOX_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
