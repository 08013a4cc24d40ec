#!/usr/bin/env bash
# Install Debian's chromium for the browser tests when no Chromium is on the PATH (Playwright drives it; its own
# browser download is never used). Needs root or sudo; about 30 s and 440 MB the first time.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
    command -v "$name" >/dev/null && exit 0
done
[ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ] && exit 0
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
install() { $sudo apt-get install -y -q --no-install-recommends chromium >/dev/null; }
install || { $sudo apt-get update -q >/dev/null && install; }
