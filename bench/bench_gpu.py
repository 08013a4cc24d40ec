"""BERT-base on one GPU, one process: recipes vs transformers.Trainer, eager vs --compile, DDP vs ZeRO-2/3.

MLM+NSP pretraining (recipes/mlm_nsp.py) and sequence classification (recipes/text_classification.py), each
against `transformers.Trainer` on the same model sizes, tokenizer, rows, batch and precision, and with
`--compile true`; then mlm_nsp under DeepSpeed ZeRO-2 and ZeRO-3. Weights are random and the data synthetic:
every row is exactly --seq-len tokens, so nothing pads or recompiles. Prints one markdown table (samples/s,
tokens/s, TFLOPS, MFU, peak memory, ratio, elapsed); `bash bench/gpu.sh` runs it after checking for a GPU.
    python bench/bench_gpu.py              # BERT-base, sequence 128, bf16, batch 128 (one H100/H200)
    python bench/bench_gpu.py --dry-run    # the same runs and table on CPU: tiny BERT, bf16 autocast, a few steps
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch_two_ranks import REPO, run_hf_worker, steady_throughput, torchrun_ranks

sys.path.insert(0, str(REPO))  # launch.flops, for the Trainer side's TFLOPS and the device's peak


@dataclasses.dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq_len: int
    batch: int
    steps: int
    warmup: int  # steps before the timed windows; also the logging window, so it divides steps
    precision: str


BERT_BASE = Sizes(768, 12, 12, 3072, 30522, seq_len=128, batch=128, steps=120, warmup=20, precision="bf16")
TINY = Sizes(32, 2, 2, 64, 1000, seq_len=32, batch=8, steps=12, warmup=4, precision="bf16")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOPICS = ["world", "sports", "business", "science"]
MLM_PROBABILITY = 0.15  # the recipe's default: its MLM head runs on these positions only

# (benchmark, run, task, extra recipe flags); "trainer" rows run transformers.Trainer on the eager run's
# config and processor, "same" repeats a row measured above.
ROWS = [
    ("MLM+NSP", "recipe", "mlm", []),
    ("MLM+NSP", "recipe --compile", "mlm", ["--compile=true"]),
    ("MLM+NSP", "transformers.Trainer", "mlm", "trainer"),
    ("classification", "recipe", "cls", []),
    ("classification", "recipe --compile", "cls", ["--compile=true"]),
    ("classification", "transformers.Trainer", "cls", "trainer"),
    ("MLM+NSP", "recipe --precision bf16-pure", "mlm", ["--precision=bf16-pure"]),
    ("MLM+NSP", "recipe bf16-pure --compile", "mlm", ["--precision=bf16-pure", "--compile=true"]),
    ("classification", "recipe --precision bf16-pure", "cls", ["--precision=bf16-pure"]),
    ("MLM+NSP backends", "ddp", "mlm", "same"),
    ("MLM+NSP backends", "DeepSpeed ZeRO-2", "mlm", ["--backend=deepspeed", "--zero-stage=2"]),
    ("MLM+NSP backends", "DeepSpeed ZeRO-3", "mlm", ["--backend=deepspeed", "--zero-stage=3"]),
]
TRAINER_WORKERS = {"mlm": "bench/bench_trainer.py", "cls": "bench/bench_finetune.py"}
# The order rows run in: each recipe and its Trainer first (the README's targets), then --compile (minutes of
# compilation), bf16-pure and ZeRO, so a benchmark stopped by its time limit has lost the extras, not the
# comparison.
RUN_ORDER = sorted(range(len(ROWS)), key=lambda i: isinstance(ROWS[i][3], list) and bool(ROWS[i][3]))


def synthetic_words(n: int) -> list[str]:
    """n distinct lowercase words of 4 letters: each is one whole token of the vocabulary below."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(w) for w in itertools.islice(itertools.product(letters, repeat=4), n)]


