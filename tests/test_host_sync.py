"""A training step never waits for the device: nothing in the loop, the backends or a recipe reads a device
value back to the host between two log lines.

On CPU (tests/host_sync.py): every read of a tensor that would live on the device (`.item()`, `bool()`,
`.tolist()`, `.cpu()`, `nonzero`, boolean masks) is recorded while `fit` runs its steps; logging, evaluation
and the loader's host batches are left out. The loop and the one-process backend make none, and a read
planted in the step is caught, so the count can fail. Recipes may make only the reads named in `KNOWN`
(and `KNOWN_FOR` their own).
On CUDA (`gpu`): torch's own sync detection around the same steps of every recipe.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest
import torch
from host_sync import count_step_reads
from test_launch import RegressionTask, regression_data, trainer_for

from recipebox.launch.backends import backend_settings, make_backend
from recipebox.launch.config import TrainConfig, parse_config
from recipebox.launch.loop import Trainer
from recipebox.launch.runtime import Runtime

# The reads a step may still make, by file, each for a reason outside the loop:
KNOWN = {
    # transformers' SDPA mask builder asks `padding_mask.all()` at every forward, to drop a mask without
    # padding (compiled blocks do not change that: the mask is built before them).
    "transformers/masking_utils.py",
}
# Per recipe, on top of KNOWN. Speech: transformers' wav2vec2 draws SpecAugment's time spans on the host from
# each row's length (`.tolist()`), then writes the mask embedding and zeroes padded frames through boolean
# masks (`nonzero`), forward and backward. Passing host-drawn spans in would still leave the boolean writes.
KNOWN_FOR = {"asr_ctc": {"transformers/models/wav2vec2/modeling_wav2vec2.py"}}
# ... and on CUDA, where the CPU count cannot see inside C++: torch's CUDA CTC loss copies its per-row length
# tables to the device with blocking copies, in the forward (the warning names torch's `ctc_loss` wrapper) and
# in the backward (replayed where autograd's engine was called).
KNOWN_ON_CUDA_FOR = {"asr_ctc": {"torch/nn/functional.py", "torch/autograd/graph.py"}}

# In-process settings that build each recipe's task fast (the bundled toy data).
RECIPES = {
    "mlm_nsp": [
        "--hidden-size",
        "32",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--intermediate-size",
        "64",
        "--max-length",
        "64",
        "--batch-size",
        "8",
    ],  # fmt: skip
    "text_classification": ["--batch-size", "4"],
    "ner": ["--batch-size", "4"],
    "qa": ["--batch-size", "4"],
    "causal_lm": ["--batch-size", "4"],
    "summarization": ["--batch-size", "4"],
    "asr_ctc": ["--batch-size", "4"],
}


def known(name: str, cuda: bool = False) -> set[str]:
    """Where recipe `name`'s steps may read: file paths as host_sync reports them (after site-packages/)."""
    return KNOWN | KNOWN_FOR.get(name, set()) | (KNOWN_ON_CUDA_FOR.get(name, set()) if cuda else set())


class Regression(RegressionTask):
    def targets(self, batch):  # without test_launch's bookkeeping (which reads every count)
        return {"mse": batch["valid"].sum()}


class MaskedRegression(Regression):
    def loss(self, model, batch):  # a boolean mask: a read in the forward and in the backward
        pred = model(batch["input_ids"])
        keep = batch["valid"].bool()
        return {"mse": ((pred[keep] - batch["target"][keep]) ** 2).sum()}, pred


def regression_trainer(task_class=Regression, **overrides) -> Trainer:
    options = dict(max_steps=100, batch_size=8, lr=0.1, log_every=3, tracker="none", **overrides)
    return trainer_for(TrainConfig(**options), task_class(regression_data()))


@pytest.mark.parametrize("overrides", [{}, {"grad_accum": 2, "save_every_minutes": 5.0}])
def test_the_loop_and_backend_read_nothing_back_during_steps(overrides):
    reads = count_step_reads(regression_trainer(**overrides), steps=7)
    assert not reads, reads


