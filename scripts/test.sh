#!/usr/bin/env bash
# The test suite: install (once), check formatting and lint, run every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The suite starts a few hundred Python processes: let them cache bytecode (in the venvs and the
# repository's __pycache__) even where the shell turns that off. Without the cache every process of the
# XLA lane compiles torch 2.9 and torch_xla from source again (about 12 CPU-seconds each on 2 cores).
unset PYTHONDONTWRITEBYTECODE
bash scripts/env.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest -n "${RECIPEBOX_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
