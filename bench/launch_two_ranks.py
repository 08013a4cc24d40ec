"""Start a benchmark's worker mode under torchrun (two CPU ranks, one thread each, unless told otherwise), and
fail loudly; run a recipe-vs-Trainer comparison as pairs of runs and report the median pair."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The fine-tuning comparisons' logging window: their first steps pay for allocator growth and lazy init.
WARMUP_STEPS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_ranks(script_args: list[str], log: Path, nproc: int = 2, env: dict | None = None) -> None:
    """`torchrun --nproc_per_node=NPROC` from the repository root, offline, with one thread per rank, so the
    ranks do not fight over two cores and both sides get the same compute; `env` adds or overrides variables."""
    # torchrun of this interpreter's torch, wherever the launcher script itself was installed
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*torchrun, f"--nproc_per_node={nproc}", f"--master-port={free_port()}", *script_args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    with log.open("w") as f:
        # Its own session: a stop (Ctrl-C, a time limit's SIGTERM) reaches torchrun once, from here, and
        # torchrun passes it on to the ranks (in sessions of their own) before it exits, so none outlives us.
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=40)  # torchrun gives the ranks 30 s, then kills them
            except BaseException:  # out of time, or a second stop
                proc.kill()
            raise
    if returncode:
        # The log sits in a temporary folder about to go, so the cause is shown here: the ranks' own error
        # lines and tracebacks (torchrun's summary after them says nothing about it), else the log's tail.
        lines = log.read_text(errors="replace").splitlines()
        cause = [line for line in lines if line.startswith(("error:", "[rank"))][-40:] or lines[-40:]
        sys.exit(f"error: {' '.join(cmd)} exited with {returncode}:\n" + "\n".join(cause))


def torchrun_two_ranks(script_args: list[str], log: Path) -> None:
    """Two CPU ranks, one thread each: the CPU benchmarks' setting."""
    torchrun_ranks(script_args, log)


HF_RESULT = "hf_trainer.json"  # what a benchmark's --hf-worker rank 0 writes into its --out folder


def steady_throughput(run_dir: Path, warmup_steps: int) -> dict:
    """A recipe run's mean samples/s over the logging windows after `warmup_steps`, and its last loss; also
    the mean tokens/s, TFLOPS and MFU and the highest peak memory (GB) of those windows, where logged."""
    from recipebox.launch.tracking import read_metrics

    windows = [r for r in read_metrics(run_dir) if "train/samples_per_s" in r]
    steady = [r for r in windows if r["step"] > warmup_steps]
    result = {"loss": windows[-1]["train/loss"]}
    for key in ("samples_per_s", "tokens_per_s", "tflops", "mfu"):
        values = [r[f"train/{key}"] for r in steady if f"train/{key}" in r]
        if values:
            result[key] = sum(values) / len(values)
    if any("train/peak_mem_gb" in r for r in windows):
        result["peak_mem_gb"] = max(r.get("train/peak_mem_gb", 0.0) for r in windows)
    return result


def timed_throughput(run_dir: Path, warmup_steps: int, key: str = "samples_per_s") -> dict:
    """A recipe run's steady `train/<key>` after `warmup_steps`: each logging window weighted by its duration
    (the time between its log line and the previous one), so it is a total over total time; the last loss."""
    from recipebox.launch.tracking import read_metrics

    windows = [r for r in read_metrics(run_dir) if f"train/{key}" in r]
    steady = [(prev, r) for prev, r in zip(windows, windows[1:]) if r["step"] > warmup_steps]
    seconds = [r["time"] - prev["time"] for prev, r in steady]
    total = sum(r[f"train/{key}"] * s for (_, r), s in zip(steady, seconds))
    return {key: total / sum(seconds), "loss": windows[-1]["train/loss"]}


def saved_config(run_dir: Path, config_class):
    """A recipe run's config (a dataclass) from its saved RUN/config.yaml, so a change to the recipe's
    defaults cannot skew a comparison."""
    import dataclasses

    from recipebox.launch.config import load_yaml

    saved = load_yaml(run_dir / "config.yaml")
    return config_class(**{f.name: saved[f.name] for f in dataclasses.fields(config_class)})


