"""Speech recognition: recipes/asr_ctc.py vs transformers.Trainer training the same small wav2vec2 on the toy set.

Both sides run under `torchrun --nproc_per_node=2` (gloo, fp32, OMP_NUM_THREADS=1) with the same model and
data: the recipe as a user runs it (its defaults: the wav2vec2 of recipes.asr_ctc._setup_model, a character
vocabulary from the training transcripts; --validation-manifest "" --test-manifest "", so no evaluation
happens), then the Trainer on the wav2vec2 that _setup_model builds from the recipe run's saved config, with
the run's own saved processor, the same clips read and normalised the same way (recipes.asr_ctc.AudioRows),
batches padded as the recipe pads them (kernels.collate_padded: audio with 0, labels with -100, attention
masks), grouped by audio length, the model's own CTC loss (reduction "mean", as the Hugging Face speech
examples train), and the same per-rank batch, learning rate, warmup, weight decay, clipping, seed and step
count. samples/s counts the steps after step 5 (one logging window) and is total samples over total time;
audio seconds/s is samples/s times the training set's mean clip length (both sides draw from the same 600
clips; length grouping makes any window's mix differ a little).
Usage:
    python bench/bench_asr.py                 # 3 pairs of 60-step runs, about 6 minutes
    python bench/bench_asr.py --quick         # 1 pair of 12-step runs, smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from launch_two_ranks import (
    REPO,
    WARMUP_STEPS,
    comparison_args,
    median_pair,
    run_pairs,
    saved_config,
    step_clock,
    timed_throughput,
    torchrun_two_ranks,
    write_trainer_result,
)

sys.path.insert(0, str(REPO))  # recipes/ is not an installed package


def run_recipe(out: Path, steps: int) -> dict:
    torchrun_two_ranks(
        ["recipes/asr_ctc.py", f"--output-dir={out}", f"--max-steps={steps}", "--validation-manifest=",
         "--test-manifest=", "--tracker=none", f"--log-every={WARMUP_STEPS}", "--precision=fp32"],
        out.parent / "recipe.log",
    )  # fmt: skip
    return timed_throughput(out, WARMUP_STEPS)


def hf_worker(recipe_dir: Path, out: Path, steps: int) -> None:
    """One rank of the Trainer side; rank 0 writes samples/s and the last loss to `out`."""
    import functools

    from transformers import Trainer, TrainingArguments, Wav2Vec2Processor, set_seed

    from recipebox.data.speech import normalize_transcript, read_manifest
    from recipebox.kernels.collate import collate_padded
    from recipes.asr_ctc import FRAMES_PER_SECOND, ASRConfig, AudioRows, _setup_model

    cfg = saved_config(recipe_dir, ASRConfig)
    if cfg.model:
        raise SystemExit(
            "error: this benchmark compares a wav2vec2 built from scratch; the recipe ran with --model"
        )
    processor = Wav2Vec2Processor.from_pretrained(recipe_dir / "processor")
    utts = read_manifest(cfg.train_manifest, cfg.audio_column, cfg.text_column)
    texts = [normalize_transcript(u.text, cfg.chars_to_ignore) for u in utts]
    set_seed(cfg.seed)  # the seed of the recipe's rank 0, whose initial weights DDP broadcasts
    model = _setup_model(cfg, processor, int(min(u.seconds for u in utts) * FRAMES_PER_SECOND))
    model.config.ctc_loss_reduction = "mean"

    class Rows(AudioRows):  # the recipe's rows less its metadata (the row index the Trainer would pass on)
        def __getitem__(self, i):
            row = super().__getitem__(i)
            del row["_ref"]
            return row

    train = Rows(utts, texts, processor, 0)
    collate = functools.partial(collate_padded, pad_id=processor.tokenizer.pad_token_id)
    # Length-grouped batches, as the recipe's sampler; full batches only, so samples = batch x world x steps.
    # average_tokens_across_devices off: Wav2Vec2ForCTC's forward takes **kwargs but ignores
    # num_items_in_batch (its CTC loss is a plain mean), so the Trainer's default would multiply its loss and
    # gradients by the world size.
    args = TrainingArguments(
        train_sampling_strategy="group_by_length", dataloader_drop_last=True,
        average_tokens_across_devices=False,
        output_dir=str(out / "run"), per_device_train_batch_size=cfg.batch_size, max_steps=steps,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=int(cfg.warmup_ratio * steps),
        max_grad_norm=cfg.max_grad_norm, logging_steps=WARMUP_STEPS, save_strategy="no", report_to=[],
        dataloader_num_workers=0, use_cpu=True, ddp_backend="gloo", ddp_find_unused_parameters=False,
        disable_tqdm=True, seed=cfg.seed, remove_unused_columns=False,
    )  # fmt: skip
    clock = step_clock(WARMUP_STEPS)
    # processing_class names input_values as the model input: the sampler groups by its length.
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, processing_class=processor,
                      callbacks=[clock])  # fmt: skip
    trainer.train()
    c = model.config
    write_trainer_result(
        trainer, clock, WARMUP_STEPS, out, clips=len(train), seconds=sum(u.seconds for u in utts) / len(utts),
        model=f"{len(c.conv_dim)} conv layers of {c.conv_dim[0]}, hidden {c.hidden_size}, "
        f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads, ffn {c.intermediate_size}",
        params=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, steps = comparison_args(parser, default=60, quick=12, warmup=WARMUP_STEPS)
    if args.hf_worker:
        hf_worker(args.recipe_run, args.out, steps)
        return

    with tempfile.TemporaryDirectory(prefix="bench_asr_") as tmp:
        pairs = run_pairs(Path(tmp), args.pairs, "bench/bench_asr.py", steps, run_recipe)
    recipe, hf, ratio = median_pair(pairs, lambda r: r["samples_per_s"])

    print(
        f"wav2vec2 ({hf['model']}, {hf['params'] / 1e6:.2f}M parameters), toy speech: {hf['clips']} training "
        f"clips of {hf['seconds']:.2f} s on average; {steps} steps x {hf['batch_size']} per rank x "
        f"{hf['world_size']} ranks, fp32, {hf['torch_threads']} thread(s) per rank; after step {WARMUP_STEPS}"
    )
    print(f"{'':<24} {'samples/s':>10} {'audio s/s':>10} {'final loss':>11}")
    for name, m in (("recipebox asr_ctc", recipe), ("transformers.Trainer", hf)):
        print(f"{name:<24} {m['samples_per_s']:>10.1f} {m['samples_per_s'] * hf['seconds']:>10.1f} "
              f"{m['loss']:>11.4f}")  # fmt: skip
    print(f"ratio recipebox/Trainer: {ratio}")
    print(
        "final loss: the recipe's per transcript character, the Trainer's CTC mean per row (sum / target length)"
    )


if __name__ == "__main__":
    main()
