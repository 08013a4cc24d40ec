"""The XLA lane: the NER recipe with --backend xla under real torch_xla on CPU (PJRT_DEVICE=CPU).

Runs in its own virtualenv (.venv-xla, made by scripts/env_xla.sh: torch 2.9 + torch_xla 2.9); SPMD over 1, 2
and 4 virtual CPU devices; bucketed shapes keep the compile count bounded; a killed run resumes exactly; the
export loads in this (non-XLA) environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env
from recipe_runs import job_completes, popen, same_weights, sbatch

pytestmark = pytest.mark.xla

XLA_PYTHON = REPO / ".venv-xla" / "bin" / "python"
STEPS = 6
BUCKETS = [12, 16, 32]  # the toy data's first batches need 12 and 16


@pytest.fixture(scope="module")
def xla_python() -> Path:
    subprocess.run(["bash", str(REPO / "scripts" / "env_xla.sh")], check=True, timeout=1800)
    return XLA_PYTHON


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A one-layer BERT (hidden 32) with a WordPiece trained on the toy NER words, saved as a model folder."""
    import torch
    from transformers import BertConfig, BertModel

    from recipebox.data.tokenizer import train_wordpiece

    out = tmp_path_factory.mktemp("tiny_encoder")
    lines = (REPO / "data" / "toy" / "ner" / "train.conll").read_text(encoding="utf-8").splitlines()
    words = [line.split()[0] for line in lines if line.strip()]
    tok = train_wordpiece((" ".join(words[i : i + 20]) for i in range(0, len(words), 20)), vocab_size=500)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(config).save_pretrained(out)
    return out


def ner_command(python: Path, model: Path, out: Path, *flags: str) -> list[str]:
    return [
        str(python),
        "recipes/ner.py",
        "--backend", "xla",
        "--model", str(model),
        "--output-dir", str(out),
        "--max-steps", str(STEPS),
        "--batch-size", "8",
        "--max-length", "32",
        "--stride", "8",
        "--xla-buckets", ",".join(map(str, BUCKETS)),
        "--log-every", "1",
        "--tracker", "none",
        "--check-replicas", "true",
        "--lr", "5e-3",
        "--test-file", "",
        *flags,
    ]  # fmt: skip


# The lane checks graphs, shapes and numbers, not the speed of the CPU code XLA generates: compiling without
# LLVM optimisation halves the lane's time (most of it is compiling).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_env(devices: int) -> dict[str, str]:
    return subprocess_env(
        PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices), TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=FAST_COMPILE
    )


def run_ner(python, model, out, devices, *flags, timeout=900) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ner_command(python, model, out, *flags),
        cwd=REPO,
        env=xla_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def train_log(run: Path) -> dict[int, dict]:
    """The last training record of every step (a resumed run appends to the same metrics.jsonl)."""
    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            records[record["step"]] = record
    return records


@pytest.fixture(scope="module")
def spmd_runs(xla_python, tiny_encoder, tmp_path_factory) -> dict[int, Path]:
    """The same run on 1, 2 and 4 virtual devices; the 4-device one also evaluates (on the first 20 toy
    validation sentences, to keep the lane short) and exports."""
    sentences = (REPO / "data" / "toy" / "ner" / "validation.conll").read_text(encoding="utf-8").split("\n\n")
    validation = tmp_path_factory.mktemp("data") / "validation.conll"
    validation.write_text("\n\n".join(sentences[:20]) + "\n", encoding="utf-8")
    runs = {}
    for devices in (1, 2, 4):
        out = tmp_path_factory.mktemp(f"spmd{devices}")
        flags = ("--validation-file", str(validation) if devices == 4 else "")
        started = time.monotonic()
        result = run_ner(xla_python, tiny_encoder, out, devices, *flags)
        print(
            f"{devices} device(s): {time.monotonic() - started:.0f} s; {result.stdout.strip().splitlines()[-1]}"
        )
        runs[devices] = out
    return runs


def test_spmd_trains_with_the_same_losses_on_1_2_and_4_devices(spmd_runs):
    losses = {
        d: [train_log(run)[s]["train/loss"] for s in range(1, STEPS + 1)] for d, run in spmd_runs.items()
    }
    assert losses[1][-1] < losses[1][0]  # it learns
    for devices in (2, 4):
        # The global batch is the same; only the order of the cross-device sums differs (float32 rounding).
        assert losses[devices] == pytest.approx(losses[1], rel=1e-6, abs=1e-6), (devices, losses)


