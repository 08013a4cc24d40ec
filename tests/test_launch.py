"""The runtime, config parsing and the shared loop in one process; and a 2-rank job whose ranks fail apart."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass

import pytest
import recipe_runs
import torch
from conftest import REPO
from torch import nn

from recipebox.launch.backends import BackendSettings, DDPBackend, resolve_precision
from recipebox.launch.config import ConfigError, TrainConfig, parse_config, save_config
from recipebox.launch.loop import Trainer, linear_schedule
from recipebox.launch.runtime import Runtime, read_environment
from recipebox.launch.tracking import Tracker, read_metrics


@dataclass
class DemoConfig(TrainConfig):
    train_files: str = "a.txt"
    max_length: int = 128
    lowercase: bool = True


def test_defaults_yaml_then_cli(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("lr: 0.1\nmax-length: 64\nlowercase: false\ntrain_files: [a.txt, b.txt]\n")
    cfg = parse_config(DemoConfig, ["--config", str(cfg_file), "--max-length", "32"])
    assert (cfg.lr, cfg.max_length, cfg.lowercase, cfg.train_files) == (0.1, 32, False, "a.txt,b.txt")
    cfg_file.write_text("lr: 3e-5\nweight_decay: 2e-2\n")  # YAML 1.1 reads these as text; they are floats
    cfg = parse_config(DemoConfig, ["--config", str(cfg_file)])
    assert (cfg.lr, cfg.weight_decay) == (3e-5, 0.02)
    assert parse_config(DemoConfig, []).max_length == 128
    save_config(cfg, tmp_path / "resolved.yaml")
    assert parse_config(DemoConfig, ["--config", str(tmp_path / "resolved.yaml")]) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: [1, 2]\n", "option 'lr' must be float"),
        ("max_lenght: 3\n", "unknown option.*max_lenght"),
        ("lr: 0.1\n  bad: indent\n", "not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("batch_size:\n", "option 'batch_size' has no value; give it one or delete the line"),
        ("lr: ~\n", "option 'lr' has no value"),
        ("lr: one\n", "option 'lr' must be float, got 'one'"),
        ("# caf\xe9\nlr: 0.1\n".encode("latin-1"), "is not UTF-8 text.*save it as UTF-8"),
    ],
)
def test_bad_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(DemoConfig, ["--config", str(path)])
    assert str(path) in str(err.value)


@pytest.mark.parametrize("backend", ["deepspeed", "xla"])
def test_async_save_is_refused_where_the_backend_saves_its_own_format(backend):
    from recipebox.launch.config import validate_train_config

    cfg = parse_config(DemoConfig, ["--async-save", "true", "--backend", backend])
    with pytest.raises(ConfigError, match=f"--async-save works with --backend ddp or fsdp.*{backend}"):
        validate_train_config(cfg)


@pytest.mark.parametrize(
    "backend, precision, message",
    [
        ("ddp", "fp16", "--precision fp16 is available with --backend deepspeed on a GPU"),
        ("fsdp", "fp16", "--precision fp16 is available with --backend deepspeed on a GPU"),
        ("xla", "bf16-pure", "--backend xla supports --precision auto, fp32, bf16, not 'bf16-pure'"),
    ],
)
def test_a_precision_the_backend_cannot_run_stops_at_validation(backend, precision, message):
    from recipebox.launch.config import validate_train_config

    cfg = parse_config(DemoConfig, ["--backend", backend, "--precision", precision])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(cfg)


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed here")
def test_backend_xla_without_torch_xla_names_the_xla_environment_before_reading_data(tmp_path):
    """The main environment has no torch_xla: the recipe stops at validation, exit 2, nothing written."""
    out = tmp_path / "run"
    recipe = str(REPO / "recipes" / "mlm_nsp.py")
    proc = recipe_runs.python(recipe, "--backend", "xla", "--output-dir", str(out), "--tracker", "none")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --backend xla needs torch_xla" in proc.stderr and ".venv-xla/bin/python" in proc.stderr
    assert "Traceback" not in proc.stderr and "data:" not in proc.stdout and not out.exists()


def test_resume_latest_naming_no_step_folder_stops_at_validation(tmp_path):
    """`--resume RUN/checkpoints/latest` whose step is gone (pruned, copied without it) or that names
    something else stops before the data is read; a pointer to a step folder passes."""
    from recipebox.launch.config import validate_train_config

    latest = tmp_path / "checkpoints" / "latest"
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    for named in ("step-000008", "../elsewhere", "garbage"):
        latest.write_text(named)
        cfg = parse_config(DemoConfig, ["--resume", str(latest), "--tracker", "none"])
        with pytest.raises(
            ConfigError, match=f"names '{re.escape(named)}', which is no step-\\* folder beside it"
        ):
            validate_train_config(cfg)
    latest.write_text("step-000004")
    validate_train_config(parse_config(DemoConfig, ["--resume", str(latest), "--tracker", "none"]))


def test_a_missing_wandb_package_is_named_before_anything_starts(monkeypatch):
    """A GPU node's environment built without wandb: the default tracker says what to do, not a traceback."""
    import importlib.util

    from recipebox.launch.config import validate_train_config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match="needs the wandb package: pip install wandb, or pass --tracker none"
    ):
        validate_train_config(parse_config(DemoConfig, []))
    validate_train_config(parse_config(DemoConfig, ["--tracker", "none"]))


