"""Training throughput of the backends: DDP vs DeepSpeed ZeRO 1, 2 and 3 on the same tiny BERT MLM+NSP run.

Each side is `torchrun --nproc_per_node=2 recipes/mlm_nsp.py` (gloo, fp32, one thread per rank) with the same
data, per-rank batch and step count, one after the other in this run; samples/s skips the first logging
window. Prints each backend's samples/s and its ratio to DDP. Usage:
    python bench/bench_deepspeed.py              # 100 steps each, about 3 minutes on 2 cores
    python bench/bench_deepspeed.py --steps 40   # a smoke test
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_trainer import WARMUP_STEPS, run_recipe

SIDES = {
    "ddp": ["--backend=ddp"],
    "zero1": ["--backend=deepspeed", "--zero-stage=1"],
    "zero2": ["--backend=deepspeed", "--zero-stage=2"],
    "zero3": ["--backend=deepspeed", "--zero-stage=3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per backend")
    args = parser.parse_args()
    if args.steps < 2 * WARMUP_STEPS:
        parser.error(f"--steps must be at least {2 * WARMUP_STEPS}: the first {WARMUP_STEPS} are not timed")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_deepspeed_") as tmp:
        for name, flags in SIDES.items():
            (Path(tmp) / name).mkdir()
            results[name] = run_recipe(Path(tmp) / name / "run", args.steps, flags)
    base = results["ddp"]["samples_per_s"]
    print(f"{args.steps} steps per backend, 2 ranks, fp32; samples/s after step {WARMUP_STEPS}")
    print(f"{'backend':<8} {'samples/s':>10} {'vs ddp':>7} {'final loss':>11}")
    for name, r in results.items():
        print(f"{name:<8} {r['samples_per_s']:>10.1f} {r['samples_per_s'] / base:>6.2f}x {r['loss']:>11.4f}")


if __name__ == "__main__":
    main()
