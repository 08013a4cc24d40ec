"""Start a benchmark's worker mode as two CPU ranks under torchrun, one thread each, and fail loudly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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


HF_RESULT = "hf_trainer.json"  # what a benchmark's --hf-worker rank 0 writes into its --out folder


def steady_throughput(run_dir: Path, warmup_steps: int) -> dict:
    """A recipe run's mean samples/s over the logging windows after `warmup_steps`, and its last loss."""
    from launch.tracking import read_metrics

    windows = [r for r in read_metrics(run_dir) if "train/samples_per_s" in r]
    steady = [r["train/samples_per_s"] for r in windows if r["step"] > warmup_steps]
    return {"samples_per_s": sum(steady) / len(steady), "loss": windows[-1]["train/loss"]}


def run_hf_worker(script: str, recipe_dir: Path, out: Path, steps: int) -> dict:
    """The benchmark's transformers.Trainer side (`script --hf-worker`) on two ranks; rank 0's result."""
    args = [script, "--hf-worker", f"--recipe-run={recipe_dir}", f"--out={out}", f"--steps={steps}"]
    torchrun_two_ranks(args, out.parent / "trainer.log")
    return json.loads((out / HF_RESULT).read_text())


def step_clock(warmup_steps: int):
    """A TrainerCallback timing the steps after `warmup_steps` (start, end, last_step)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start = self.end = None
            self.last_step = 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup_steps:
                self.start = time.perf_counter()
            elif state.global_step > warmup_steps:
                self.end, self.last_step = time.perf_counter(), state.global_step

    return StepClock()


def write_trainer_result(trainer, clock, warmup_steps: int, out: Path, **extra) -> None:
    """Rank 0: the Trainer's steady samples/s (full batches only) and last loss, as run_hf_worker reads them."""
    import torch

    args = trainer.args
    if args.process_index != 0:
        return
    samples = args.per_device_train_batch_size * args.world_size * (clock.last_step - warmup_steps)
    result = {
        "samples_per_s": samples / (clock.end - clock.start),
        "loss": [r["loss"] for r in trainer.state.log_history if "loss" in r][-1],
        "batch_size": args.per_device_train_batch_size,
        "world_size": args.world_size,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }
    (out / HF_RESULT).write_text(json.dumps(result))