def write_inputs(folder: Path, s: Sizes) -> dict[str, Path]:
    """A WordPiece tokenizer of `s.vocab` whole words, a random BERT of `s`'s sizes saved with it (the
    classifier's pretrained model), an NSP corpus and a classification CSV whose rows all fill seq_len."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = synthetic_words(s.vocab - len(SPECIALS))
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + words) + "\n")
    model_dir = folder / "bert"
    BertTokenizer(vocab=str(folder / "vocab.txt"), model_max_length=s.seq_len).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.ffn,
        max_position_embeddings=max(512, s.seq_len),
    )
    BertModel(config).save_pretrained(model_dir)

    rng = random.Random(0)

    def sentence() -> str:  # longer than seq_len, so truncation makes every row exactly seq_len tokens
        return " ".join(rng.choices(words, k=s.seq_len))

    # 2 x batch documents of 4 sentences: 3 pairs each, times the recipe's 5 NSP copies = 30 full batches.
    docs = ["\n".join(sentence() for _ in range(4)) for _ in range(2 * s.batch)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    table = folder / "train.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["title", "topic"])
        writer.writerows([sentence(), rng.choice(TOPICS)] for _ in range(16 * s.batch))  # 16 full batches
    return {"model": model_dir, "corpus": corpus, "table": table}


def recipe_command(task: str, s: Sizes, inputs: dict[str, Path], out: Path, extra: list[str]) -> list[str]:
    common = [
        f"--output-dir={out}",
        f"--max-steps={s.steps}",
        f"--batch-size={s.batch}",
        f"--log-every={s.warmup}",
        f"--max-length={s.seq_len}",
        f"--precision={s.precision}",
        "--eval-every=0",
        "--tracker=none",
        "--num-workers=0",
        "--export=false",  # the Trainer rows read the run's config and processor; nothing reads an export
    ]
    if task == "mlm":
        sizes = [f"--hidden-size={s.hidden}", f"--num-layers={s.layers}", f"--num-heads={s.heads}"]
        data = [f"--train-files={inputs['corpus']}", "--eval-fraction=0", f"--tokenizer={inputs['model']}"]
        sizes += [f"--intermediate-size={s.ffn}", f"--mlm-probability={MLM_PROBABILITY}"]
        return ["recipes/mlm_nsp.py", *common, *data, *sizes, *extra]
    data = [f"--train-file={inputs['table']}", "--validation-file=", "--test-file="]
    data += ["--text-columns=title", "--label-columns=topic", f"--model={inputs['model']}"]
    return ["recipes/text_classification.py", *common, *data, *extra]


def trainer_tflops(task: str, s: Sizes, result: dict) -> float:
    """The Trainer's model TFLOPS, counted as the recipe counts its own (launch/flops.py): the same FLOPs
    per real token, so the two sides' TFLOPS ratio is their samples/s ratio."""
    from transformers import BertConfig

    from recipebox.launch.flops import train_flops_per_token

    config = BertConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.ffn,
    )
    head = MLM_PROBABILITY if task == "mlm" else 0.0
    per_token = train_flops_per_token(config, seq_len=s.seq_len, head_fraction=head)
    return per_token * result["tokens_per_s"] / 1e12


def run_rows(s: Sizes, inputs: dict[str, Path], work: Path, env: dict, results: dict[int, dict]) -> None:
    """Fills `results` row by row in RUN_ORDER, so a run stopped part-way still has the finished rows."""
    eager = {task: i for i, (_, run, task, extra) in enumerate(ROWS) if run == "recipe"}
    for i in RUN_ORDER:
        bench, run, task, extra = ROWS[i]
        if extra == "same":
            results[i] = {**results[eager[task]], "elapsed": None}
            continue
        out = work / f"row{i}"
        out.mkdir()
        start = time.perf_counter()
        try:
            if extra == "trainer":
                recipe_dir = work / f"row{eager[task]}" / "run"
                if "error" in results[eager[task]]:
                    raise SystemExit(
                        "error: needs the recipe row's run (its config and tokenizer), which failed"
                    )
                worker_args = (f"--warmup-steps={s.warmup}",)
                worker = TRAINER_WORKERS[task]
                result = run_hf_worker(
                    worker, recipe_dir, out / "trainer", s.steps, nproc=1, env=env, extra=worker_args
                )
                result["tokens_per_s"] = result["samples_per_s"] * result["tokens_per_row"]
                result["tflops"] = trainer_tflops(task, s, result)
            else:
                torchrun_ranks(
                    recipe_command(task, s, inputs, out / "run", extra), out / "recipe.log", 1, env
                )
                result = steady_throughput(out / "run", s.warmup)
        except SystemExit as err:  # a failed row is reported; the others still run
            result = {"error": str(err)}
        result["elapsed"] = time.perf_counter() - start
        results[i] = result
        state = "failed" if "error" in result else f"{result['samples_per_s']:.1f} samples/s"
        print(f"{bench} / {run}: {state}, {result['elapsed']:.0f} s", file=sys.stderr, flush=True)


def stop_on_sigterm(*_) -> None:
    raise KeyboardInterrupt  # a time limit's SIGTERM: the row's subprocess is killed, the table still prints


def gpu_name() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        sys.exit("error: no GPU found (nvidia-smi is missing or failed); --dry-run runs the benchmark on CPU")
    return done.stdout.splitlines()[0].strip()


