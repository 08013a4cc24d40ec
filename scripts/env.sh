#!/usr/bin/env bash
# Make the project's virtualenv (.venv, or $RECIPEBOX_VENV) and install recipebox into it, once.
# torch goes in first and stays pinned: any looser requirement pulls a multi-GB CUDA build.
# A stamp of the dependency files makes a second call a no-op until they change.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RECIPEBOX_VENV:-.venv}
want=$(cat setup.cfg pyproject.toml scripts/env.sh | sha256sum | cut -c1-16)
if [ -f "$venv/.recipebox-stamp" ] && [ "$(cat "$venv/.recipebox-stamp")" = "$want" ]; then
  exit 0
fi
python=$(command -v python3.11 || command -v python3)
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  echo "installing python3-venv (the system Python lacks venv)" >&2
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
constraints=$(mktemp)
echo "torch==2.13.0" >"$constraints"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e ".[test,deepspeed,slurm]"
rm -f "$constraints"
echo "$want" >"$venv/.recipebox-stamp"
