"""The causal LM recipe as a user runs it: a small GPT-2 trained from scratch under torchrun with 2 ranks on
the toy narrative corpus (a byte-level BPE trained on it), held-out perplexity against a unigram model,
generated samples, one process re-evaluating a checkpoint, the export in `pipeline("text-generation")`,
predict, and the demo in a real browser."""

from __future__ import annotations

import functools
import json
import math
from collections import Counter

import pytest
import recipe_runs
import torch
from conftest import REPO
from demo_pages import start_app, stop_apps, wait_for_server
from recipe_runs import final_metrics

from recipebox.launch.tracking import read_metrics

RECIPE = str(REPO / "recipes" / "causal_lm.py")
python = functools.partial(recipe_runs.python, RECIPE, timeout=300)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    proc = recipe_runs.torchrun(RECIPE, "--output-dir", str(out), "--tracker", "none", "--log-every", "10",
                                "--save-every", "40", "--check-replicas", "true", timeout=2400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, read_metrics(out)


def unigram_perplexity(train_rows, eval_rows) -> float:
    """exp of the mean negative log-probability of every predicted eval token under add-one unigram counts
    from the training rows: the floor any language model must beat."""
    counts = Counter(t for row in train_rows for t in row)
    vocab = len(counts) + 1
    total = sum(counts.values())
    nll = [-math.log((counts[t] + 1) / (total + vocab)) for row in eval_rows for t in row[1:]]
    return math.exp(sum(nll) / len(nll))


@pytest.mark.slow
def test_held_out_perplexity_is_far_below_a_unigram_models(lm_run):
    from transformers import AutoTokenizer, GPT2Config

    from recipebox.data.lm import read_corpus, tokenize_corpus
    from recipebox.launch.flops import train_flops_per_token

    out, records = lm_run
    m = final_metrics(records)
    # The run's own split of the toy corpus (the recipe's rule: a seeded shuffle of whole documents).
    import random

    docs = read_corpus([str(REPO / "data" / "toy" / "mlm_nsp" / "corpus.txt")])
    order = list(range(len(docs)))
    random.Random(42).shuffle(order)
    held = set(order[: round(len(docs) * 0.1)])
    tok = AutoTokenizer.from_pretrained(out / "export")
    train, _ = tokenize_corpus([d for i, d in enumerate(docs) if i not in held], tok, 128)
    evals, _ = tokenize_corpus([d for i, d in enumerate(docs) if i in held], tok, 128)
    unigram = unigram_perplexity(train["input_ids"], evals["input_ids"])
    samples = m["eval/samples"]
    print(f"causal LM: held-out perplexity {m['eval/perplexity']:.2f} (unigram {unigram:.1f}); samples:")
    for row in samples:
        print(f"  {row['prompt']!r} -> {row['continuation']!r}")
    assert m["eval/perplexity"] == pytest.approx(math.exp(m["eval/loss"]))
    assert m["eval/perplexity"] < unigram / 4
    assert [r["prompt"] for r in samples] == ["Then,", "One morning at the", "Later, the"]
    assert all(isinstance(r["continuation"], str) and r["continuation"].strip() for r in samples)
    assert m["replica_param_sums"][0] == m["replica_param_sums"][1]
    # Model FLOP/s per device from the tokens/s; no MFU without a known peak (a CPU).
    flops = train_flops_per_token(GPT2Config.from_pretrained(out / "export"), seq_len=128)
    assert m["train/tflops"] == pytest.approx(flops * m["train/tokens_per_s"] / 1e12 / 2)
    assert "train/mfu" not in m


@pytest.mark.slow
def test_one_process_evaluating_the_checkpoint_gives_the_same_perplexity(lm_run, tmp_path):
    """The 2-rank run's last checkpoint, resumed by one process with no step left to train: the evaluation
    over the whole held-out split (tokens summed over ranks there, in one process here) agrees."""
    out, records = lm_run
    step = max(r["step"] for r in records)
    ckpt = out / "checkpoints" / f"step-{step:06d}"
    proc = python("--output-dir", str(tmp_path / "one"), "--resume", str(ckpt), "--max-steps", str(step),
                  "--tracker", "none")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine, theirs = final_metrics(read_metrics(tmp_path / "one")), final_metrics(records)
    assert mine["eval/loss"] == pytest.approx(theirs["eval/loss"], rel=1e-5)
    assert mine["eval/samples"] == theirs["eval/samples"]  # greedy: the same continuations
    # The checkpoint exported on its own has no sampling settings: predict continues greedily, as it says.
    from recipebox.checkpoints.__main__ import main as checkpoints_main
    from recipes.causal_lm import generate_text

    assert checkpoints_main(["export", str(ckpt), str(tmp_path / "from_ckpt")]) == 0
    # The forward runs without the pad id (no mask to check); the checkpoint's config keeps it.
    assert json.loads((tmp_path / "from_ckpt" / "config.json").read_text())["pad_token_id"] is not None
    greedy = generate_text(str(out / "export"), "Then,", max_new_tokens=12, temperature=0)
    assert generate_text(str(tmp_path / "from_ckpt"), "Then,", max_new_tokens=12) == greedy


@pytest.mark.slow
def test_export_generates_in_the_pipeline_and_predict_prints_the_same(lm_run, capsys):
    from transformers import pipeline

    from recipes.causal_lm import generate_text

    out, _ = lm_run
    export = out / "export"
    config = json.loads((export / "generation_config.json").read_text())
    assert config["do_sample"] is True and config["max_new_tokens"] == 24
    # The forward runs without the pad id (no mask to check); the export's config keeps it.
    pad = json.loads((export / "config.json").read_text())["pad_token_id"]
    assert pad is not None and pad == config["pad_token_id"]
    greedy = pipeline("text-generation", model=str(export))("Then,", max_new_tokens=12, do_sample=False,
                                                             return_full_text=False)[0]["generated_text"]  # fmt: skip
    assert generate_text(str(export), "Then,", max_new_tokens=12, temperature=0) == greedy
    sampled = generate_text(str(export), "Then,", max_new_tokens=12, seed=3)
    assert sampled == generate_text(str(export), "Then,", max_new_tokens=12, seed=3)  # the seed fixes it
    proc = python("predict", str(export), "Then,", "--max-new-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip("\n") == "Then," + greedy
    from recipes.causal_lm import main  # no prompt: the export's evaluation prompts, one continuation each

    assert main(["predict", str(export), "--max-new-tokens", "12", "--temperature", "0"]) == 0
    prompts = ["Then,", "One morning at the", "Later, the"]
    each = [p + generate_text(str(export), p, max_new_tokens=12, temperature=0) + "\n" for p in prompts]
    assert capsys.readouterr().out == "".join(each) and each[0] == "Then," + greedy + "\n"


@pytest.mark.slow
def test_demo_page_shows_the_continuation(lm_run, browser):
    from gradio_client import Client

    from recipes.causal_lm import generate_text

    export = lm_run[0] / "export"
    proc, url, _ = start_app(export)
    try:
        wait_for_server(proc, url)
        page = browser.new_page()
        page.goto(url)
        page.locator("#lm-prompt textarea").fill("One morning at the")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#lm-out textarea').value.length > 0", timeout=60_000
        )
        # The page's defaults are the export's sampling settings and seed 0: the same text as in this process.
        assert page.locator("#lm-out textarea").input_value() == generate_text(
            str(export), "One morning at the"
        )
        page.close()
        text, _ = Client(url, verbose=False).predict("Then,", 12, 0, 1.0, 0, api_name="/generate")
        assert text == generate_text(str(export), "Then,", max_new_tokens=12, temperature=0)
    finally:
        stop_apps([proc])


@pytest.mark.slow
def test_meditations_one_paragraph_per_line_trains_and_evaluates(meditations, tmp_path):
    """The realistic corpus (shared data, skipped when absent): one document per line, a few steps."""
    out = tmp_path / "run"
    proc = python("--train-files", str(meditations), "--documents", "line", "--output-dir", str(out),
                  "--max-steps", "8", "--tracker", "none")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training documents" in proc.stdout and "remainder tokens dropped" in proc.stdout
    m = final_metrics(read_metrics(out))
    assert math.isfinite(m["eval/perplexity"]) and len(m["eval/samples"]) == 3


def test_the_loss_shifts_once_and_weights_every_token(tmp_path):
    """The recipe's loss (labels = inputs, shifted once inside the sum) over an uneven padded batch: its sum
    over its target count equals the model's own mean loss over the same tokens, and the count is every
    real token but each row's first."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from recipebox.kernels.collate import collate_padded
    from recipes.causal_lm import CausalLMConfig, CausalLMTask

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    rows = [
        {"input_ids": ids, "labels": ids} for ids in ([1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14])
    ]
    batch = collate_padded(rows, pad_id=0)
    task = CausalLMTask.__new__(CausalLMTask)
    task.cfg, task.model, task._generate_next_eval = CausalLMConfig(), model, False
    losses, _ = task.loss(model, batch)
    count = task.targets(batch)["loss"]
    assert int(count) == (7 - 1) + (3 - 1) + (4 - 1)
    hf = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    assert (losses["loss"] / count).item() == pytest.approx(hf.item(), rel=1e-5)


@pytest.mark.parametrize("problem", ["missing", "too_short", "all_held_out"])
def test_bad_corpus_stops_before_training_naming_the_file(tmp_path, problem):
    corpus = tmp_path / "corpus.txt"
    if problem != "missing":
        corpus.write_text("A few words.\n\nAnd a second short document.\n")
    out = tmp_path / "run"
    split = ["--eval-fraction", "0.9"] if problem == "all_held_out" else ["--validation-files", str(corpus)]
    proc = python("--train-files", str(corpus), *split, "--output-dir", str(out), "--tracker", "none")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]  # after the tokenising progress bar, if any
    assert last_line.startswith("error: ") and str(corpus) in last_line
    assert problem != "all_held_out" or "--eval-fraction 0.9 holds out all 2 document(s)" in last_line
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_stopped_run_continues_with_the_same_losses(tmp_path):
    """SIGTERM mid-run: exit 75 after a checkpoint; the same command continues over the same packed blocks
    and gives, step for step, the losses of an uninterrupted run."""
    import sys

    args = [
        "--max-steps",
        "12",
        "--save-every",
        "4",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--tracker",
        "none",
        "--export",
        "false",
    ]
    reference = tmp_path / "reference"
    proc = python("--output-dir", str(reference), *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "stopped"
    cmd = [sys.executable, RECIPE, "--output-dir", str(out), *args]
    assert max(recipe_runs.stop_then_rerun(cmd, out)) < 12
    assert recipe_runs.losses(out) == recipe_runs.losses(reference)
