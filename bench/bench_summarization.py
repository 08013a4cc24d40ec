"""Summarization: recipes/summarization.py vs transformers.Seq2SeqTrainer, a small T5 on the toy set.

1. Training throughput. Both sides run under `torchrun --nproc_per_node=2` (gloo, fp32, OMP_NUM_THREADS=1)
   with the same model and data: the recipe as a user runs it (its defaults: a T5 built by
   recipes.summarization._setup_model, a byte-level BPE trained by data.tokenizer.train_seq2seq_bpe on the
   training texts and summaries, the "summarize: " prefix; --validation-file "" --test-file "", so no
   evaluation happens), then Seq2SeqTrainer on the T5 that _setup_model builds from the recipe run's saved
   config with the tokenizer trained again the same way (checked equal to the run's RUN/processor), the
   rows of data.summarization.tokenize_pairs with the same prefix and max lengths (checked equal to the
   run's tokenisation cache), DataCollatorForSeq2Seq (labels padded with -100, to a multiple of 8 as the
   recipe's collate pads), length-grouped batches, the loss a mean per rank (average_tokens_across_devices
   off: see hf_worker), and the same per-rank batch, learning rate, warmup, weight decay, clipping, seed and
   step count. samples/s counts the steps after step 5 (one logging window)
   and is total samples over total time: the recipe's logging windows (metrics.jsonl) weighted by their
   duration, the Trainer's a step clock around the same steps. Three pairs of runs (recipe, then Trainer;
   one with --quick); the table shows the pair with the median ratio.
2. Generation throughput: documents/s of beam-search summaries of the toy validation split, texts in and
   cleaned summary strings out (tokenisation, generate, decoding), in this one process on one thread, from
   the recipe run's export, whose weights and generation config (beams, max new tokens) both sides load:
   the recipe's summarize_texts (what its predict and compare run) vs Seq2SeqTrainer.predict
   (predict_with_generate, generation_num_beams, the export's max_new_tokens) on the rows of tokenize_pairs
   without labels, so neither side runs a loss forward. Both use the recipe's evaluation batch size and pad
   each batch to its longest, so they generate from identical inputs; the summaries are compared and scored
   with data.summarization.mean_rouge (not timed). Median of 3 alternating passes after an untimed one. The
   recipe's in-loop evaluation is not what is timed: its loop logs no evaluation time, and the gap in
   metrics.jsonl before the final evaluation's record also holds the checkpoint save.
Usage:
    python bench/bench_summarization.py                 # 3 pairs of 60-step runs, 150 documents x 3, about 5 min
    python bench/bench_summarization.py --quick         # 1 pair of 10-step runs, 16 documents once, smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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
        ["recipes/summarization.py", f"--output-dir={out}", f"--max-steps={steps}", "--validation-file=",
         "--test-file=", "--tracker=none", f"--log-every={WARMUP_STEPS}", "--precision=fp32"],
        out.parent / "recipe.log",
    )  # fmt: skip
    return timed_throughput(out, WARMUP_STEPS)


def hf_worker(recipe_dir: Path, out: Path, steps: int) -> None:
    """One rank of the Seq2SeqTrainer side; rank 0 writes samples/s and the last loss to `out`."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed

    from recipebox.data.summarization import read_pairs, tokenize_pairs
    from recipebox.data.tokenizer import load_tokenizer, train_seq2seq_bpe
    from recipes.summarization import SummarizationConfig, _setup_model, source_prefix

    # The recipe's saved config, so a change to its defaults cannot skew the comparison.
    cfg = saved_config(recipe_dir, SummarizationConfig)
    if cfg.model:
        raise SystemExit(
            "error: this benchmark compares a T5 built from scratch; the recipe ran with --model"
        )
    pairs = read_pairs(cfg.train_file, cfg.text_column, cfg.summary_column, dataset_config=cfg.dataset_config,
                       split=cfg.train_split)  # fmt: skip
    tok = train_seq2seq_bpe(pairs.texts + pairs.summaries, cfg.family, vocab_size=cfg.vocab_size)
    if tok.get_vocab() != load_tokenizer(str(recipe_dir / "processor")).get_vocab():
        raise SystemExit(f"error: the tokenizer trained here differs from the recipe run's {recipe_dir}")
    set_seed(cfg.seed)  # the seed of the recipe's rank 0, whose initial weights DDP broadcasts
    model = _setup_model(cfg, tok)
    prefix = source_prefix(cfg, model)
    lengths = {"max_source_length": cfg.max_source_length, "max_target_length": cfg.max_target_length}
    train = tokenize_pairs(pairs.texts, pairs.summaries, tok, prefix=prefix, **lengths)
    # The recipe's own tokenised training rows are in its cache: check they are these.
    cached = [datasets.Dataset.from_file(str(p)) for p in (recipe_dir / "cache").rglob("sum-*.arrow")]
    rows = {k: train[k][:] for k in ("input_ids", "labels")}
    if not any(len(c) == len(train) and all(c[k][:] == v for k, v in rows.items()) for c in cached):
        raise SystemExit(f"error: the {len(train)} tokenised rows differ from the recipe run's {recipe_dir}")

    # Length-grouped batches, as the recipe's sampler; full batches only, so samples = batch x world x steps
    # exactly. average_tokens_across_devices off: T5's forward takes **kwargs but ignores num_items_in_batch
    # (a plain mean), so the Trainer's default would multiply its loss and gradients by the world size.
    args = Seq2SeqTrainingArguments(
        train_sampling_strategy="group_by_length", length_column_name="length", dataloader_drop_last=True,
        average_tokens_across_devices=False,
        output_dir=str(out / "run"), per_device_train_batch_size=cfg.batch_size, max_steps=steps,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=int(cfg.warmup_ratio * steps),
        max_grad_norm=cfg.max_grad_norm, logging_steps=WARMUP_STEPS, save_strategy="no", report_to=[],
        dataloader_num_workers=0, use_cpu=True, ddp_backend="gloo", ddp_find_unused_parameters=False,
        disable_tqdm=True, seed=cfg.seed,
    )  # fmt: skip
    # `length` feeds the sampler; the Trainer drops it (not a model input) before collation.
    collator = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100, pad_to_multiple_of=8)
    clock = step_clock(WARMUP_STEPS)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                             processing_class=tok, callbacks=[clock])  # fmt: skip
    trainer.train()
    c = model.config
    write_trainer_result(
        trainer, clock, WARMUP_STEPS, out, documents=len(train), vocab=c.vocab_size,
        max_source=cfg.max_source_length, max_target=cfg.max_target_length,
        model=f"d_model {c.d_model}, {c.num_layers}+{c.num_decoder_layers} layers, {c.num_heads} heads, "
        f"ffn {c.d_ff}", params=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip


def generation_bench(recipe_dir: Path, documents: int | None, repeats: int) -> dict:
    """summarize_texts vs Seq2SeqTrainer.predict on the export's weights: documents/s (median of `repeats`
    alternating passes after one untimed pass each), agreement and ROUGE of the summaries."""
    import datasets
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSeq2SeqLM,
        DataCollatorWithPadding,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    from recipebox.data.summarization import clean_summary, mean_rouge, read_pairs, tokenize_pairs
    from recipes.summarization import SummarizationConfig, load, summarize_texts

    torch.set_num_threads(1)  # as each training rank
    datasets.disable_progress_bars()  # tokenize_pairs' map runs in every timed pass
    cfg, export = saved_config(recipe_dir, SummarizationConfig), recipe_dir / "export"
    # The run trained without a validation file; the default one (the toy set's) is summarised here.
    pairs = read_pairs(SummarizationConfig.validation_file, cfg.text_column, cfg.summary_column,
                       dataset_config=cfg.dataset_config, split=cfg.validation_split)  # fmt: skip
    texts, refs = pairs.texts[:documents], pairs.summaries[:documents]
    tok, model, prefix, max_source = load(str(export))  # loading is not summarising
    gen, batch = model.generation_config, cfg.eval_batch_size or cfg.batch_size

    hf_model = AutoModelForSeq2SeqLM.from_pretrained(export, use_safetensors=True).eval()  # the same weights
    args = Seq2SeqTrainingArguments(
        output_dir=str(recipe_dir.parent / "predict"), per_device_eval_batch_size=batch,
        predict_with_generate=True, generation_num_beams=gen.num_beams, report_to=[],
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    # Rows without labels, padded to each batch's longest: DataCollatorForSeq2Seq would add labels=None, which
    # Seq2SeqTrainer's prediction_step takes for labels, running a loss forward without them (an error).
    collator = DataCollatorWithPadding(tok)
    trainer = Seq2SeqTrainer(model=hf_model, args=args, processing_class=tok, data_collator=collator)

    def recipe_side(texts=texts):
        return summarize_texts(export, texts, batch_size=batch)

    def trainer_side(texts=texts):
        rows = tokenize_pairs(texts, refs[: len(texts)], tok, prefix=prefix, max_source_length=max_source,
                              max_target_length=cfg.max_target_length)  # fmt: skip
        rows = rows.select_columns(["input_ids"])  # no labels: no loss forward
        # max_new_tokens as the export's generation config has it: generation_max_length would set max_length,
        # which counts the decoder start token and which generate() overrides with that max_new_tokens.
        ids = trainer.predict(rows, max_new_tokens=gen.max_new_tokens).predictions
        ids = np.where(ids != -100, ids, tok.pad_token_id)  # the eval loop pads across batches with -100
        return [clean_summary(t) for t in tok.batch_decode(ids, skip_special_tokens=True)]

    sides = {"recipe": recipe_side, "trainer": trainer_side}
    for fn in sides.values():  # untimed: lazy init, allocator growth
        fn(texts[:batch])
    seconds, summaries = {name: [] for name in sides}, {}
    for _ in range(repeats):  # alternating, so a slower spell of a busy machine hits both sides
        for name, fn in sides.items():
            start = time.perf_counter()
            summaries[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    same = sum(a == b for a, b in zip(summaries["recipe"], summaries["trainer"]))
    result = {"documents": len(texts), "beams": gen.num_beams, "max_new_tokens": gen.max_new_tokens,
              "batch": batch, "same": same}  # fmt: skip
    for name, out in summaries.items():
        result[name] = {
            "docs_per_s": len(texts) / statistics.median(seconds[name]),
            "words": sum(len(s.split()) for s in out) / len(out),
            "rougeL": mean_rouge(out, refs)["rougeL"],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, steps = comparison_args(parser, default=60, quick=10, warmup=WARMUP_STEPS)
    if args.hf_worker:
        hf_worker(args.recipe_run, args.out, steps)
        return
    documents, repeats = (16, 1) if args.quick else (None, 3)

    with tempfile.TemporaryDirectory(prefix="bench_summarization_") as tmp:
        pairs = run_pairs(Path(tmp), args.pairs, "bench/bench_summarization.py", steps, run_recipe)
        gen = generation_bench(Path(tmp) / "pair0" / "recipe", documents, repeats)
    recipe, hf, ratio = median_pair(pairs, lambda r: r["samples_per_s"])

    print(
        f"T5 ({hf['model']}, vocab {hf['vocab']}, {hf['params'] / 1e6:.2f}M parameters), toy set: "
        f"{hf['documents']} training documents, sources <= {hf['max_source']} and summaries <= "
        f"{hf['max_target']} tokens; {steps} steps x {hf['batch_size']} per rank x {hf['world_size']} ranks, "
        f"fp32, {hf['torch_threads']} thread(s) per rank; samples/s after step {WARMUP_STEPS}"
    )
    print(f"{'':<32} {'samples/s':>10} {'final loss':>11}")
    print(f"{'recipebox summarization':<32} {recipe['samples_per_s']:>10.1f} {recipe['loss']:>11.4f}")
    print(f"{'transformers.Seq2SeqTrainer':<32} {hf['samples_per_s']:>10.1f} {hf['loss']:>11.4f}")
    print(f"ratio recipebox/Seq2SeqTrainer: {ratio}")
    print("final loss: mean per summary token over the last logging window; the sides batch differently\n")

    passes = "1 pass" if repeats == 1 else f"median of {repeats} passes"
    print(
        f"Generation from the run's export: {gen['documents']} validation documents, {gen['beams']} beams, "
        f"<= {gen['max_new_tokens']} new tokens, batch {gen['batch']}, 1 process, 1 thread; documents/s: "
        f"{passes}, texts in, summaries out"
    )
    print(f"{'':<32} {'docs/s':>10} {'words':>7} {'ROUGE-L':>8}")
    for name, key in (("recipebox summarize_texts", "recipe"), ("Seq2SeqTrainer.predict", "trainer")):
        m = gen[key]
        print(f"{name:<32} {m['docs_per_s']:>10.2f} {m['words']:>7.1f} {m['rougeL']:>8.2f}")
    ratio = gen["recipe"]["docs_per_s"] / gen["trainer"]["docs_per_s"]
    print(f"ratio recipebox/Seq2SeqTrainer: {ratio:.2f}x")
    print(f"identical summaries: {gen['same']}/{gen['documents']}")


if __name__ == "__main__":
    main()