def comparison_args(
    parser: argparse.ArgumentParser, *, default: int, quick: int, warmup: int, windows: int = 2
):
    """Parse a recipe-vs-Trainer benchmark's command line: --steps or --quick, --pairs, and the hidden flags
    of its --hf-worker mode. Returns (args, steps); in worker mode steps is args.steps as given."""
    parser.add_argument(
        "--steps", type=int, default=None, help=f"optimizer steps per side (default {default})"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{quick} steps per side, one pair, a smoke test"
    )
    parser.add_argument("--pairs", type=int, help="pairs of runs, recipe then Trainer (default 3; --quick 1)")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-steps", type=int, default=warmup, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        return args, args.steps
    if args.steps is not None and args.quick:
        parser.error("give --steps or --quick, not both")
    steps = args.steps or (quick if args.quick else default)
    if steps < windows * warmup:
        parser.error(f"--steps must be at least {windows * warmup}: the first {warmup} are not timed")
    if args.pairs is None:
        args.pairs = 1 if args.quick else 3
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    return args, steps


def run_pairs(
    root: Path, count: int, script: str, steps: int, run_recipe, *recipe_args
) -> list[tuple[dict, dict]]:
    """`count` pairs of runs in root/pairN, each the recipe (`run_recipe(folder, steps, *recipe_args)`) then
    the Trainer (`script --hf-worker` on that run's config): one pair's ratio moves by +-10 % with this
    machine's load, so a benchmark reports the pair with the median ratio (median_pair) and every pair's."""
    pairs = []
    for i in range(count):
        run = root / f"pair{i}"
        run.mkdir()
        recipe = run_recipe(run / "recipe", steps, *recipe_args)
        pairs.append((recipe, run_hf_worker(script, run / "recipe", run / "trainer", steps)))
    return pairs


def median_pair(pairs: list[tuple[dict, dict]], rate) -> tuple[dict, dict, str]:
    """The pair whose ratio `rate(recipe) / rate(trainer)` is the median (the upper one of an even count),
    and a line: that ratio, then every pair's."""
    ratios = [rate(recipe) / rate(hf) for recipe, hf in pairs]
    i = sorted(range(len(pairs)), key=ratios.__getitem__)[len(pairs) // 2]
    each = ", ".join(f"{r:.2f}x" for r in ratios)
    note = f"the median of {len(pairs)} pairs, in run order: {each}" if len(pairs) > 1 else "one pair"
    return *pairs[i], f"{ratios[i]:.2f}x ({note})"


def run_hf_worker(
    script: str,
    recipe_dir: Path,
    out: Path,
    steps: int,
    *,
    nproc: int = 2,
    env: dict | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    """The benchmark's transformers.Trainer side (`script --hf-worker ...extra`) on `nproc` ranks; rank 0's
    result."""
    args = [script, "--hf-worker", f"--recipe-run={recipe_dir}", f"--out={out}", f"--steps={steps}", *extra]
    torchrun_ranks(args, out.parent / "trainer.log", nproc, env)
    return json.loads((out / HF_RESULT).read_text())


def trainer_device_args(precision: str) -> dict:
    """TrainingArguments for the device the recipe ran on, from its saved --precision: the GPU with nccl
    (bf16 autocast for bf16, or auto where the GPU has it), else the CPU with gloo."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = precision == "bf16" or (precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    return {"use_cpu": not cuda, "ddp_backend": "nccl" if cuda else "gloo", "bf16": bf16}


def step_clock(warmup_steps: int):
    """A TrainerCallback timing the steps after `warmup_steps` (start, end, last_step)."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start = self.end = None
            self.last_step = 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup_steps, state.max_steps) and torch.cuda.is_available():
                torch.cuda.synchronize()  # the clock starts and stops when the GPU has run the steps so far
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
    data = trainer.train_dataset
    if "input_ids" in getattr(data, "column_names", ()):  # token rows (not audio)
        # Real (unpadded) tokens per training row, for tokens/s and TFLOPS: the Trainer logs neither.
        result["tokens_per_row"] = sum(map(len, data["input_ids"])) / len(data)
    if torch.cuda.is_available():
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    (out / HF_RESULT).write_text(json.dumps(result))