def test_a_config_file_that_gives_a_key_twice_is_refused(tmp_path):
    """yaml keeps the last of two equal keys silently; a config that sets an option twice (in either
    spelling) names both lines instead. Nested mappings keep their own keys."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("max_steps: 5\nlr: 0.1\nmax-steps: 50\n")
    with pytest.raises(
        ConfigError, match=r"twice\.yaml: max-steps is given twice \(lines 1 and 3\); keep one"
    ):
        parse_config(DemoConfig, ["--config", str(twice)])
    once = tmp_path / "once.yaml"
    once.write_text("max_steps: 5\nlr: 0.1\n")
    assert parse_config(DemoConfig, ["--config", str(once)]).max_steps == 5


def test_missing_config_file_and_help(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(DemoConfig, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--help"])
    out = capsys.readouterr().out
    for flag in ("--max-steps", "--grad-accum", "--precision", "--tracker", "--train-files", "--lowercase"):
        assert flag in out


@pytest.mark.parametrize(
    "recipe, flags, message",
    [
        ("mlm_nsp", ["--lr", "-1"], "--lr must be above 0, got -1.0"),
        ("mlm_nsp", ["--lr", "nan"], "--lr must be above 0"),
        ("mlm_nsp", ["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
        ("mlm_nsp", ["--dropout", "1.5"], "--dropout must be a probability"),
        ("mlm_nsp", ["--mask-replace-prob", "0.8", "--random-replace-prob", "0.5"], "together at most 1"),
        ("causal_lm", ["--top-p", "1.5"], "--top-p must be above 0 and at most 1"),
        ("causal_lm", ["--temperature", "-1"], "--temperature must be 0 \\(greedy\\) or more"),
        ("causal_lm", ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        ("asr_ctc", ["--mask-time-prob", "2"], "--mask-time-prob must be a probability"),
        ("asr_ctc", ["--max-grad-norm", "-1"], "--max-grad-norm must be 0 \\(no clipping\\) or more"),
        ("ner", ["--backend", "fsdp"], "--backend fsdp shards across ranks: launch with torchrun"),
        ("mlm_nsp", ["--epochs", "inf"], "--epochs must be a finite number, 0 or more, got inf"),
        (
            "ner",
            ["--num-workers", "-1"],
            "--num-workers must be 0 \\(load in the training process\\) or more",
        ),
        ("summarization", ["--heads", "0"], "--heads must be at least 1, got 0"),  # was a ZeroDivisionError
        ("causal_lm", ["--n-head", "0"], "--n-head must be at least 1, got 0"),
        ("mlm_nsp", ["--num-heads", "0"], "--num-heads must be at least 1, got 0"),
        ("asr_ctc", ["--num-heads", "0"], "--num-heads must be at least 1, got 0"),
        ("summarization", ["--ffn", "0"], "--ffn must be at least 1, got 0"),
        ("mlm_nsp", ["--vocab-size", "0"], "--vocab-size must be at least 1, got 0"),
        ("text_classification", ["--pad-to-multiple-of", "0"], "--pad-to-multiple-of must be at least 1"),
        ("qa", ["--pad-to-length", "64"], "--pad-to-length 64 is shorter than --max-length 256"),
    ],
)
def test_options_the_run_cannot_take_stop_before_anything_starts(recipe, flags, message):
    """torch refuses some only at the first step (a negative lr, mask shares over 1), after the data and
    the model are built, and takes others (top-p 1.5 travels into the export): each stops at validation."""
    import importlib

    module = importlib.import_module(f"recipes.{recipe}")
    config_class = next(v for k, v in vars(module).items() if k.endswith("Config") and k != "TrainConfig")
    cfg = parse_config(config_class, ["--tracker", "none", *flags])
    with pytest.raises(ConfigError, match=message):
        module._validate(cfg)


def test_read_environment(monkeypatch):
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        # setenv first so monkeypatch restores the key even when read_environment() fills it in
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    assert read_environment() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "127.0.0.1")
    assert read_environment() == (3, 4, 1)
    import os

    assert os.environ["WORLD_SIZE"] == "4" and os.environ["MASTER_PORT"] == "20123"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # filled in by the call above
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_STEP_ID", "2")  # a second srun step of the same job: another port
    read_environment()
    assert os.environ["MASTER_PORT"] == str(20000 + (123 + 2 * 1009) % 12000)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert read_environment() == (1, 2, 1)  # torchrun's variables win


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError):
        resolve_precision("fp8", cpu)


def test_linear_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == sorted(lrs[:5]) and max(lrs) == pytest.approx(1.0)
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] == pytest.approx(1 / 8)


class Regression(nn.Module):
    """y = w.x + b."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.config = None

    def forward(self, input_ids):
        return self.linear(input_ids.float()).squeeze(-1)


