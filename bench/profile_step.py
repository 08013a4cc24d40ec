"""Where a training step's time goes: torch.profiler over a few steps of a recipe at BERT-base sizes, one GPU.

The recipe's own task, backend and loop in this process (one rank, as `run_recipe` builds them), on
bench/bench_gpu.py's random BERT and synthetic full rows. After warm-up steps it times steps without the
profiler, then profiles as many, and prints:
- wall time per step (unprofiled: the profiler's own host cost would inflate it) and the device's busy time
  per step (the union of its kernels' intervals): what is left is the device waiting for the host;
- kernel launches per step, and device time by kind (matmul, attention, copies, everything else) and by the
  kernels that take the most.
    python bench/profile_step.py                  # MLM+NSP, BERT-base, sequence 128, batch 128, bf16
    python bench/profile_step.py --task cls       # sequence classification fine-tuning
    python bench/profile_step.py --compile        # the blocks compiled (minutes of compilation first)
    python bench/profile_step.py --precision bf16-pure   # a bf16 twin of the model, fp32 masters
    python bench/profile_step.py --dry-run        # tiny BERT on CPU: the same tables over CPU ops
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench_gpu import BERT_BASE, REPO, TINY, gpu_name, recipe_command, write_inputs

# Kernel kinds by name, the first that matches: SDPA's flash and memory-efficient kernels (the latter built
# with CUTLASS, hence before matmul), cuBLAS / cuBLASLt / CUTLASS matmuls, copies.
KINDS = [
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "cublas", "nvjet")),
    ("copies", ("memcpy", "memset")),
]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, marks in KINDS if any(m in low for m in marks)), "other")


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (the device's busy time, overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def build_trainer(task: str, s, extra: list[str], work: Path, device):
    """The recipe's trainer as `run_recipe` makes it (one rank, no tracker), on bench_gpu's inputs."""
    import torch

    from recipebox.launch.backends import backend_settings, make_backend
    from recipebox.launch.config import TrainConfig, parse_config
    from recipebox.launch.loop import Trainer
    from recipebox.launch.runtime import Runtime

    inputs = write_inputs(work / "inputs", s)
    script, *argv = recipe_command(task, s, inputs, work / "run", extra)
    recipe = importlib.import_module(f"recipes.{Path(script).stem}")
    config_class = next(v for k, v in vars(recipe).items() if k.endswith("Config") and v is not TrainConfig)
    cfg = parse_config(config_class, argv)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rt = Runtime(device=device)
    run_dir = work / "run"
    run_dir.mkdir()
    built = recipe._build(cfg, rt, run_dir)
    backend = make_backend(cfg.backend, rt, backend_settings(cfg, built.max_length))
    return Trainer(cfg, rt, backend, built)


def rows_by(events, key, steps: int, busy_us: float, top: int | None = None) -> list[str]:
    """Markdown rows: per group of `key`, device ms per step, share of the busy time, launches per step."""
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        g = groups[key(e)]
        g[0], g[1] = g[0] + e.time_range.elapsed_us(), g[1] + 1
    ordered = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [
        f"| {name[:90]} | {us / steps / 1e3:.3f} | {us / busy_us:.1%} | {n / steps:.1f} |"
        for name, (us, n) in ordered
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["mlm", "cls"], default="mlm", help="MLM+NSP or classification")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (--compile=true)")
    parser.add_argument("--precision", default="", help="the recipe's --precision (default: bf16)")
    parser.add_argument("--steps", type=int, default=0, help="steps timed, then profiled (default 10; dry 3)")
    parser.add_argument("--warmup", type=int, default=0, help="steps before them (default 10; dry run 2)")
    parser.add_argument("--batch-size", type=int, default=0, help="rows per step (default 128; dry run 8)")
    parser.add_argument("--top", type=int, default=15, help="kernels (or CPU ops) listed by time")
    parser.add_argument("--dry-run", action="store_true", help="tiny BERT on CPU, bf16 autocast")
    args = parser.parse_args()
    s = TINY if args.dry_run else BERT_BASE
    s = dataclasses.replace(s, batch=args.batch_size or s.batch)
    precision = args.precision or s.precision
    steps, warmup = args.steps or (3 if args.dry_run else 10), args.warmup or (2 if args.dry_run else 10)
    if args.dry_run:  # the CPU path wherever it runs; DeepSpeed (imported by transformers) told so too
        os.environ.update({"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})
    os.environ.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    sys.path.insert(0, str(REPO))  # recipes.*
    where = "CPU (dry run)" if args.dry_run else gpu_name()

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        sys.exit(
            f"error: {where} found, but torch {torch.__version__} sees no CUDA device; --dry-run runs on CPU"
        )
    device = torch.device("cuda:0" if cuda else "cpu")

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        extra = (["--compile=true"] if args.compile else []) + [f"--precision={precision}"]
        trainer = build_trainer(args.task, s, extra, Path(tmp), device)
        for _ in range(warmup):
            trainer.train_step()
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        synchronize()
        wall_ms = (time.perf_counter() - start) / steps * 1e3
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.train_step()
            synchronize()
        trainer.backend.close()

    task = {"mlm": "MLM+NSP (recipes/mlm_nsp.py)", "cls": "classification (recipes/text_classification.py)"}
    print(
        f"{where}; {task[args.task]}{' --compile' if args.compile else ''}; BERT hidden {s.hidden}, "
        f"{s.layers} layers, heads {s.heads}, ffn {s.ffn}, vocab {s.vocab}; sequence {s.seq_len}, batch "
        f"{s.batch}, {precision}, one process; {warmup} warm-up steps, then {steps} timed and {steps} profiled"
    )
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        if not kernels:
            sys.exit(
                f"error: step {wall_ms:.2f} ms wall, but the profiler recorded no device kernel: torch's CUDA "
                "profiling (CUPTI) is unavailable in this environment"
            )
        busy = union_us([(e.time_range.start, e.time_range.end) for e in kernels])
        busy_ms = busy / steps / 1e3
        print(
            f"step: {wall_ms:.2f} ms wall (unprofiled); device busy {busy_ms:.2f} ms of it "
            f"({busy_ms / wall_ms:.1%}); {len(kernels) / steps:,.0f} kernel launches per step\n"
        )
        header = "| {} | device ms/step | share of busy | launches/step |\n|---|---:|---:|---:|"
        print(header.format("kind"))
        print("\n".join(rows_by(kernels, lambda e: kind(e.name), steps, busy)))
        print("\n" + header.format(f"top {args.top} kernels"))
        print("\n".join(rows_by(kernels, lambda e: e.name, steps, busy, args.top)))
    else:
        ops = [e for e in events if e.name.startswith("aten::") and not _under_aten(e)]
        busy = sum(e.time_range.elapsed_us() for e in ops)
        print(
            f"step: {wall_ms:.2f} ms wall (unprofiled); {len(ops) / steps:,.0f} top-level aten ops per step "
            f"(no device: the tables are CPU time, ops counted where they were called)\n"
        )
        print(f"| top {args.top} aten ops | CPU ms/step | share of ops | calls/step |\n|---|---:|---:|---:|")
        print("\n".join(rows_by(ops, lambda e: e.name, steps, busy, args.top)))


def _under_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


if __name__ == "__main__":
    main()
