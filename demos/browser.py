"""A headless Chromium from the system's package (Debian: `apt-get install chromium`), driven by Playwright:
the browser tests and `demos/screenshots.py` use it. Playwright's own browser download is never needed."""

from __future__ import annotations

import os
import shutil

# Flags that keep a headless Chromium quiet and working in a container: no sandbox (root), no GPU, no
# background fetches (updates, sync, QUIC), /tmp instead of a small /dev/shm.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    """$CHROMIUM, or the system's chromium / chromium-browser / google-chrome."""
    found = os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    return found


def launch(playwright):
    """A headless Chromium browser (close it when done)."""
    path = chromium_path()
    if path is None:
        raise RuntimeError(
            "no Chromium found: apt-get install chromium (scripts/test.sh does), or set $CHROMIUM"
        )
    return playwright.chromium.launch(executable_path=path, args=ARGS)