def test_compiles_after_warmup_stay_within_the_buckets(spmd_runs):
    for devices, run in spmd_runs.items():
        log = train_log(run)
        assert 1 <= log[STEPS]["xla/batch_shapes"] <= len(BUCKETS)  # every batch padded to a bucket, size 8
        # After the first step, at most one graph per training shape: the step's graph once optimizer state
        # exists (a shape first seen in step 1 compiles again at its next use, later shapes only once).
        for step, record in log.items():
            assert record["xla/compiles_after_warmup"] <= record["xla/batch_shapes"], (devices, step, record)
        assert log[STEPS]["xla/compiles_after_warmup"] <= len(BUCKETS)


def test_a_killed_run_resumes_with_the_same_losses(xla_python, tiny_encoder, spmd_runs, tmp_path):
    out = tmp_path / "run"
    cmd = ner_command(xla_python, tiny_encoder, out, "--save-every", "3", "--validation-file", "")
    proc = popen(cmd, env=xla_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    saved = out / "checkpoints" / "step-000003" / "manifest.json"
    deadline = time.monotonic() + 600
    while not saved.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert saved.exists(), "the first run never saved step 3"
    # Whatever the killed run managed after step 3 is dropped, as if the kill had come right after the save.
    for later in (out / "checkpoints").glob("step-*"):
        if later.name > "step-000003":
            subprocess.run(["rm", "-rf", str(later)], check=True)
    (out / "checkpoints" / "latest").write_text("step-000003")

    resumed = run_ner(xla_python, tiny_encoder, out, 2, "--save-every", "3", "--validation-file", "")
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout, resumed.stdout[-2000:]
    reference, log = train_log(spmd_runs[2]), train_log(out)
    # Same data, dropout masks, optimizer state and shardings, hence the same compiled graphs: bit for bit.
    assert [log[s]["train/loss"] for s in range(4, STEPS + 1)] == [
        reference[s]["train/loss"] for s in range(4, STEPS + 1)
    ]
    assert same_weights(out / "export", spmd_runs[2] / "export")


def test_replicas_mode_trains_with_one_replica_like_spmd(xla_python, tiny_encoder, spmd_runs, tmp_path):
    """One process per chip; on CPU only one replica can run (torch_xla's collectives abort with more)."""
    run_ner(xla_python, tiny_encoder, tmp_path, 1, "--xla-mode", "replicas", "--validation-file", "")
    log, reference = train_log(tmp_path), train_log(spmd_runs[1])
    losses = [log[s]["train/loss"] for s in range(1, STEPS + 1)]
    assert losses == pytest.approx([reference[s]["train/loss"] for s in range(1, STEPS + 1)], rel=1e-5)
    assert log[STEPS]["xla/compiles_after_warmup"] <= len(BUCKETS)


def test_mlm_nsp_compiles_once_per_training_shape_and_evaluation_stays_bounded(xla_python, tmp_path):
    """BERT pretraining under SPMD: the MLM head's shapes do not follow the number of masked tokens, and an
    evaluation pass (outputs fetched to the host every batch) compiles at most full + last batch per bucket."""
    flags = ["--hidden-size", "32", "--num-layers", "1", "--intermediate-size", "64", "--vocab-size", "500"]
    cmd = [str(xla_python), "recipes/mlm_nsp.py", "--backend", "xla", "--output-dir", str(tmp_path),
           "--max-steps", str(STEPS), "--batch-size", "8", "--max-length", "32", "--xla-buckets", "16,32",
           "--eval-fraction", "0.05", "--eval-every", "3", "--log-every", "1", "--tracker", "none", *flags]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=xla_env(2), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    log = train_log(tmp_path)
    assert all(log[s]["train/loss"] > 0 for s in range(1, STEPS + 1))
    # Masking on the host draws a different number of [MASK]s per batch; none of them may compile anew.
    # Evaluation's own graphs are counted apart; the training step after the first evaluation compiles one
    # graph more (measured: 1), and nothing compiles after that.
    for step, record in log.items():
        assert record["xla/compiles_after_warmup"] <= record["xla/batch_shapes"] + (step > 3), (step, record)
    assert log[STEPS]["xla/compiles"] == log[4]["xla/compiles"], log
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/nsp_accuracy" in r for r in evals) >= 2, "no evaluation ran"
    # The evaluation after step 3 (about 30 batches) adds at most 2 graphs per bucket; before the hook that
    # gathers sharded outputs inside the graph, every batch compiled a transfer program of its own.
    assert 1 <= log[4]["xla/eval_compiles"] - log[3]["xla/eval_compiles"] <= 2 * 2, (log[3], log[4])
    assert log[4]["xla/compiles"] - log[3]["xla/compiles"] <= 2 * 2 + 1, (log[3], log[4])
    assert (tmp_path / "export" / "model.safetensors").is_file()


def _fingerprint(model) -> float:
    """The loop's replica_param_sums, computed again from a loaded model."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        p = p.detach().double()
        total += (p.sum() * (1 + i % 7) + p.square().sum()).item()
    return total


def test_the_export_loads_in_a_token_classification_pipeline_without_xla(spmd_runs):
    from transformers import AutoModelForTokenClassification, pipeline

    run = spmd_runs[4]
    export = run / "export"
    model = AutoModelForTokenClassification.from_pretrained(export)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (sums,) = [r["replica_param_sums"] for r in logged if "replica_param_sums" in r]
    assert _fingerprint(model) == pytest.approx(sums[0], rel=1e-9)  # exactly the weights XLA trained
    assert any("eval/f1" in r for r in logged)
    tagger = pipeline("token-classification", model=str(export), device="cpu", ignore_labels=[])
    found = tagger("Anna Berg flew from Oslo to meet the BBC .")
    tags = set(model.config.id2label.values())
    assert len(found) >= 10 and all(entity["entity"] in tags for entity in found), found
    assert {"O", "B-PER", "B-LOC", "B-ORG"} <= tags


def test_text_classification_trains_evaluates_and_exports_under_spmd(xla_python, tiny_encoder, tmp_path):
    """The third recipe on the same backend: multi-label toxic comments on 2 devices, every validation and
    test row scored once (the sharded batches' outputs come back whole), an export the main environment
    loads."""
    import csv

    from transformers import pipeline

    from recipebox.launch.tracking import read_metrics

    cmd = [str(xla_python), "recipes/text_classification.py", "--config", "recipes/configs/toxic.yaml",
           "--backend", "xla", "--model", str(tiny_encoder), "--output-dir", str(tmp_path),
           "--max-steps", str(STEPS), "--batch-size", "8", "--xla-buckets", "16,32,64", "--log-every", "1",
           "--tracker", "none", "--lr", "5e-3"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=xla_env(2), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    log = train_log(tmp_path)
    assert sorted(log) == list(range(1, STEPS + 1)) and all(r["train/loss"] > 0 for r in log.values())
    assert log[STEPS]["xla/compiles_after_warmup"] <= log[STEPS]["xla/batch_shapes"] <= 3
    last = {k: v for r in read_metrics(tmp_path) for k, v in r.items()}  # the last value of every metric
    for prefix, split in (("eval", "validation"), ("test", "test")):
        with open(REPO / "data" / "toy" / "toxic" / f"{split}.csv", encoding="utf-8", newline="") as f:
            rows = sum(1 for _ in csv.DictReader(f))
        assert last[f"{prefix}/examples"] == rows, split
    classify = pipeline("text-classification", model=str(tmp_path / "export"), device="cpu", top_k=None)
    scores = classify("you are a wonderful person")[0]
    assert {s["label"] for s in scores} == {
        "toxic",
        "severe_toxic",
        "obscene",
        "threat",
        "insult",
        "identity_hate",
    }


def test_qa_trains_evaluates_and_exports_under_spmd(xla_python, tmp_path):
    """The QA recipe on 2 devices with static shapes (every window padded to one bucket): every validation
    question scored once from the top-n-best candidates the sharded outputs bring back, an export the main
    environment answers with."""
    import torch
    from transformers import BertConfig, BertModel

    from recipebox.data.tokenizer import train_wordpiece
    from recipebox.launch.tracking import read_metrics
    from recipes.qa import answer

    encoder = tmp_path / "encoder"  # a one-layer BERT whose WordPiece knows the toy articles' words
    rows = [json.loads(x) for x in (REPO / "data" / "toy" / "qa" / "train.jsonl").read_text().splitlines()]
    tok = train_wordpiece((r["question"] + " " + r["context"] for r in rows), vocab_size=800)
    tok.save_pretrained(encoder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
              ).save_pretrained(encoder)  # fmt: skip
    lines = (REPO / "data" / "toy" / "qa" / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    validation = tmp_path / "validation.jsonl"
    validation.write_text("\n".join(lines[:24]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    cmd = [str(xla_python), "recipes/qa.py", "--backend", "xla", "--model", str(encoder), "--output-dir",
           str(out), "--max-steps", str(STEPS), "--batch-size", "8", "--max-length", "128", "--doc-stride", "32",
           "--xla-buckets", "128", "--validation-file", str(validation), "--test-file", "", "--log-every", "1",
           "--tracker", "none", "--lr", "5e-3"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=xla_env(2), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    log = train_log(out)
    assert sorted(log) == list(range(1, STEPS + 1)) and all(r["train/loss"] > 0 for r in log.values())
    assert log[STEPS]["xla/batch_shapes"] == 1
    last = {k: v for r in read_metrics(out) for k, v in r.items()}
    assert last["eval/total"] == 24
    context = json.loads(lines[0])["context"]
    found = answer(str(out / "export"), "Who founded it?", context)
    assert found["answer"] == "" or context[found["start"] : found["end"]] == found["answer"]


def test_causal_lm_trains_on_fixed_blocks_and_skips_generation_under_spmd(xla_python, tmp_path):
    """The causal LM recipe on 2 devices: packed blocks are one static shape; the evaluation's perplexity
    is there and its generated samples are not (generation is skipped where shapes are static)."""
    from recipebox.launch.tracking import read_metrics

    cmd = [str(xla_python), "recipes/causal_lm.py", "--backend", "xla", "--output-dir", str(tmp_path),
           "--max-steps", str(STEPS), "--eval-every", "3", "--log-every", "1", "--tracker", "none",
           "--n-embd", "32", "--n-layer", "1", "--vocab-size", "500", "--block-size", "64",
           "--xla-buckets", "64"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=xla_env(2), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    log = train_log(tmp_path)
    assert sorted(log) == list(range(1, STEPS + 1)) and log[STEPS]["xla/batch_shapes"] == 1
    evals = [r for r in read_metrics(tmp_path) if "eval/perplexity" in r]
    assert len(evals) == 2 and not any("eval/samples" in r for r in evals)
    assert (tmp_path / "export" / "generation_config.json").is_file()


@pytest.mark.slurm
def test_sbatch_ner_tpu_runs_on_the_local_cluster_with_xla_on_cpu(
    local_cluster, xla_python, tiny_encoder, tmp_path
):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    recipe = ner_command(xla_python, tiny_encoder, run_dir, "--validation-file", "")[
        4:
    ]  # after --backend xla
    recipe = [a for a in recipe if a not in ("--output-dir", str(run_dir))]
    flags = ["--partition=local", "--cpus-per-task=1", "--time=20", f"--output={log}"]
    env = subprocess_env(
        RUN_DIR=str(run_dir),
        PJRT_DEVICE="CPU",
        CPU_NUM_DEVICES="4",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS=FAST_COMPILE,
    )
    job = sbatch([*flags, "slurm/ner_tpu.sh", *recipe], env)
    text = job_completes(job, log, 1200)
    assert "SPMD over 4 device(s)" in text and "training step ended with status 0" in text, text[-3000:]
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert train_log(run_dir)[STEPS]["xla/batch_shapes"] >= 1


def test_the_backend_contract_holds_and_evaluation_skips_generation(xla_python, tmp_path):
    """tests/backend_checks.py's contract under SPMD on 2 devices; generation is refused with the reason, and
    the loop's evaluation of a generating task gives its loss-only metrics (generation is for the export)."""
    proc = subprocess.run(
        [str(xla_python), str(REPO / "tests" / "backend_checks.py"), str(tmp_path), "xla"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env=xla_env(2),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    r = results["contract/xla"]
    assert r["changed"] and r["grad_norm"] > 0 and r["lr_after_1"] == pytest.approx(r["lr_expected_after_1"])
    assert r["accumulation_equals_bigger_batch"] and r["resumed_loss_equal"] and r["resumed_weights_equal"]
    assert r["loaded_over_another_state"]
    assert r["full_state_keys_match"]
    gen = results["generate/xla"]
    assert gen["static_shapes"] and "generate from the export" in gen["refused"]
    assert gen["metrics"] == ["eval/loss", "eval/perplexity"]
