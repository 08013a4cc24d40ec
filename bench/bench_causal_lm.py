"""Causal LM training throughput: recipes/causal_lm.py vs transformers.Trainer, a small GPT-2 on the toy corpus.

Both run under `torchrun --nproc_per_node=2` (gloo, fp32, OMP_NUM_THREADS=1) with the same model (the
GPT-2 config and byte-level BPE of the recipe's run: RUN/model_config and RUN/processor), the same packed
blocks (data.lm.tokenize_corpus over all the training documents: the recipe runs with --eval-fraction 0, so
nothing is held out and no evaluation happens), labels = input_ids, and the same per-rank batch, learning
rate, warmup, weight decay, clipping and step count. tokens/s counts the steps after step 5 (one logging
window) and is total tokens over total time: the recipe's logging windows weighted by their duration, the
Trainer's a step clock around the same steps. Usage:
    python bench/bench_causal_lm.py                 # 3 pairs of 60-step runs, about 9 minutes
    python bench/bench_causal_lm.py --quick         # 1 pair of 15-step runs, smoke test
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from launch_two_ranks import (
    WARMUP_STEPS,
    comparison_args,
    median_pair,
    run_pairs,
    step_clock,
    timed_throughput,
    torchrun_two_ranks,
    write_trainer_result,
)


def run_recipe(out: Path, steps: int, batch_size: int) -> dict:
    torchrun_two_ranks(
        ["recipes/causal_lm.py", f"--output-dir={out}", f"--max-steps={steps}", f"--batch-size={batch_size}",
         f"--log-every={WARMUP_STEPS}", "--tracker=none", "--precision=fp32", "--eval-every=0",
         "--validation-files=", "--eval-fraction=0"],
        out.parent / "recipe.log",
    )  # fmt: skip
    return timed_throughput(out, WARMUP_STEPS, "tokens_per_s")


def training_documents(cfg: dict) -> list[str]:
    """The documents the recipe trained on: its corpus less the --eval-fraction it held out (the same
    seeded shuffle as recipes/causal_lm.py's _setup_data), or all of it with --validation-files."""
    from recipebox.data.lm import read_corpus

    files = [f.strip() for f in cfg["train_files"].split(",") if f.strip()]
    docs = read_corpus(files, documents=cfg["documents"], text_key=cfg["text_key"], split=cfg["train_split"],
                       dataset_config=cfg["dataset_config"])  # fmt: skip
    if cfg["validation_files"]:
        return docs
    order = list(range(len(docs)))
    random.Random(cfg["seed"]).shuffle(order)
    held = set(order[: round(len(docs) * cfg["eval_fraction"])])
    return [d for i, d in enumerate(docs) if i not in held]


def hf_worker(recipe_dir: Path, out: Path, steps: int) -> None:
    """One rank of the transformers.Trainer side; rank 0 writes samples/s and the last loss to `out`."""
    import datasets
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

    from recipebox.data.lm import tokenize_corpus
    from recipebox.data.tokenizer import load_tokenizer
    from recipebox.launch.config import load_yaml

    # The recipe's saved config, tokenizer and model config, so a change to the recipe cannot skew the
    # comparison.
    cfg = load_yaml(recipe_dir / "config.yaml")
    if cfg["packing"] != "blocks":
        raise SystemExit("error: this benchmark compares packed blocks; the recipe ran with --packing none")
    tok = load_tokenizer(str(recipe_dir / "processor"))
    docs = training_documents(cfg)
    train, info = tokenize_corpus(docs, tok, cfg["block_size"])
    # The recipe's own packed training blocks are in its tokenisation cache: check they are these.
    cached = [datasets.Dataset.from_file(str(p)) for p in (recipe_dir / "cache").rglob("lm-blocks-*.arrow")]
    ids = train["input_ids"][:]
    if not any(len(c) == len(train) and c["input_ids"][:] == ids for c in cached):
        raise SystemExit(f"error: the {len(train)} packed blocks differ from the recipe run's {recipe_dir}")
    # All-ones attention mask, as transformers' run_clm.py packs it (and as the recipe's collate adds it).
    train = train.add_column("attention_mask", [[1] * cfg["block_size"]] * len(train))
    config = GPT2Config.from_pretrained(recipe_dir / "model_config")
    assert config.vocab_size == len(tok), "the model config does not match the recipe's tokenizer"
    set_seed(cfg["seed"])  # the seed of the recipe's rank 0, whose initial weights DDP broadcasts
    model = GPT2LMHeadModel(config)

    args = TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=cfg["batch_size"], max_steps=steps,
        learning_rate=cfg["lr"], weight_decay=cfg["weight_decay"], warmup_steps=int(cfg["warmup_ratio"] * steps),
        max_grad_norm=cfg["max_grad_norm"], logging_steps=WARMUP_STEPS, save_strategy="no", report_to=[],
        dataloader_num_workers=0, dataloader_drop_last=True,  # full batches: tokens = batch x world x block
        use_cpu=True, ddp_backend="gloo", ddp_find_unused_parameters=False, disable_tqdm=True, seed=cfg["seed"],
    )  # fmt: skip
    clock = step_clock(WARMUP_STEPS)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[clock])  # default_data_collator
    trainer.train()
    write_trainer_result(
        trainer, clock, WARMUP_STEPS, out, block_size=cfg["block_size"], blocks=len(train),
        documents=info["documents"], vocab=config.vocab_size,
        model=f"n_embd {config.n_embd}, {config.n_layer} layers, {config.n_head} heads",
        params=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="per rank (the recipe's default)")
    args, steps = comparison_args(parser, default=60, quick=15, warmup=WARMUP_STEPS, windows=3)
    if args.hf_worker:
        hf_worker(args.recipe_run, args.out, steps)
        return

    with tempfile.TemporaryDirectory(prefix="bench_causal_lm_") as tmp:
        script = "bench/bench_causal_lm.py"
        pairs = run_pairs(Path(tmp), args.pairs, script, steps, run_recipe, args.batch_size)
    for _, hf in pairs:  # the Trainer logs no tokens/s; its rows are all full blocks
        hf["tokens_per_s"] = hf["samples_per_s"] * hf["block_size"]
    recipe, hf, ratio = median_pair(pairs, lambda r: r["tokens_per_s"])

    print(
        f"GPT-2 ({hf['model']}, vocab {hf['vocab']}, {hf['params'] / 1e6:.2f}M parameters), toy corpus: "
        f"{hf['documents']} documents in {hf['blocks']} blocks of {hf['block_size']} tokens; {steps} steps x "
        f"{hf['batch_size']} per rank x {hf['world_size']} ranks, fp32, {hf['torch_threads']} thread(s) per "
        f"rank; tokens/s after step {WARMUP_STEPS}"
    )
    print(f"{'':<28} {'tokens/s':>10} {'final loss':>11}")
    print(f"{'recipebox causal_lm':<28} {recipe['tokens_per_s']:>10.0f} {recipe['loss']:>11.4f}")
    print(f"{'transformers.Trainer':<28} {hf['tokens_per_s']:>10.0f} {hf['loss']:>11.4f}")
    print(f"ratio recipebox/Trainer: {ratio}")
    print(
        "final loss: mean per token over the last logging window; the two sides shuffle the blocks differently"
    )


if __name__ == "__main__":
    main()
