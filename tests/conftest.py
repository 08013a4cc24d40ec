"""Shared test settings: markers, the repository root, and the environment real subprocesses run with."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# No network, no hub, one thread per process: every rank of a 2-process run gets one of the 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: a real multi-process run of a recipe")
    config.addinivalue_line(
        "markers", "xla: torch_xla on CPU in .venv-xla (scripts/env_xla.sh), PJRT_DEVICE=CPU"
    )
    config.addinivalue_line(
        "markers", "slurm: runs jobs on the local Slurm cluster (slurm/local_cluster.sh up)"
    )


# Files run longest first, so that the last one to start is short and the two workers end together: with
# `-n 2 --dist loadfile --no-loadscope-reorder` (scripts/test.sh) a worker takes a whole file in this order
# (xdist would otherwise start with the files that have the most tests). Wall / CPU seconds per file on 2
# cores, both workers busy: checkpoints 250/254, deepspeed 225/214, mlm_nsp 205/199, xla 139/102,
# classification 132/136, slurm 105/10 (its jobs run under Slurm), ner 57/51, the rest under 2 each. The XLA
# lane leads: when pytest runs alone, its fixture installs .venv-xla.
FIRST = (
    "test_xla.py",
    "test_checkpoints.py",
    "test_deepspeed.py",
    "test_mlm_nsp.py",
    "test_classification.py",
    "test_slurm.py",
    "test_ner.py",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


@pytest.fixture(autouse=True)
def _environment_is_restored():
    """Whatever a test's in-process code writes into os.environ (a rank, a port) is gone after it: the
    subprocesses and Slurm jobs of later tests inherit this process's environment."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """A failed assertion must not leave a training run behind to slow every later test."""
    yield
    from recipe_runs import kill_leftovers

    kill_leftovers()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_"))
    }
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture
def meditations() -> Path:
    path = SHARED_DATA / "meditations.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder sits beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """One WordPiece for the toy corpus: runs compared step by step must share their token ids (training
    a tokenizer twice can break ties differently)."""
    from data.text import read_documents
    from data.tokenizer import train_wordpiece

    docs = read_documents([REPO / "data" / "toy" / "mlm_nsp" / "corpus.txt"])
    path = tmp_path_factory.mktemp("tok")
    train_wordpiece((s for d in docs for s in d), vocab_size=600).save_pretrained(path)
    return path