def number(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table(s: Sizes, results: dict[int, dict], peak: float | None) -> list[str]:
    lines = [
        "| benchmark | run | samples/s | tokens/s | TFLOPS | MFU | peak mem (GB) | ratio | vs | elapsed (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    trainer = {task: results[i] for i, (_, _, task, extra) in enumerate(ROWS) if extra == "trainer"}
    ddp = next(results[i] for i, (_, _, _, extra) in enumerate(ROWS) if extra == "same")
    for i, (bench, run, task, _) in enumerate(ROWS):
        r = results[i]
        elapsed = "(MLM+NSP recipe)" if r["elapsed"] is None else f"{r['elapsed']:.0f}"
        if "error" in r:
            state = "not run" if r.get("stopped") else "failed"
            lines.append(f"| {bench} | {run} | {state} | | | | | | | {elapsed} |")
            continue
        base, versus = (ddp, "ddp") if bench.endswith("backends") else (trainer[task], "Trainer")
        ratio = None if "error" in base else r["samples_per_s"] / base["samples_per_s"]
        tflops = r.get("tflops")
        mfu = None if peak is None or tflops is None else tflops / peak
        cells = [
            number(r["samples_per_s"], ".1f"),
            number(r.get("tokens_per_s"), ",.0f"),
            number(tflops, ".2f" if tflops and tflops >= 1 else ".4f"),
            number(mfu, ".1%"),
            number(r.get("peak_mem_gb"), ".2f"),
            number(ratio, ".2f"),
            versus,
        ]
        lines.append(f"| {bench} | {run} | {' | '.join(cells)} | {elapsed} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny BERT on CPU, bf16, a few steps")
    parser.add_argument("--steps", type=int, help="optimizer steps per row (default 120; dry run 12)")
    parser.add_argument("--batch-size", type=int, help="rows per step (default 128; dry run 8)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's dense peak for MFU (default: launch/flops.py)",
    )
    args = parser.parse_args()
    s = TINY if args.dry_run else BERT_BASE
    s = dataclasses.replace(s, steps=args.steps or s.steps, batch=args.batch_size or s.batch)
    if s.steps < 3 * s.warmup or s.steps % s.warmup:
        parser.error(f"--steps must be a multiple of {s.warmup} and at least {3 * s.warmup}")

    from recipebox.launch.flops import device_peak_tflops

    # The dry run hides any GPU, so it measures the CPU path wherever it runs; DeepSpeed, told so, does not
    # warn about having found none (here too: transformers imports it when saving the model).
    env = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"} if args.dry_run else {}
    os.environ.update(env)
    device = "CPU (dry run)" if args.dry_run else gpu_name()
    peak = args.peak_tflops or (None if args.dry_run else device_peak_tflops(device, s.precision))

    started = time.perf_counter()
    results: dict[int, dict] = {}
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        try:
            inputs = write_inputs(Path(tmp) / "inputs", s)
            run_rows(s, inputs, Path(tmp), env, results)
        except KeyboardInterrupt:
            stopped = f"stopped after {time.perf_counter() - started:.0f} s, before this row finished"
            print(f"error: {stopped.replace('this row', 'every row')}", file=sys.stderr)
            for i in range(len(ROWS)):
                results.setdefault(i, {"error": stopped, "elapsed": 0.0, "stopped": True})
    print(
        f"{device}; BERT hidden {s.hidden}, {s.layers} layers, {s.heads} heads, ffn {s.ffn}, vocab {s.vocab}, "
        f"random weights; sequence {s.seq_len}, batch {s.batch}, {s.precision}, one process; {s.steps} steps "
        f"per row, rates over steps {s.warmup + 1}-{s.steps}\n"
    )
    print("\n".join(table(s, results, peak)))
    notes = [
        "ratio: samples/s over the Trainer's on the same task, or over ddp for the backends",
        "TFLOPS: model FLOPs per real token (launch/flops.py; MLM+NSP counts the MLM head on the 15 % masked "
        "positions, as the recipe runs it) times tokens/s, per device; the same count for the Trainer",
        (
            f"MFU: TFLOPS / {peak} peak TFLOPS ({'--peak-tflops' if args.peak_tflops else device})"
            if peak
            else "MFU: n/a, no known peak TFLOPS for this device (give --peak-tflops)"
        ),
        "peak mem: torch.cuda.max_memory_allocated over the run (the recipe logs it as train/peak_mem_gb); "
        "n/a on CPU",
        "elapsed: the whole process, start-up, data, compilation and final checkpoint included (no export: "
        "--export=false)",
    ]
    print("\n" + "\n".join(f"- {n}" for n in notes))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    failed = [(ROWS[i][:2], r["error"]) for i, r in results.items() if "error" in r and not r.get("stopped")]
    for (bench, run), error in failed:
        print(f"\n{bench} / {run} failed:\n{error}", file=sys.stderr)
    sys.exit(1 if any("error" in r for r in results.values()) else 0)


if __name__ == "__main__":
    main()
