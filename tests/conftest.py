"""Shared test settings: markers, the repository root, and the environment real subprocesses run with."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent
CLUSTER = REPO / "slurm" / "local_cluster.sh"
STARTED_CLUSTER = pytest.StashKey[Path]()  # a file that exists while this run owns the cluster it started

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
    if hasattr(config, "workerinput"):  # an xdist worker: the controller named the file
        config.stash[STARTED_CLUSTER] = Path(config.workerinput["started_cluster"])
    else:
        started = Path(tempfile.gettempdir()) / f"recipebox-tests-{os.getpid()}-started-cluster"
        started.unlink(missing_ok=True)
        config.stash[STARTED_CLUSTER] = started


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist: every worker marks the controller's file when it starts the cluster."""
    node.workerinput["started_cluster"] = str(node.config.stash[STARTED_CLUSTER])


@pytest.fixture(scope="session")
def local_cluster(pytestconfig) -> None:
    """The local Slurm cluster, up. If it was not running, this marks the run as the one that started it,
    and pytest_sessionfinish takes it down again when the run ends; a cluster found running is left running.
    Either worker may start it (`up` is idempotent and locked); the mark is a file both workers share."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs as root (slurm/local_cluster.sh up)")
    if subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode != 0:
        pytestconfig.stash[STARTED_CLUSTER].touch()  # before `up`: a half-started cluster is ours too
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True)
    assert out.returncode == 0, f"slurm/local_cluster.sh up failed:\n{out.stdout}\n{out.stderr}"
    print(f"\nlocal cluster up in {time.monotonic() - t0:.1f}s")


def pytest_sessionfinish(session):
    """Take the local cluster down if this run started it: in the xdist controller (or the only process),
    which finishes after every worker has."""
    config = session.config
    started = config.stash.get(STARTED_CLUSTER, None)
    if hasattr(config, "workerinput") or started is None or not started.exists():
        return
    started.unlink()
    out = subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    reporter.write_line("")  # xdist's progress line has no newline yet
    if out.returncode == 0:
        reporter.write_line("this run started the local cluster, so it took it down")
    else:
        reporter.write_line(f"slurm/local_cluster.sh down failed:\n{out.stdout}{out.stderr}", red=True)


# Files run longest first, so that the last one to start is short and the two workers end together: with
# `-n 2 --dist loadfile --no-loadscope-reorder` (scripts/test.sh) a worker takes a whole file in this order
# (xdist would otherwise start with the files that have the most tests). The XLA lane leads: when pytest
# runs alone, its fixture installs .venv-xla.
FIRST = (
    "test_xla.py",
    "test_checkpoints.py",
    "test_deepspeed.py",
    "test_mlm_nsp.py",
    "test_summarization.py",
    "test_qa.py",
    "test_asr_ctc.py",
    "test_classification.py",
    "test_backends.py",
    "test_slurm.py",
    "test_demos.py",
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
def _no_process_group_outlives_its_test():
    """A test whose in-process code makes a default process group destroys it before it ends: the next test
    in this worker could not make its own ("trying to initialize the default process group twice")."""
    import torch.distributed as dist

    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("the test left a default process group behind")


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
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_")) and k != "GRADIO_TEMP_DIR"
    }  # each demo app makes its own upload folder
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
    from recipebox.data.text import read_documents
    from recipebox.data.tokenizer import train_wordpiece

    docs = read_documents([REPO / "data" / "toy" / "mlm_nsp" / "corpus.txt"])
    path = tmp_path_factory.mktemp("tok")
    train_wordpiece((s for d in docs for s in d), vocab_size=600).save_pretrained(path)
    return path


# The browser lane (tests/test_demos.py and each recipe's app test): one headless Chromium per module.
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    from demos import browser as chromium

    with sync_playwright() as playwright:
        b = chromium.launch(playwright)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    yield context.new_page()
    context.close()
