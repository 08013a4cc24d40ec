#!/usr/bin/env bash
# The test suite: install both environments (once), check formatting and lint, run every test. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
bash scripts/env_xla.sh # the XLA lane's torch 2.9 + torch_xla (tests/test_xla.py)
bash scripts/chromium.sh # the browser lane's headless Chromium, from the system's packages (tests/test_demos.py)
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest -n "${RECIPEBOX_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
