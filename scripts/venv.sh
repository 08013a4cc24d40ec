# Sourced by scripts/env.sh and scripts/env_xla.sh: the stamp check and the virtualenv both start with.

# venv_is_current VENV STAMP: VENV was built from dependency files whose hash is STAMP, so nothing to do.
venv_is_current() {
  [ -f "$1/.recipebox-stamp" ] && [ "$(cat "$1/.recipebox-stamp")" = "$2" ]
}

# ensure_venv VENV: a virtualenv at VENV from the system Python 3.11 (python3-venv installed if missing).
ensure_venv() {
  local python
  python=$(command -v python3.11 || command -v python3)
  if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "installing python3-venv (the system Python lacks venv)" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  fi
  [ -x "$1/bin/python" ] || "$python" -m venv "$1"
}