class RegressionTask:
    """The smallest Task: squared error summed over rows whose `valid` is 1, one target per such row."""

    title, processor, lengths, max_length, examples, flops_per_token = "regression", None, None, 4, {}, 0.0

    def __init__(self, train, validation=None):
        self.model = self.trained = Regression()
        self.splits = {"train": train} if validation is None else {"train": train, "validation": validation}
        self.counted: list[int] = []  # targets per training micro-batch, as the loop asked for them

    def collate(self, rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def prepare(self, batch, generator):
        return batch

    def sizes(self, batch):
        return batch["input_ids"].shape[0], batch["input_ids"].shape[0]

    def targets(self, batch):
        self.counted.append(int(batch["valid"].sum()))
        return {"mse": batch["valid"].sum()}

    def loss(self, model, batch):
        pred = model(batch["input_ids"])
        return {"mse": (((pred - batch["target"]) ** 2) * batch["valid"]).sum()}, pred

    def evaluate(self, model, batch, pred, generate):
        return {
            "within_1": torch.stack([((pred - batch["target"]).abs() < 1).sum(), torch.tensor(len(pred))])
        }, []

    def summarize(self, records, means, split):
        return {"rmse": means["loss"] ** 0.5}

    def before_export(self, model):
        pass


def regression_data(n=64, every: int = 1):
    """Rows of y = w.x + b; with `every` > 1 only every such row counts (a target), like labelled tokens."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return [
        {"input_ids": x[i], "target": y[i], "valid": torch.tensor(float(i % every == 0))} for i in range(n)
    ]


def trainer_for(cfg, task):
    rt = Runtime()
    return Trainer(cfg, rt, DDPBackend(rt, BackendSettings(precision=cfg.precision)), task)


def run_regression(tmp_path, every=1, **overrides):
    options = dict(max_steps=40, batch_size=8, lr=0.1, warmup_ratio=0.0, weight_decay=0.0, log_every=1)
    cfg = TrainConfig(**{**options, **overrides})
    tracker = Tracker(tmp_path, enabled=True, use_wandb=False, project="t", name="t", config={})
    trainer = trainer_for(cfg, RegressionTask(regression_data(every=every), regression_data(16)))
    final = trainer.fit(tracker)
    tracker.finish()
    return trainer, final, read_metrics(tmp_path)


def test_loop_trains_logs_and_evaluates(tmp_path):
    trainer, final, records = run_regression(tmp_path)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5]) / 5
    assert final["eval/loss"] < 5.0 and records[-1]["eval/loss"] == final["eval/loss"]
    assert final["eval/rmse"] == pytest.approx(final["eval/loss"] ** 0.5)  # derived from the summed loss
    assert 0 < final["eval/within_1"] <= 1
    assert all(r["train/grad_norm"] > 0 for r in records if "train/loss" in r)
    assert all(r["train/samples_per_s"] > 0 for r in records if "train/loss" in r)
    # 64 samples, 8 a step: 40 steps end exactly at the end of the fifth epoch (index 4).
    assert (trainer.state.step, trainer.state.epoch, trainer.state.consumed) == (40, 4, 64)


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    big, _, _ = run_regression(tmp_path / "a", batch_size=8)
    acc, _, _ = run_regression(tmp_path / "b", batch_size=4, grad_accum=2)
    for p, q in zip(big.backend.raw_model.parameters(), acc.backend.raw_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulated_loss_is_normalised_over_every_target_of_the_step(tmp_path):
    """Micro-batches with different numbers of targets (a third of the rows count) still give the gradient of
    the whole step's sum over its count: a mean per micro-batch, averaged, would weigh targets unequally."""
    big, _, _ = run_regression(tmp_path / "a", every=3, batch_size=8, max_grad_norm=0.0)
    acc, _, _ = run_regression(tmp_path / "b", every=3, batch_size=4, grad_accum=2, max_grad_norm=0.0)
    pairs = list(zip(acc.task.counted[::2], acc.task.counted[1::2]))
    assert any(a != b for a, b in pairs), (
        "every step's micro-batches had equal counts: the check proves nothing"
    )
    for p, q in zip(big.backend.raw_model.parameters(), acc.backend.raw_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_stop_request_ends_at_a_step_boundary(tmp_path):
    cfg = TrainConfig(max_steps=50, batch_size=8, log_every=5)
    tracker = Tracker(tmp_path, enabled=False, use_wandb=False, project="t", name="t", config={})
    trainer = trainer_for(cfg, RegressionTask(regression_data()))
    rt = trainer.rt
    original = trainer.train_step

    def step_then_stop():
        result = original()
        if trainer.state.step == 3:
            rt.stop_requested = True
        return result

    trainer.train_step = step_then_stop
    assert trainer.fit(tracker) == {} and trainer.stopped
    assert trainer.state.step == 3


def test_one_process_votes_without_asking_its_group():
    """DeepSpeed gives one process a group of its own, nccl on a GPU, which has no CPU backend: the loop's
    stop vote must not all-reduce a host tensor there ("No backend type associated with device type cpu").
    A group of gloo on CUDA devices only stands in for it on a machine without a GPU."""
    import torch.distributed as dist

    dist.init_process_group("cuda:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        with pytest.raises(RuntimeError, match="device type cpu"):  # the group really has no CPU backend
            dist.all_reduce(torch.zeros(1))
        assert rt.distributed and rt.any_rank(True) and not rt.any_rank(False)
    finally:
        dist.destroy_process_group()


def test_a_repeated_stop_signal_is_one_stop_and_a_late_one_means_now(monkeypatch):
    """Slurm and torchrun both deliver the same SIGTERM a moment apart: that must still save first."""
    import os
    import signal
    import time as clock

    from recipebox.launch.runtime import Runtime

    old = signal.getsignal(signal.SIGUSR2)
    try:
        rt = Runtime()
        rt._install_signal_handlers(["SIGUSR2"])
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert rt.stop_requested
        later = clock.monotonic() + 6
        monkeypatch.setattr(clock, "monotonic", lambda: later)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_a_model_path_that_does_not_exist_is_named_before_anything_loads(tmp_path):
    from recipebox.launch.config import ConfigError
    from recipebox.launch.recipe import pretrained_source

    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=f"--model {missing}: no such folder"):
        pretrained_source(str(missing))
    assert pretrained_source("bert-base-cased") == "bert-base-cased"  # a hub name is left to the hub
    assert pretrained_source(str(tmp_path)) == str(tmp_path)


def test_a_length_or_vocabulary_the_model_cannot_take_is_a_config_error():
    """Absolute position tables bound the length (BERT, GPT-2's wpe, RoBERTa-style ones past the padding id,
    BART's past its offset, an encoder-decoder by its fewest); T5's relative and DeBERTa-v2's relative-only
    positions do not; a tokenizer with more ids than the embedding rows is refused."""
    import transformers as tf

    from recipebox.launch.recipe import check_model_fits

    tok = [0] * 100  # only len() is read
    small = dict(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=100
    )
    seq2seq = dict(d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, vocab_size=100,
                   decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=64)  # fmt: skip
    bounded = {
        "bert": tf.BertModel(tf.BertConfig(max_position_embeddings=64, **small)),
        "gpt2": tf.GPT2Model(tf.GPT2Config(vocab_size=100, n_positions=64, n_embd=8, n_layer=1, n_head=2)),
        "roberta": tf.RobertaModel(tf.RobertaConfig(max_position_embeddings=66, pad_token_id=1, **small)),
        "mpnet": tf.MPNetModel(tf.MPNetConfig(max_position_embeddings=66, pad_token_id=1, **small)),
        "bart": tf.BartModel(tf.BartConfig(**seq2seq)),
        "pegasus": tf.PegasusModel(tf.PegasusConfig(**seq2seq)),
    }
    for model in bounded.values():
        check_model_fits(model, tok, 64, "--max-length")
        with pytest.raises(
            ConfigError, match=r"^--max-length 65 is more than the model's 64 positions; lower it$"
        ):
            check_model_fits(model, tok, 65, "--max-length")
    t5 = tf.T5Model(tf.T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    deberta = tf.DebertaV2Model(
        tf.DebertaV2Config(
            max_position_embeddings=64, position_biased_input=False, relative_attention=True, **small
        )
    )
    for model in (t5, deberta):
        check_model_fits(model, tok, 4096, "--max-source-length")
    with pytest.raises(ConfigError, match="the tokenizer has 101 ids and the model embeds 100"):
        check_model_fits(bounded["bert"], [0] * 101, 8, "--max-length")


def test_text_rows_go_to_metrics_jsonl_and_a_wandb_table_but_not_to_summaries(tmp_path, monkeypatch):
    """A causal LM's generated samples ({prompt, continuation} rows) next to numbers: metrics.jsonl keeps
    them as rows, W&B (offline) gets a table, and the summary and `scalars` keep the numbers only."""
    import json

    import wandb

    from recipebox.launch.tracking import Tracker, scalars

    monkeypatch.setenv("WANDB_MODE", "offline")
    logged = []
    tracker = Tracker(tmp_path, enabled=True, use_wandb=True, project="t", name="t", config={})
    monkeypatch.setattr(tracker.run, "log", lambda metrics, step: logged.append(metrics))
    rows = [
        {"prompt": "Then,", "continuation": " the bright signal."},
        {"prompt": "Later, the", "continuation": " old mug."},
    ]
    tracker.log({"eval/perplexity": 9.5, "eval/samples": rows}, step=3)
    tracker.summary({"eval/perplexity": 9.5, "eval/samples": rows})
    summary = tracker.run.summary
    assert summary.get("eval/perplexity") == 9.5 and "eval/samples" not in summary.keys()
    tracker.finish()
    table = logged[0]["eval/samples"]
    assert isinstance(table, wandb.Table) and table.columns == ["prompt", "continuation"]
    assert table.data == [["Then,", " the bright signal."], ["Later, the", " old mug."]]
    # a summarization or speech table has three columns
    rows3 = [{"clip": "a.flac", "reference": "five", "transcript": "fife"}]
    tracker = Tracker(tmp_path / "asr", enabled=True, use_wandb=True, project="t", name="t", config={})
    monkeypatch.setattr(tracker.run, "log", lambda metrics, step: logged.append(metrics))
    tracker.log({"eval/samples": rows3}, step=1)
    tracker.finish()
    assert logged[1]["eval/samples"].columns == ["clip", "reference", "transcript"]
    assert logged[1]["eval/samples"].data == [["a.flac", "five", "fife"]]
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["eval/samples"] == rows and record["eval/perplexity"] == 9.5
    assert scalars(record) == {"step": 3, "time": record["time"], "eval/perplexity": 9.5}


@dataclass
class CommentedConfig(DemoConfig):
    max_length: int = 64
    prefix: str | None = None  # prepended to every text; default: none
    # fmt: off
    wrapped: bool = (
        True  # a comment that ruff moved inside the parentheses
    )  # and one after them
    # fmt: on
    percent: str = "5%"  # a share, like 5%


def test_field_comments_become_the_flags_help(capsys):
    from recipebox.launch.config import field_help

    helps = field_help(CommentedConfig)
    assert helps["lr"].startswith("AdamW's peak learning rate")  # TrainConfig's comment, inherited
    assert helps["wrapped"] == "a comment that ruff moved inside the parentheses and one after them"
    assert "max_length" not in helps and "train_files" not in helps
    with pytest.raises(SystemExit):
        parse_config(CommentedConfig, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--percent PERCENT a share, like 5% (default: '5%')" in out  # no crash on % in help
    assert "--prefix PREFIX prepended to every text; default: none --" in out  # no "(default: None)"
    assert "--wrapped {true,false} a comment that ruff moved" in out and "(default: true)" in out
    assert "--max-length MAX_LENGTH (default: 64)" in out  # the subclass's default


def test_a_number_option_out_of_range_is_a_usage_error(capsys):
    import argparse

    from recipebox.launch.config import number

    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--beams", type=number())
    parser.add_argument("--top-p", type=number(float, 0, 1))
    assert parser.parse_args(["--beams", "4", "--top-p", "0.9"]) == argparse.Namespace(beams=4, top_p=0.9)
    for argv, message in ((["--beams", "0"], "must be at least 1, got 0"),
                          (["--top-p", "1.5"], "must be from 0 to 1, got 1.5"),
                          (["--beams", "1.5"], "expected an integer, got '1.5'"),
                          (["--top-p", "nan"], "must be from 0 to 1, got nan")):  # fmt: skip
        with pytest.raises(SystemExit) as done:
            parser.parse_args(argv)
        assert done.value.code == 2 and f"argument {argv[0]}: {message}" in capsys.readouterr().err


# Each stops at its options (exit 2, usage and the reason) before any export is read: the folder need not exist.
BAD_PREDICTS = [
    ("ner", ["predict", "EXPORT", "  "], "the text is empty"),
    ("text_classification", ["predict", "EXPORT", "good", ""], "text 2 is empty"),
    ("mlm_nsp", ["predict", "EXPORT", "--text", ""], "--text is empty"),
    ("mlm_nsp", ["predict", "EXPORT", "--pair", "", "B follows."], "--pair: a sentence is empty"),
    ("qa", ["predict", "EXPORT", "Who?", "--context", "  "], "the context is empty"),
    ("qa", ["predict", "EXPORT", " ", "--context", "Ann rowed."], "the question is empty"),
    ("summarization", ["predict", "EXPORT", "A text.", "--file", "doc.txt"], "a text or --file FILE, not both"),
    ("causal_lm", ["predict", "EXPORT", ""], "the prompt is empty"),
    ("causal_lm", ["predict", "EXPORT", "Once", "--max-new-tokens", "-3"], "must be at least 1, got -3"),
    ("causal_lm", ["predict", "EXPORT", "Once", "--top-p", "1.5"], "must be from 0 to 1"),
    ("summarization", ["predict", "EXPORT", "A text.", "--num-beams", "0"], "must be at least 1, got 0"),
    ("summarization", ["predict", "EXPORT", " "], "the text is empty"),
    ("summarization", ["compare", "EXPORT", "--test-file", "t.jsonl", "--batch-size", "0"], "at least 1"),
    ("summarization", ["compare", "EXPORT", "--test-file", "t.jsonl", "--output", "no/such/c.csv"],
     "--output no/such/c.csv: the folder no/such does not exist"),
]  # fmt: skip


@pytest.mark.parametrize("name, argv, message", BAD_PREDICTS)
def test_predict_commands_stop_at_empty_texts_and_numbers_out_of_range(name, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"recipes.{name}").main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err


RECIPES = ["mlm_nsp", "text_classification", "ner", "qa", "causal_lm", "summarization", "asr_ctc"]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_option_has_help_and_predict_has_usage(name, capsys):
    import dataclasses
    import importlib

    from recipebox.launch.config import field_help

    module = importlib.import_module(f"recipes.{name}")
    (config,) = [v for k, v in vars(module).items() if k.endswith("Config") and v is not TrainConfig]
    helps = field_help(config)
    assert [f.name for f in dataclasses.fields(config) if not helps.get(f.name)] == []
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    commands = [line for line in module.__doc__.split("\nLaunch:\n")[1].splitlines() if line.strip()]
    assert commands and set(commands) <= set(out.splitlines())  # the docstring's commands keep their lines
    with pytest.raises(SystemExit) as done:
        module.main(["predict", "--help"])
    assert done.value.code == 0
    assert f"{name}.py predict" in capsys.readouterr().out


def test_a_run_folder_keeps_the_processor_of_the_model_it_was_made_for(tmp_path):
    """RUN/processor is made once and reused (resume); made from a pretrained --model, it records which, and
    a later run in the same folder that asks for another model stops instead of feeding it the old ids."""
    import contextlib

    from recipebox.launch.recipe import saved_processor

    class OneRank:
        is_main = True

        def main_process_first(self):
            return contextlib.nullcontext()

    made = []

    class Processor:
        def save_pretrained(self, folder):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "tokenizer.json").write_text("{}")

    def make():
        made.append(1)
        return Processor()

    run = tmp_path / "run"
    folder = saved_processor(OneRank(), run, make, lambda f: f, made_from="models/minilm")
    assert saved_processor(OneRank(), run, make, lambda f: f, made_from="models/minilm") == folder
    assert len(made) == 1
    with pytest.raises(ConfigError, match="was made from models/minilm, and this run asks for "
                       "bert-base-uncased.*pass a new --output-dir"):  # fmt: skip
        saved_processor(OneRank(), run, make, lambda f: f, made_from="bert-base-uncased")
    assert saved_processor(OneRank(), run, make, lambda f: f) == folder  # a tokenizer trained here: no record


def saving_trainer(run_dir, task_class=None, **overrides):
    """A regression Trainer (or one of `task_class`) with a run folder: it saves real checkpoints there."""
    options = dict(max_steps=10, batch_size=8, lr=0.1, warmup_ratio=0.0, weight_decay=0.0, log_every=5)
    cfg = TrainConfig(**{**options, **overrides})
    for folder in ("model_config", "processor"):  # what a recipe puts there, copied into each checkpoint
        (run_dir / folder).mkdir(parents=True, exist_ok=True)
    rt = Runtime()
    backend = DDPBackend(rt, BackendSettings(precision=cfg.precision))
    task = (task_class or RegressionTask)(regression_data(), regression_data(16))
    return Trainer(cfg, rt, backend, task, run_dir=run_dir)


def fit_logged(trainer, stop_at: int = 0):
    """fit() with metrics.jsonl in the run folder; a stop request after step `stop_at` (0: none)."""
    tracker = Tracker(trainer.run_dir, enabled=True, use_wandb=False, project="t", name="t", config={})
    trainer.resume()
    original = trainer.train_step

    def step():
        result = original()
        if trainer.state.step == stop_at:
            trainer.rt.stop_requested = True
        return result

    trainer.train_step = step
    final = trainer.fit(tracker)
    tracker.finish()
    trainer.rt.stop_requested = False
    return final


def test_a_resume_between_two_logs_logs_the_same_window_mean(tmp_path):
    """Stopped at step 3 of a 5-step log window: the resumed run's loss at steps 5 and 10 is the mean over
    the same steps as an uninterrupted run's, not over the steps since the resume."""
    fit_logged(saving_trainer(tmp_path / "whole"))
    fit_logged(saving_trainer(tmp_path / "split"), stop_at=3)
    fit_logged(saving_trainer(tmp_path / "split"))
    logged = {
        name: {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / name) if "train/loss" in r}
        for name in ("whole", "split")
    }
    assert sorted(logged["whole"]) == [5, 10] and sorted(logged["split"]) == [5, 10]
    for step in (5, 10):
        assert logged["split"][step] == pytest.approx(logged["whole"][step], rel=1e-6), step


def test_a_checkpoint_after_an_epochs_last_batch_starts_the_next_epoch(tmp_path):
    """64 rows, 8 a step: step 8 trains the epoch's last batch. Its checkpoint says epoch 1, sample 0 (it
    said epoch 0, sample 64: a resume on another world size re-dealt that finished epoch's last global batch,
    and trained some of its samples twice); the same world size continues bit for bit either way."""
    from recipebox.checkpoints.sharded import verify_checkpoint

    fit_logged(saving_trainer(tmp_path / "whole", log_every=1))
    fit_logged(saving_trainer(tmp_path / "split", log_every=1), stop_at=8)
    meta = verify_checkpoint(tmp_path / "split" / "checkpoints" / "step-000008")["meta"]
    assert (meta["epoch"], meta["consumed"]) == (1, 0)
    fit_logged(saving_trainer(tmp_path / "split", log_every=1))
    assert logged(tmp_path / "split", "train/loss") == logged(tmp_path / "whole", "train/loss")


def test_resume_path_starts_a_run_then_its_own_checkpoints_continue_it(tmp_path):
    """`--resume PATH` on a rerun or requeue of the same command: the run continues from its own newest
    checkpoint, not from PATH again (which would lose every step since)."""
    fit_logged(saving_trainer(tmp_path / "a", max_steps=4))
    start = tmp_path / "a" / "checkpoints" / "step-000004"
    fit_logged(saving_trainer(tmp_path / "b", resume=str(start)), stop_at=7)  # preempted at step 7
    again = saving_trainer(tmp_path / "b", resume=str(start))
    assert again.resume()["step"] == 7 and again.state.step == 7


def test_a_stop_during_the_final_evaluation_ends_the_run_resumable(tmp_path):
    """A stop signal after the last step (during the final save or evaluation) ends the run with its final
    checkpoint saved, instead of being ignored until the scheduler kills the export; the same command then
    evaluates without training."""
    trainer = saving_trainer(tmp_path / "run")
    evaluate = trainer.evaluate

    def evaluate_then_stop(*args, **kwargs):
        trainer.rt.stop_requested = True
        return evaluate(*args, **kwargs)

    trainer.evaluate = evaluate_then_stop
    assert fit_logged(trainer) == {} and trainer.stopped
    assert (tmp_path / "run" / "checkpoints" / "step-000010").is_dir()
    again = saving_trainer(tmp_path / "run")
    final = fit_logged(again)
    assert again.state.step == 10 and "eval/loss" in final and not again.stopped


def logged(run_dir, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def test_a_stop_during_an_evaluation_between_steps_ends_it_and_the_rerun_evaluates_that_step(tmp_path):
    """A stop signal during an --eval-every evaluation ends it before its next batch, the step is saved, and
    the rerun evaluates that step first: its losses and evaluations are those of an uninterrupted run."""
    fit_logged(saving_trainer(tmp_path / "whole", eval_every=4))
    trainer = saving_trainer(tmp_path / "split", eval_every=4)  # 16 validation rows: 2 batches of 8
    batches = []
    evaluate = trainer.task.evaluate

    def evaluate_then_stop(*args):  # the signal comes during the first batch of step 4's evaluation
        batches.append(trainer.state.step)
        trainer.rt.stop_requested = True
        return evaluate(*args)

    trainer.task.evaluate = evaluate_then_stop
    assert fit_logged(trainer) == {} and trainer.stopped
    assert batches == [4]  # its second batch never ran
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == "step-000004"
    assert logged(tmp_path / "split", "eval/loss") == {}
    again = saving_trainer(tmp_path / "split", eval_every=4)
    assert "eval/loss" in fit_logged(again) and not again.stopped
    for key in ("train/loss", "eval/loss", "eval/within_1"):
        split, whole = logged(tmp_path / "split", key), logged(tmp_path / "whole", key)
        assert sorted(split) == sorted(whole) and len(whole) >= 2, key
        assert split == pytest.approx(whole, rel=1e-6), key  # a log window cut by the stop: float sums


def test_a_stop_asked_for_before_a_due_evaluation_does_not_wait_for_it(tmp_path):
    trainer = saving_trainer(tmp_path / "run", eval_every=4)
    calls = []
    trainer.task.evaluate = lambda *args: calls.append(args)
    assert fit_logged(trainer, stop_at=4) == {} and trainer.stopped
    assert calls == [] and (tmp_path / "run" / "checkpoints" / "step-000004").is_dir()


def test_throughput_leaves_out_the_time_of_saves_and_evaluations(tmp_path, monkeypatch):
    """On a clock that a training micro-batch moves by 1 s and an evaluation batch by 100 s: samples/s is the
    samples over the training time alone, with saves and evaluations between two logs, and after a resume
    that evaluates first."""
    import types

    from recipebox.launch import loop

    clock = [0.0]
    monkeypatch.setattr(
        loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=lambda: 0.0)
    )

    class Timed(RegressionTask):
        def loss(self, model, batch):
            clock[0] += 1.0 if model.training else 100.0
            return super().loss(model, batch)

    options = dict(log_every=10, eval_every=5, save_every=3)
    fit_logged(saving_trainer(tmp_path / "whole", Timed, **options))
    assert logged(tmp_path / "whole", "train/samples_per_s") == {10: 8.0}  # 80 samples in 10 s of training
    fit_logged(saving_trainer(tmp_path / "split", Timed, **options), stop_at=5)  # saved before step 5's eval
    fit_logged(saving_trainer(tmp_path / "split", Timed, **options))  # which the rerun runs first
    assert logged(tmp_path / "split", "train/samples_per_s") == {10: 8.0}  # 40 samples in 5 s since


class SampledRegressionTask(RegressionTask):
    """Dropout in training and evaluation that samples (as sampled generation does), from the global RNGs;
    training also draws from Python's and numpy's (as wav2vec2's SpecAugment does)."""

    def loss(self, model, batch):
        import random

        import numpy as np

        pred = nn.functional.dropout(model(batch["input_ids"]), 0.5, training=model.training)
        if model.training:
            pred = pred + 0.01 * (np.random.rand() + random.random())
        return {"mse": (((pred - batch["target"]) ** 2) * batch["valid"]).sum()}, pred

    def evaluate(self, model, batch, pred, generate):
        import random

        import numpy as np

        drawn = torch.rand(len(pred)) + np.random.rand() + random.random()  # every global stream
        return {"sampled": torch.stack([(drawn < 1.5).sum(), torch.tensor(len(pred))])}, []


def test_evaluations_leave_the_training_randomness_alone(tmp_path):
    """Training with an evaluation every 2 steps takes the same steps as training with none: an evaluation
    leaves every global RNG stream as it found it, so a step's checkpoint can be taken before its evaluation."""
    runs = {}
    for every in (0, 2):
        trainer = saving_trainer(tmp_path / str(every), SampledRegressionTask, log_every=1, eval_every=every)
        trainer.rt.seed_ranks(0)  # torch's, Python's and numpy's generators
        fit_logged(trainer)
        runs[every] = logged(tmp_path / str(every), "train/loss")
    assert len(logged(tmp_path / "2", "eval/sampled")) == 5  # steps 2, 4, 6, 8 and the final one
    assert runs[0] == runs[2] and len(runs[0]) == 10


ENDING = """
import atexit, os, sys
from pathlib import Path

class TornDownLate:  # a native pool that aborts when the interpreter finalizes, as gloo's and Arrow's can
    def __del__(self):
        os.abort()

KEEP = TornDownLate()
atexit.register(lambda: Path(sys.argv[1]).write_text("atexit ran"))
print("the run's last line", end="")
if sys.argv[2] == "sys.exit":
    sys.exit(3)
from recipebox.launch.recipe import exit_quickly
exit_quickly(3)
"""


def test_a_finished_recipe_process_keeps_its_exit_code_past_a_teardown_that_aborts(tmp_path):
    """A recipe ends through `exit_quickly`: the atexit hooks run and the output is flushed, the interpreter's
    finalization, where a native pool's teardown can abort a finished process, does not."""

    def end(how):
        marker = tmp_path / how
        proc = recipe_runs.run([sys.executable, "-c", ENDING, str(marker), how], timeout=120)
        return proc, marker.read_text()

    proc, hooks = end("sys.exit")
    assert proc.returncode < 0 and proc.stdout == "the run's last line" and hooks == "atexit ran"  # the fault
    proc, hooks = end("exit_quickly")
    assert (proc.returncode, proc.stdout, hooks) == (3, "the run's last line", "atexit ran"), proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "failure, ends_with",
    [
        ("build", "error: {out}/corpus.txt: 10 tokens, fewer than one block of 64"),
        ("one_row", "error: 1 training sample(s) cannot be shared by 2 ranks: give more training data"),
        ("test_split", "OSError: [Errno 28] No space left on device (rank 0 writing the test predictions)"),
        ("bad_row", "error: rank 1: {out}/clip-"),
    ],
)
def test_a_failure_on_some_ranks_ends_the_job_with_its_message(tmp_path, failure, ends_with):
    """tests/rank_failures.py on 2 ranks: bad input found inside `main_process_first` (rank 0 first), a
    failure of rank 0 alone after training (in the test evaluation), and bad input that rank 1 alone reads
    during training. The job ends within seconds and says why; bad input found before training stops every
    rank alike (exit 2), with no rank left to find its peer gone."""
    out = tmp_path / "run"
    proc = recipe_runs.torchrun(str(REPO / "tests" / "rank_failures.py"), str(out), failure, timeout=120)
    assert proc.returncode != 0
    assert ends_with.format(out=out) in proc.stderr, proc.stderr[-3000:]
    if failure not in ("test_split", "bad_row"):  # every rank exits 2, none with a traceback of its own
        assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-3000:]
        assert "Connection closed by peer" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_stop_signal_on_one_rank_during_an_evaluation_ends_it_on_every_rank(tmp_path):
    """tests/rank_failures.py on 2 ranks: SIGUSR1 reaches rank 0 alone during the first of its 3 evaluation
    batches after step 1; both ranks leave the evaluation at the same batch, save step 1 and exit 75, and the
    same command then evaluates step 1 and trains to the end."""
    out = tmp_path / "run"
    script = str(REPO / "tests" / "rank_failures.py")
    proc = recipe_runs.torchrun(script, str(out), "signal_in_eval", timeout=120)
    assert proc.stderr.count("exitcode  : 75") == 2, proc.stderr[-3000:]
    assert "received SIGUSR1: stopping at the next step boundary" in proc.stdout
    assert "stopped at step 1 on request; checkpoint saved" in proc.stdout
    assert "rank 0 evaluated 1 batches" in proc.stdout and "rank 1 evaluated 1 batches" in proc.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step-000001"
    again = recipe_runs.torchrun(script, str(out), "none", timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "rank 0 evaluated 9 batches" in again.stdout  # 3+3 and 3 (test)
    assert sorted(r["step"] for r in read_metrics(out) if "eval/loss" in r) == [1, 2]


def test_the_model_must_hold_the_padded_length_where_batches_are_padded_past_max_length():
    """`ner.py --pad-to-length 1024` on a 512-position encoder stopped at the first batch; the check of the
    model's positions now gets the longest rows a batch can have, and names that flag."""
    from types import SimpleNamespace

    from recipebox.launch.recipe import padded_length

    assert padded_length(SimpleNamespace(max_length=256, pad_to_length=0)) == (256, "--max-length")
    assert padded_length(SimpleNamespace(max_length=256, pad_to_length=1024)) == (1024, "--pad-to-length")
    assert padded_length(SimpleNamespace(max_length=64)) == (64, "--max-length")
