#!/usr/bin/env bash
# Make the project's virtualenv (.venv, or $RECIPEBOX_VENV) and install recipebox into it, once.
# torch goes in first and stays pinned: any looser requirement pulls a multi-GB CUDA build.
# A stamp of the dependency files makes a second call a no-op until they change.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
venv=${RECIPEBOX_VENV:-.venv}
want=$(cat setup.cfg pyproject.toml scripts/env.sh scripts/venv.sh | sha256sum | cut -c1-16)
venv_is_current "$venv" "$want" && exit 0
ensure_venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
constraints=$(mktemp)
echo "torch==2.13.0" >"$constraints"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e ".[test,deepspeed,slurm,demo]"
rm -f "$constraints"
echo "$want" >"$venv/.recipebox-stamp"
