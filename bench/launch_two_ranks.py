"""Start a benchmark's worker mode as two CPU ranks under torchrun, one thread each, and fail loudly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_ranks(script_args: list[str], log: Path) -> None:
    """One thread per rank, so the ranks do not fight over two cores and both sides get the same compute."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        sys.exit(f"error: {torchrun} not found; run this with the project's virtualenv python")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master-port={free_port()}", *script_args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        # The log sits in a temporary folder about to go, so the cause is shown here: the ranks' own error
        # lines and tracebacks (torchrun's summary after them says nothing about it), else the log's tail.
        lines = log.read_text(errors="replace").splitlines()
        cause = [line for line in lines if line.startswith(("error:", "[rank"))][-40:] or lines[-40:]
        sys.exit(f"error: {' '.join(cmd)} exited with {done.returncode}:\n" + "\n".join(cause))
