"""The summarisation recipe as a user runs it: the default run (a small T5 from scratch, torchrun with 2 ranks)
against the lead-k baseline on the test split; one process re-evaluating the 2-rank checkpoint (the same
summaries and scores); a short BART run for the export, predict, compare and the side-by-side demo in a real
browser; label padding and decoder inputs per family; generation under FSDP2 and ZeRO-3; bad input; a stopped
run continuing exactly. The default BART run's quality floor takes about 5 CPU-minutes on top: it runs with
RECIPEBOX_LONG_TESTS=1."""

from __future__ import annotations

import csv
import functools
import json
import os
import sys

import pytest
import recipe_runs
import torch
from conftest import REPO
from demo_pages import start_app, stop_apps, wait_for_server
from recipe_runs import final_metrics

from recipebox.launch.tracking import read_metrics

RECIPE = str(REPO / "recipes" / "summarization.py")
TOY = REPO / "data" / "toy" / "summarization"
python = functools.partial(recipe_runs.python, RECIPE, timeout=900)


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sum") / "t5"
    # The README's command as it is (W&B offline is the default tracker), plus the replica check
    proc = recipe_runs.torchrun(RECIPE, "--output-dir", str(out), "--log-every", "20",
                                "--check-replicas", "true", timeout=2400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, read_metrics(out)


def bart(out, *extra):
    proc = python("--family", "bart", "--output-dir", str(out), "--tracker", "none", "--log-every", "20",
                  "--validation-file", "", *extra)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, read_metrics(out)


@pytest.fixture(scope="module")
def bart_run(tmp_path_factory):
    """A short BART run: a second export for compare and the demo (its quality is the long test's, so it
    generates for no test split)."""
    return bart(tmp_path_factory.mktemp("sum") / "bart", "--max-steps", "60", "--test-file", "")


@pytest.fixture(scope="module")
def bart_default_run(tmp_path_factory):
    if not os.environ.get("RECIPEBOX_LONG_TESTS"):
        pytest.skip("the default BART run takes about 5 CPU-minutes; set RECIPEBOX_LONG_TESTS=1")
    return bart(tmp_path_factory.mktemp("sum") / "bart_default")


def lead_baselines() -> dict[int, float]:
    """ROUGE-L of the first k sentences of each test document, k = 1..3, computed here on the same split."""
    from recipebox.data.summarization import lead_k, mean_rouge, read_pairs

    pairs = read_pairs(str(TOY / "test.jsonl"))
    return {k: mean_rouge([lead_k(t, k) for t in pairs.texts], pairs.summaries)["rougeL"] for k in (1, 2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("run", ["t5_run", "bart_default_run"])
def test_the_default_run_beats_the_lead_baseline_by_a_clear_margin(run, request):
    out, records = request.getfixturevalue(run)
    family = run.split("_")[0]
    m = final_metrics(records)
    lead = lead_baselines()
    print(f"{family}: test ROUGE-1/2/L/Lsum {m['test/rouge1']:.1f}/{m['test/rouge2']:.1f}/{m['test/rougeL']:.1f}"
          f"/{m['test/rougeLsum']:.1f}, lead-k ROUGE-L {lead}")  # fmt: skip
    assert m["test/rougeL"] > max(lead.values()) + 15
    # The right kind of summary with random names and numbers scores about 47 (data/toy/make_summarization.py):
    # only reading the document gets past it.
    assert m["test/rougeL"] > 55
    assert 0 < m["test/gen_len"] <= 64
    rows = [json.loads(x) for x in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == sum(1 for _ in (TOY / "test.jsonl").open())
    assert {"text", "reference", "summary", "rougeL"} <= set(rows[0])
    mean = sum(r["rougeL"] for r in rows) / len(rows)
    assert mean == pytest.approx(m["test/rougeL"], abs=1e-6)  # the plain mean of per-example F1
    assert len(m["test/samples"]) == 4 and all(
        list(s) == ["text", "reference", "summary"] for s in m["test/samples"]
    )
    if run == "t5_run":  # the README's command as it is: W&B (offline) got the same rows as a table
        (table,) = recipe_runs.wandb_tables(out, "test/samples")
        assert table["columns"] == ["text", "reference", "summary"]
        assert table["data"] == [list(s.values()) for s in m["test/samples"]]


@pytest.mark.slow
def test_the_two_ranks_trained_one_model(t5_run):
    m = final_metrics(t5_run[1])
    assert m["replica_param_sums"][0] == m["replica_param_sums"][1]
    assert m["train/tflops"] > 0  # the encoder-decoder FLOPs per source token are known


@pytest.mark.slow
def test_one_process_evaluating_the_checkpoint_gives_the_same_summaries_and_scores(t5_run, tmp_path):
    """The 2-rank run's last checkpoint, resumed by one process with no step left: the same generated texts
    and the same ROUGE (each rank scored its rows; the sums over ranks are exact)."""
    out, records = t5_run
    step = max(r["step"] for r in records)
    ckpt = out / "checkpoints" / f"step-{step:06d}"
    one = tmp_path / "one"
    proc = python(
        "--output-dir", str(one), "--resume", str(ckpt), "--max-steps", str(step), "--tracker", "none"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine, theirs = final_metrics(read_metrics(one)), final_metrics(records)
    for split in ("validation", "test"):
        two_ranks = (out / "predictions" / f"{split}.jsonl").read_text()
        assert (one / "predictions" / f"{split}.jsonl").read_text() == two_ranks
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len"):
        assert mine[f"test/{key}"] == pytest.approx(theirs[f"test/{key}"], rel=1e-12)  # float64 sums
        assert mine[f"eval/{key}"] == pytest.approx(theirs[f"eval/{key}"], rel=1e-12)


@pytest.mark.slow
def test_export_loads_and_predict_and_compare_agree(t5_run, bart_run, tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from recipes.summarization import summarize_texts

    t5, bart = t5_run[0] / "export", bart_run[0] / "export"
    model = AutoModelForSeq2SeqLM.from_pretrained(t5)
    tok = AutoTokenizer.from_pretrained(t5)
    assert model.config.task_specific_params["summarization"]["prefix"] == "summarize: "
    assert json.loads((t5 / "generation_config.json").read_text())["num_beams"] == 2
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0  # T5's ids
    texts = [json.loads(x)["text"] for x in (TOY / "test.jsonl").read_text().splitlines()[:3]]
    ours = summarize_texts(t5, texts)
    # The export alone, as any transformers user loads it: the same summary for the same settings.
    enc = tok(["summarize: " + texts[0]], return_tensors="pt")
    plain = tok.decode(model.generate(**enc)[0], skip_special_tokens=True).strip()
    assert ours[0] == plain
    proc = python("predict", str(t5), texts[0])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ours[0]
    from recipes.summarization import main  # no text: the export's held-out examples

    assert main(["predict", str(t5)]) == 0
    saved = [text for (text,) in json.loads((t5 / "examples.json").read_text())["summarize"]]
    shown = capsys.readouterr().out
    assert shown == "".join(f"text: {t}\nsummary: {s}\n" for t, s in zip(saved, summarize_texts(t5, saved)))

    table = tmp_path / "compare.csv"
    proc = python("compare", str(t5), str(bart), "--test-file", str(TOY / "test.jsonl"), "--limit", "40",
                  "--output", str(table))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(proc.stdout)
    rows = list(csv.DictReader(table.open()))
    assert [r["model"] for r in rows] == ["lead-1", "t5", "bart"]
    assert float(rows[1]["rougeL"]) > float(rows[0]["rougeL"]) + 15  # the default T5 run; BART ran 60 steps
    assert "| model | rouge1 | rouge2 | rougeL | rougeLsum | words | s/example |" in proc.stdout
    assert f"- t5: {ours[0]}" in proc.stdout
    # Without --output it prints the table and writes no file (it runs in the repository's root here)
    proc = python("compare", str(t5), "--test-file", str(TOY / "test.jsonl"), "--limit", "2", "--show", "0")
    assert proc.returncode == 0 and "| model |" in proc.stdout and "written to" not in proc.stdout, (
        proc.stderr
    )
    assert not (REPO / "compare.csv").exists()


@pytest.mark.slow
def test_demo_page_shows_two_summaries_side_by_side(t5_run, bart_run, browser):
    from gradio_client import Client

    from recipes.summarization import summarize_texts

    t5, bart = t5_run[0] / "export", bart_run[0] / "export"
    text = json.loads((TOY / "test.jsonl").read_text().splitlines()[5])["text"]
    proc, url, _ = start_app(t5, bart)
    try:
        wait_for_server(proc, url)
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("button", name="Summarise", exact=True).click()  # nothing pasted yet: said so
        page.get_by_text("Paste a text to summarise").first.wait_for(timeout=30_000)
        page.locator("#sum-text textarea").fill(text)
        page.get_by_role("button", name="Summarise", exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#sum-out-1 textarea').value.length > 0", timeout=60_000
        )
        assert page.locator("#sum-out-0 textarea").input_value() == summarize_texts(t5, [text])[0]
        assert page.locator("#sum-out-1 textarea").input_value() == summarize_texts(bart, [text])[0]
        assert page.get_by_text("t5", exact=True).first.is_visible()
        assert page.get_by_text("bart", exact=True).first.is_visible()
        page.close()
        both = Client(url, verbose=False).predict(text, api_name="/summarize")
        assert list(both) == [summarize_texts(t5, [text])[0], summarize_texts(bart, [text])[0]]
    finally:
        stop_apps([proc])


@pytest.mark.parametrize("family", ["t5", "bart", "pegasus"])
def test_labels_pad_with_minus_100_and_the_decoder_starts_with_the_familys_token(family):
    """The family's tokenizer and model built as the recipe builds them: labels end in eos and pad with -100
    (out of the loss); the decoder reads the family's start token, then the labels shifted right, -100 as pad;
    the recipe's summed loss over its target count is the model's own mean loss, with the LM head on every
    position or on the labelled ones alone."""
    from recipebox.data.summarization import tokenize_pairs
    from recipebox.data.tokenizer import train_seq2seq_bpe
    from recipebox.kernels.collate import collate_padded
    from recipes.summarization import SummarizationConfig, SummarizationTask, _setup_model

    texts = ["Anna met Bert in Oslo. Anna won 3 games.", "Rain fell in Lima on Monday.", "Cara sold 9 boats."]
    summaries = ["Anna beat Bert in Oslo.", "Rain in Lima.", "Cara sold boats."]
    tok = train_seq2seq_bpe(texts + summaries, family, vocab_size=300)
    cfg = SummarizationConfig(family=family, d_model=16, heads=2, ffn=32, layers=1, max_target_length=16)
    model = _setup_model(cfg, tok).eval()
    start = {"t5": 0, "bart": 2, "pegasus": 0}[family]  # T5 and Pegasus: pad; BART: eos
    assert model.config.decoder_start_token_id == start == model.generation_config.decoder_start_token_id
    data = tokenize_pairs(texts, summaries, tok, prefix="", max_source_length=32, max_target_length=16)
    features = [{k: r[k] for k in ("input_ids", "labels")} for r in data]
    batch = collate_padded(features, pad_id=tok.pad_token_id)
    labels = batch["labels"]
    lengths = [len(r) for r in data["labels"]]
    for row, n in zip(labels, lengths):
        assert row[n - 1] == tok.eos_token_id and (row[n:] == -100).all()
    if family == "bart":
        assert (labels[:, 0] == tok.bos_token_id).all()
    decoder = model.prepare_decoder_input_ids_from_labels(labels=labels)
    assert (decoder[:, 0] == start).all()
    assert torch.equal(decoder[:, 1:], labels[:, :-1].masked_fill(labels[:, :-1] == -100, tok.pad_token_id))
    task = SummarizationTask.__new__(SummarizationTask)
    task.model, task.processor = model, tok
    count = task.targets(batch)["loss"]
    assert int(count) == sum(lengths)
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    # The LM head on every position, then on the labelled ones alone: the same loss and the same gradients.
    grads = []
    for on_labels in (False, True):
        task.head_on_labels = on_labels
        rows = task.collate(features)
        assert ("_labelled" in rows) == task.head_on_labels
        model.zero_grad()
        losses, _ = task.loss(model, rows)
        assert (losses["loss"] / count).item() == pytest.approx(hf.item(), rel=1e-5)
        losses["loss"].backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*grads))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [["--backend", "fsdp"], ["--backend", "deepspeed", "--zero-stage", "3"]])
def test_generation_in_evaluation_finishes_under_sharded_backends(backend, tmp_path):
    """FSDP2 and ZeRO-3 gather layers collectively; evaluation generates on both ranks in lockstep over an
    uneven split (9 documents on 2 ranks) and the job ends cleanly."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join((TOY / "validation.jsonl").read_text().splitlines(keepends=True)[:9]))
    out = tmp_path / "run"
    proc = recipe_runs.torchrun(RECIPE, *backend, "--output-dir", str(out), "--tracker", "none", "--max-steps",
                                "3", "--validation-file", str(small), "--test-file", "", "--max-new-tokens",
                                "8", "--layers", "1", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = final_metrics(read_metrics(out))
    assert 0 < m["eval/gen_len"] <= 8 and m["eval/rougeL"] >= 0
    assert len((out / "predictions" / "validation.jsonl").read_text().splitlines()) == 9
    # The checkpoint names the model's own class (FSDP2 renames a wrapped module's class to FSDP...), so it
    # exports on its own like the run's export.
    from recipebox.checkpoints.__main__ import export_checkpoint

    again = export_checkpoint(out / "checkpoints" / "step-000003", tmp_path / "exported")
    assert json.loads((again / "config.json").read_text())["architectures"] == ["T5ForConditionalGeneration"]


@pytest.mark.parametrize("problem", ["missing_file", "missing_column", "empty_summary"])
def test_bad_input_stops_before_training_naming_the_file(tmp_path, problem):
    data = tmp_path / "train.jsonl"
    rows = [{"text": "Anna met Bert in Oslo.", "summary": "Anna met Bert."}] * 3
    if problem == "missing_column":
        rows = [{"article": r["text"], "summary": r["summary"]} for r in rows]
    if problem == "empty_summary":
        rows = [*rows, {"text": "Rain fell.", "summary": " "}]
    if problem != "missing_file":
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    proc = python("--train-file", str(data), "--output-dir", str(out), "--tracker", "none", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and str(data) in last_line
    assert {"missing_column": "--text-column", "empty_summary": "line 4"}.get(problem, "") in last_line
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_stopped_run_continues_with_the_same_losses(tmp_path):
    """SIGTERM mid-run: exit 75 after a checkpoint; the same command continues and gives, step for step, the
    losses of an uninterrupted run."""
    args = ["--max-steps", "12", "--save-every", "4", "--log-every", "1", "--eval-every", "0", "--tracker",
            "none", "--validation-file", "", "--test-file", "", "--layers", "1",
            "--export", "false"]  # fmt: skip
    reference = tmp_path / "reference"
    proc = python("--output-dir", str(reference), *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "stopped"
    cmd = [sys.executable, RECIPE, "--output-dir", str(out), *args]
    assert max(recipe_runs.stop_then_rerun(cmd, out)) < 12
    assert recipe_runs.losses(out) == recipe_runs.losses(reference)