def test_a_read_planted_in_the_step_is_caught():
    reads = count_step_reads(regression_trainer(), steps=3, inject=lambda batch: batch["target"].sum().item())
    assert sum(reads.values()) == 3 and all("test_host_sync.py" in where for _, where in reads), reads
    reads = count_step_reads(regression_trainer(), steps=2, inject=lambda batch: batch["valid"].tolist())
    assert sum(reads.values()) == 2, reads
    reads = count_step_reads(regression_trainer(), steps=2, inject=lambda batch: batch["valid"].new_tensor(2))
    assert list(reads.values()) == [2] and next(iter(reads))[0] == "Tensor.new_tensor", reads


def test_a_read_in_the_backward_is_charged_to_the_forward_line_that_made_it():
    reads = count_step_reads(regression_trainer(MaskedRegression), steps=2)
    assert {what for what, _ in reads} == {"aten.index", "aten.index_put"}, reads  # forward, backward
    (where,) = {where for _, where in reads}
    assert "test_host_sync.py" in where and "(loss)" in where, reads


def recipe_trainer(name: str, tmp_path: Path, device: str, *extra: str) -> Trainer:
    """A recipe's own task and backend in this process (one rank), as `run_recipe` builds them."""
    recipe = importlib.import_module(f"recipes.{name}")
    config_class = next(v for k, v in vars(recipe).items() if k.endswith("Config") and v is not TrainConfig)
    argv = ["--output-dir", str(tmp_path), "--tracker", "none", "--max-steps", "50", "--log-every", "2"]
    cfg = parse_config(config_class, [*argv, *RECIPES[name], *extra])
    rt = Runtime(device=torch.device(device))
    task = recipe._build(cfg, rt, tmp_path)
    backend = make_backend(cfg.backend, rt, backend_settings(cfg, task.max_length))
    return Trainer(cfg, rt, backend, task)


def test_mlm_nsp_reads_nothing_and_with_full_rows_neither_does_transformers(tmp_path, tokenizer_dir):
    """The masked positions come from the host (`prepare`); padded batches keep transformers' mask check
    (one read per forward), batches of full rows carry no mask and make no read at all."""
    options = ("--tokenizer", str(tokenizer_dir), "--grad-accum", "2")
    reads = count_step_reads(recipe_trainer("mlm_nsp", tmp_path / "padded", "cpu", *options), steps=2)
    assert reads and all(k[1].startswith("transformers/masking_utils.py") for k in reads), reads
    full = recipe_trainer("mlm_nsp", tmp_path / "full", "cpu", *options, "--max-length", "16")
    assert not count_step_reads(full, steps=2)


@pytest.mark.parametrize("name", sorted(set(RECIPES) - {"mlm_nsp"}))
def test_recipe_steps_read_only_what_transformers_reads(name, tmp_path):
    reads = count_step_reads(recipe_trainer(name, tmp_path, "cpu"), steps=2)
    unknown = {k: n for k, n in reads.items() if not any(k[1].startswith(f) for f in known(name))}
    assert not unknown, unknown


def steps_under_sync_detection(trainer: Trainer, mode: str) -> None:
    """Two warm-up steps, then three under torch.cuda's sync detection (`mode` "warn" or "error") alone."""
    for _ in range(2):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        for _ in range(3):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_steps_on_cuda_make_no_unknown_sync(name, tmp_path):
    """torch.cuda's sync detection ("warn": each synchronising call becomes a warning attributed to the Python
    line that made it) around train_step alone, after two warm-up steps; every sync must be in
    `known(name, cuda=True)`. "error" would stop at transformers' own mask check before reaching the rest of
    the step."""
    trainer = recipe_trainer(name, tmp_path, "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps_under_sync_detection(trainer, "warn")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    allowed = known(name, cuda=True)
    unknown = [f"{w.filename}:{w.lineno}" for w in syncs if not any(w.filename.endswith(f) for f in allowed)]
    assert not unknown, unknown
    trainer.backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mlm_nsp_steps_of_full_rows_on_cuda_never_synchronise(tmp_path, tokenizer_dir):
    """Pretraining rows filled to --max-length (as a packed corpus gives): the step runs under torch's sync
    detection set to "error", so any wait for the device, ours or transformers', fails it."""
    options = ("--tokenizer", str(tokenizer_dir), "--grad-accum", "2", "--max-length", "16")
    trainer = recipe_trainer("mlm_nsp", tmp_path, "cuda", *options)
    steps_under_sync_detection(trainer, "error")
    torch.cuda.synchronize()
    trainer.backend.close()
