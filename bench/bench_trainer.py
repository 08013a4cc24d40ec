"""Training throughput: recipes/mlm_nsp.py vs transformers.Trainer on the same tiny BERT MLM+NSP pretraining.

Both run under `torchrun --nproc_per_node=2` (gloo, fp32, OMP_NUM_THREADS=1) on the same tokenizer, NSP pairs,
per-rank batch, max length and step count; steady-state samples/s skips the first logging window. Usage:
    python bench/bench_trainer.py                  # 3 pairs of 200-step runs, about 6 minutes
    python bench/bench_trainer.py --quick          # 1 pair of 40-step runs, smoke test
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from launch_two_ranks import (
    comparison_args,
    median_pair,
    run_pairs,
    steady_throughput,
    step_clock,
    torchrun_two_ranks,
    trainer_device_args,
    write_trainer_result,
)

WARMUP_STEPS = 10  # one logging window: first steps pay for allocator growth and lazy init


def run_recipe(out: Path, steps: int, data_args: list[str]) -> dict:
    torchrun_two_ranks(
        [
            "recipes/mlm_nsp.py",
            f"--output-dir={out}",
            f"--max-steps={steps}",
            "--eval-every=0",
            f"--log-every={WARMUP_STEPS}",
            "--tracker=none",
            "--eval-fraction=0",
            "--precision=fp32",
            "--num-workers=0",
            *data_args,
        ],
        out.parent / "recipe.log",
    )
    return steady_throughput(out, WARMUP_STEPS)


def _build_dataset(cfg: dict, tok, out: Path):
    """The recipe's training pairs, rebuilt from its saved config with the same builders and seed."""
    from recipebox.data.nsp import build_nsp_pairs, split_documents, tokenize_pairs
    from recipebox.data.text import read_documents

    files = [f.strip() for f in cfg["train_files"].split(",") if f.strip()]
    documents = read_documents(files, documents=cfg["documents"], cache_dir=str(out / "cache" / "text"))
    train_docs, _ = split_documents(documents, cfg["eval_fraction"], cfg["seed"])
    pairs = build_nsp_pairs(train_docs, cfg["seed"], source=", ".join(files), copies=cfg["nsp_copies"])
    train = tokenize_pairs(pairs, tok, cfg["max_length"], out / "cache" / "tokenised")
    return train.remove_columns("length")


def hf_worker(recipe_dir: Path, out: Path, steps: int, warmup_steps: int = WARMUP_STEPS) -> None:
    """One rank of the transformers.Trainer side; rank 0 writes samples/s and the last loss to `out`."""
    from transformers import (
        BertConfig,
        BertForPreTraining,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from recipebox.data.tokenizer import load_tokenizer
    from recipebox.launch.config import load_yaml

    # The recipe's saved config, not our own defaults, so a change to the recipe cannot skew the comparison.
    cfg = load_yaml(recipe_dir / "config.yaml")
    tok = load_tokenizer(str(recipe_dir / "processor"))
    args = TrainingArguments(
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
        # Full batches only, so samples = per-rank batch x world x steps holds exactly.
        dataloader_drop_last=True,
        **trainer_device_args(cfg["precision"]),
        # Every parameter gets a gradient; the default (True) adds a graph walk per step the recipe's DDP
        # does not do, which would measure a DDP setting rather than the loop.
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        seed=cfg["seed"],
    )
    with args.main_process_first(desc="build NSP pairs"):
        train = _build_dataset(cfg, tok, out)
    model = BertForPreTraining(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_layers"],
            num_attention_heads=cfg["num_heads"],
            intermediate_size=cfg["intermediate_size"],
            hidden_dropout_prob=cfg["dropout"],
            attention_probs_dropout_prob=cfg["dropout"],
            max_position_embeddings=max(512, cfg["max_length"]),
            pad_token_id=tok.pad_token_id,
        )
    )
    # BertForPreTraining takes **kwargs but ignores num_items_in_batch, so the Trainer's token averaging
    # across ranks would all-gather label counts every step and report (and backpropagate) world_size x loss.
    model.accepts_loss_kwargs = False

    clock = step_clock(warmup_steps)
    collator = DataCollatorForLanguageModeling(
        tok, mlm_probability=cfg["mlm_probability"], pad_to_multiple_of=cfg["pad_to_multiple_of"]
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[clock])
    trainer.train()
    write_trainer_result(trainer, clock, warmup_steps, out, pairs=len(train))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-files", help="text files for both sides (default: the recipe's toy corpus)")
    parser.add_argument(
        "--documents", choices=("blank_line", "line"), help="how the files split into documents"
    )
    args, steps = comparison_args(parser, default=200, quick=40, warmup=WARMUP_STEPS)
    if args.hf_worker:
        hf_worker(args.recipe_run, args.out, steps, args.warmup_steps)
        return
    data_args = []
    if args.train_files:  # the runs start in the repository root, so relative paths are made absolute
        files = ",".join(str(Path(f.strip()).resolve()) for f in args.train_files.split(",") if f.strip())
        data_args.append(f"--train-files={files}")
    data_args += [f"--documents={args.documents}"] if args.documents else []

    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        pairs = run_pairs(Path(tmp), args.pairs, "bench/bench_trainer.py", steps, run_recipe, data_args)
    recipe, hf, ratio = median_pair(pairs, lambda r: r["samples_per_s"])

    print(
        f"{hf['pairs']} NSP pairs, {steps} steps x {hf['batch_size']} per rank x {hf['world_size']} ranks, fp32, "
        f"{hf['torch_threads']} thread(s) per rank; samples/s after step {WARMUP_STEPS}"
    )
    print(f"{'':<22} {'samples/s':>10} {'final loss':>11}")
    print(f"{'recipebox mlm_nsp':<22} {recipe['samples_per_s']:>10.1f} {recipe['loss']:>11.4f}")
    print(f"{'transformers.Trainer':<22} {hf['samples_per_s']:>10.1f} {hf['loss']:>11.4f}")
    print(f"ratio recipebox/Trainer: {ratio}")


if __name__ == "__main__":
    main()
