"""Serving a demo app as a user does (`python demos/app.py EXPORT --port P`) and reading its page in a
headless Chromium, for the browser tests of every recipe's app."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

from conftest import REPO, free_port, subprocess_env

APP = str(REPO / "demos" / "app.py")


def start_app(*exports) -> tuple[subprocess.Popen, str, int]:
    """(process, URL, port) of `python demos/app.py EXPORT... --port P`; wait_for_server before use."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, APP, *map(str, exports), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=REPO,
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}/", port


def stop_apps(procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for_server(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as page:
                if page.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


def grid(page, elem_id: str, columns: int) -> list[list[str]]:
    """The rows a Dataframe shows (its cells, read in order)."""
    cells = page.locator(f"#{elem_id}").get_by_role("gridcell").all_inner_texts()
    return [[c.strip() for c in cells[i : i + columns]] for i in range(0, len(cells), columns)]


def wait_for_text(page, elem_id: str, needle: str) -> str:
    page.locator(f"#{elem_id}").get_by_text(needle).first.wait_for(timeout=60_000)
    return page.locator(f"#{elem_id}").inner_text()
