"""DeepSpeed ZeRO 1/2/3 on 2 CPU processes: the same first losses as DDP, exact resume after a SIGKILL
(ZeRO-2 and -3), resume on another world size, exports that load in `pipeline("fill-mask")`, both
launchers, no compiler, and config mistakes caught before any process starts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BIN, free_port
from recipe_runs import (
    RECIPE,
    command,
    export_checkpoint,
    losses,
    run,
    same_weights,
    sigkill_one_rank_after,
)

from recipebox.launch.config import ConfigError, TrainConfig
from recipebox.launch.deepspeed_config import build_deepspeed_config

pytestmark = pytest.mark.slow
STEPS = 16


def ds_command(out, tokenizer_dir, stage, *extra, nproc=2):
    return command(
        out, tokenizer_dir, "--backend", "deepspeed", "--zero-stage", str(stage), *extra,
        nproc=nproc, batch_size=32 // nproc, steps=STEPS,
    )  # fmt: skip


def ok(proc):
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("ddp") / "run"
    ok(run(command(out, tokenizer_dir, "--save-every", "0", batch_size=16, steps=STEPS)))  # losses only
    return out


@pytest.fixture(scope="module")
def ds_reference(tmp_path_factory, tokenizer_dir):
    """One uninterrupted run per stage. Stage 1 goes through the deepspeed launcher, with CXX pointing at
    nothing: no DeepSpeed op may need compiling on CPU."""
    made = {}

    def get(stage):
        if stage not in made:
            out = tmp_path_factory.mktemp(f"zero{stage}") / "run"
            cmd = ds_command(out, tokenizer_dir, stage)
            env = {}
            if stage == 1:
                port = str(free_port())
                cmd = [
                    str(BIN / "deepspeed"),
                    "--num_gpus",
                    "2",
                    "--master_port",
                    port,
                    *cmd[cmd.index(RECIPE) :],
                ]
                env = {"CXX": "/nonexistent/c++", "CC": "/nonexistent/cc"}
            ok(run(cmd, **env))
            made[stage] = out
        return made[stage]

    return get


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_like_ddp_and_exports_a_fill_mask_model(stage, ds_reference, ddp_reference):
    out = ds_reference(stage)
    ds, ddp = losses(out), losses(ddp_reference)
    assert sorted(ds) == list(range(1, STEPS + 1))
    for step in range(1, 5):  # same seed, same batches: only reduction order may differ
        assert ds[step] == pytest.approx(ddp[step], rel=1e-5), step
    manifest = json.loads((out / "checkpoints" / f"step-{STEPS:06d}" / "manifest.json").read_text())
    assert manifest["meta"]["state_format"] == "deepspeed"
    assert manifest["meta"]["deepspeed"] == {"zero_stage": stage}
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(out / "export"))
    assert len(fill("the [MASK] of the city")) == 5
    # The checkpoint alone exports the same weights, with no DeepSpeed process group.
    again = export_checkpoint(out / "checkpoints" / f"step-{STEPS:06d}", out.parent / "exported")
    assert same_weights(again, out / "export")


def test_a_deepspeed_checkpoint_whose_pickles_hold_code_is_refused_not_run(tmp_path, ds_reference):
    """DeepSpeed's loaders torch.load its files with weights_only=False; under recipebox every load is
    weights-only (DeepSpeed's own few state classes allowed), so a crafted file is refused, not run."""
    import shutil

    from test_checkpoints import RunsCode, replace_and_resize

    source = ds_reference(2) / "checkpoints" / f"step-{STEPS:06d}"
    path = tmp_path / source.name
    shutil.copytree(source, path)
    marker = tmp_path / "ran"
    model_file = "state/ds/mp_rank_00_model_states.pt"
    state = torch.load(path / model_file, weights_only=True)  # loads weights-only as it is
    import io

    buffer = io.BytesIO()
    torch.save({**state, "client_state": RunsCode(marker)}, buffer)
    replace_and_resize(path, model_file, buffer.getvalue())
    import sys

    proc = run([sys.executable, "-m", "recipebox.checkpoints", "export", str(path), str(tmp_path / "export")])
    assert proc.returncode == 2 and "posix.system is not allowed in a checkpoint" in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_then_the_same_command_continues_exactly(stage, tmp_path, tokenizer_dir, ds_reference):
    """Stages 2 and 3: ZeRO-1 saves and loads through the same DeepSpeed optimizer class and checkpoint code as
    ZeRO-2 (and the same code of ours for every stage); it trains and exports above."""
    reference = ds_reference(stage)
    out = tmp_path / "run"
    cmd = ds_command(out, tokenizer_dir, stage)
    latest = sigkill_one_rank_after(cmd, out, 5)
    assert latest in ("step-000004", "step-000008", "step-000012"), latest
    again = ok(run(cmd))
    assert "resumed from" in again.stdout and latest in again.stdout
    # Nothing for the user to act on: torch's deprecation of the collectives ZeRO-3 calls (several a step),
    # and ZeRO-3's hooks finding no tensors in the objective's output (DeepSpeed logs to stdout)
    printed = again.stdout + again.stderr
    assert "`torch.distributed.all_gather_into_tensor` is deprecated" not in printed
    assert "`torch.distributed.reduce_scatter_tensor` is deprecated" not in printed
    assert "unknown inputs or outputs" not in printed
    assert losses(out) == losses(reference)  # every step, bitwise
    assert same_weights(out / "export", reference / "export")


@pytest.mark.parametrize("stage", [2, 3])
def test_a_two_rank_checkpoint_resumes_on_one_rank(stage, tmp_path, tokenizer_dir, ds_reference):
    """DeepSpeed's universal checkpoint: one rank continues a 2-rank run's step 8, and training stays on course."""
    ckpt = ds_reference(stage) / "checkpoints" / "step-000008"
    resumed = tmp_path / "resumed"
    proc = ok(
        run(ds_command(resumed, tokenizer_dir, stage, "--resume", str(ckpt), "--export", "false", nproc=1))
    )
    assert "saved by 2 rank(s), resumed by 1" in proc.stdout
    got, ref = losses(resumed), losses(ds_reference(stage))
    assert sorted(got) == list(range(9, STEPS + 1))
    mean_ref, mean_got = sum(ref[s] for s in got) / len(got), sum(got.values()) / len(got)
    assert abs(mean_got - mean_ref) / mean_ref < 0.03  # other dropout and masking draws on one rank
    assert not list((resumed / "checkpoints").glob(".universal-*"))


def test_bf16_on_cpu_trains_and_exports_the_fp32_master_weights(tmp_path, tokenizer_dir, ds_reference):
    out = tmp_path / "run"
    ok(run(ds_command(out, tokenizer_dir, 2, "--precision", "bf16", "--max-steps", "8")))
    got, fp32 = losses(out), losses(ds_reference(2))
    assert all(got[s] == pytest.approx(fp32[s], rel=1e-3) for s in range(1, 5))
    assert any(got[s] != fp32[s] for s in range(1, 5))  # close to fp32, but computed in bf16
    again = export_checkpoint(out / "checkpoints" / "step-000008", tmp_path / "exported")
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float32 for v in load_file(out / "export" / "model.safetensors").values())
    assert same_weights(again, out / "export")  # tied aliases included


def test_config_mistakes_stop_before_any_process_group(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    proc = run(ds_command(tmp_path / "run", tokenizer_dir, 2, "--deepspeed-config", str(bad), nproc=1))
    assert proc.returncode == 2 and f"--deepspeed-config {bad}: not valid JSON" in proc.stderr
    assert "process group" not in proc.stderr.lower() and not (tmp_path / "run").exists()

    def cfg(**kw):
        return TrainConfig(backend="deepspeed", batch_size=8, **kw)

    contra = tmp_path / "contra.json"
    contra.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 4 but --batch-size is 8"):
        build_deepspeed_config(cfg(zero_stage=3, deepspeed_config=str(contra)), 2, "cpu")
    contra.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="8 x 1 x 2 = 16"):
        build_deepspeed_config(cfg(deepspeed_config=str(contra)), 2, "cpu")
    contra.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        build_deepspeed_config(cfg(deepspeed_config=str(contra)), 2, "cpu")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        build_deepspeed_config(cfg(precision="fp16"), 2, "cpu")
    with pytest.raises(ConfigError, match="offload moves state from GPU"):
        build_deepspeed_config(cfg(offload_optimizer=True), 2, "cpu")
    with pytest.raises(ConfigError, match="--zero-stage must be 1, 2 or 3"):
        build_deepspeed_config(cfg(zero_stage=4), 2, "cpu")
    agreeing = tmp_path / "agree.json"
    agreeing.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "zero_optimization": {"stage": 3, "contiguous_gradients": False},
            }
        )
    )
    ds = build_deepspeed_config(cfg(zero_stage=3, deepspeed_config=str(agreeing), grad_accum=2), 2, "cuda")
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 32
    assert ds["zero_optimization"] == {"stage": 3, "contiguous_gradients": False}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # auto on a GPU


def test_fp16_logs_the_loss_scale_and_skipped_steps_from_zeros_optimizers():
    """fp16 runs on GPUs only (the gpu test below reads the figures from a real run); here: the names it
    reads exist on DeepSpeed's ZeRO optimizers, and bf16 logs its skipped steps alone."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from recipebox.launch.backends import BackendSettings
    from recipebox.launch.deepspeed_backend import DeepSpeedBackend
    from recipebox.launch.runtime import Runtime

    assert isinstance(DeepSpeedZeroOptimizer.cur_scale, property)
    assert isinstance(DeepSpeedZeroOptimizer_Stage3.cur_scale, property)
    backend = DeepSpeedBackend(Runtime(), BackendSettings(precision="bf16"))
    backend.model = SimpleNamespace(skipped_steps=0, optimizer=SimpleNamespace(cur_scale=1.0))
    assert backend.log_metrics() == {"deepspeed/skipped_steps": 0}
    backend.half_dtype = torch.float16
    backend.model = SimpleNamespace(skipped_steps=3, optimizer=SimpleNamespace(cur_scale=2.0**13))
    assert backend.log_metrics() == {"deepspeed/skipped_steps": 3, "deepspeed/loss_scale": 8192.0}


def test_a_bf16_step_with_non_finite_gradients_is_skipped_and_counted_in_the_logs(monkeypatch):
    """ZeRO-2 in bf16 on one CPU process: a step whose gradients hold inf or NaN is skipped by DeepSpeed (its
    default check), so the weights stay as they were, and `deepspeed/skipped_steps` says so (DeepSpeed itself
    logs nothing); the next finite step trains again."""
    import torch.distributed as dist
    from test_launch import Regression, RegressionTask, regression_data

    from recipebox.launch.backends import backend_settings, make_backend
    from recipebox.launch.loop import Trainer
    from recipebox.launch.runtime import Runtime

    class Half(Regression):  # DeepSpeed runs the module in bf16: its inputs follow
        def forward(self, input_ids):
            return self.linear(input_ids.to(self.linear.weight.dtype)).float().squeeze(-1)

    class Blowup(RegressionTask):
        blow_up = False

        def loss(self, model, batch):
            terms, pred = super().loss(model, batch)
            return {"mse": terms["mse"] * (float("inf") if self.blow_up else 1.0)}, pred

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = TrainConfig(backend="deepspeed", zero_stage=2, precision="bf16", max_steps=10, batch_size=8, lr=0.1,
                      tracker="none")  # fmt: skip
    rt, task = Runtime(), Blowup(regression_data())
    task.model = task.trained = Half()
    trainer = Trainer(cfg, rt, make_backend("deepspeed", rt, backend_settings(cfg, task.max_length)), task)
    try:
        trainer.train_step()
        weights = trainer.backend.full_state_dict()
        task.blow_up = True
        trainer.train_step()
        assert trainer.backend.log_metrics() == {"deepspeed/skipped_steps": 1}
        for name, value in trainer.backend.full_state_dict().items():
            assert torch.equal(value, weights[name]), name
        task.blow_up = False
        trainer.train_step()
        assert trainer.backend.log_metrics() == {"deepspeed/skipped_steps": 1}
        assert any(not torch.equal(v, weights[k]) for k, v in trainer.backend.full_state_dict().items())
    finally:
        trainer.backend.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_offload_trains_with_the_same_groups_betas_and_decay_as_every_backend(monkeypatch):
    """Under offload DeepSpeed builds its CPU Adam from the config; it gets the loop's parameter groups (no
    decay on biases and norms), betas, eps and lr. (Offload runs on GPUs only: deepspeed.initialize is
    replaced here by a recorder, the rest of setup runs as is.)"""
    import deepspeed
    from transformers import BertConfig, BertForMaskedLM

    from recipebox.launch.backends import BackendSettings
    from recipebox.launch.deepspeed_backend import DeepSpeedBackend
    from recipebox.launch.loop import make_adamw
    from recipebox.launch.runtime import Runtime

    seen = {}

    def initialize(**kwargs):
        seen.update(kwargs)
        engine = type("Engine", (), {"module": kwargs["model"]})()
        return engine, None, None, None

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    model = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16))  # fmt: skip
    backend = DeepSpeedBackend(Runtime(), BackendSettings(lr=3e-4, weight_decay=0.05))
    backend.ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}  # as on a GPU
    try:
        backend.setup(model, lambda m: make_adamw(m, 3e-4, 0.05), lambda opt: None)
    finally:  # setup made a one-process group (a real engine, not made here, would have cached it)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    loop_groups = make_adamw(model, 3e-4, 0.05).param_groups
    ds_groups = seen["model_parameters"]
    assert seen["optimizer"] is None and seen["config"]["optimizer"]["type"] == "AdamW"
    assert [[id(p) for p in g["params"]] for g in ds_groups] == [
        [id(p) for p in g["params"]] for g in loop_groups
    ]
    assert [g["weight_decay"] for g in ds_groups] == [g["weight_decay"] for g in loop_groups] == [0.05, 0.0]
    params = seen["config"]["optimizer"]["params"]
    assert tuple(params["betas"]) == loop_groups[0]["betas"] and params["eps"] == loop_groups[0]["eps"]
    assert params["lr"] == loop_groups[0]["lr"] == 3e-4


def test_bf16_casts_float_model_inputs_and_leaves_labels_and_metadata():
    """DeepSpeed casts the module's weights, not keyword inputs: audio values must come in its dtype."""
    from recipebox.launch.backends import BackendSettings
    from recipebox.launch.deepspeed_backend import DeepSpeedBackend
    from recipebox.launch.runtime import Runtime

    batch = {
        "input_values": torch.randn(2, 8),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "labels": torch.rand(2, 3),
        "_scores": torch.rand(2),
    }
    placed = DeepSpeedBackend(Runtime(), BackendSettings(precision="bf16")).place_batch(batch)
    assert placed["input_values"].dtype == torch.bfloat16 and placed["attention_mask"].dtype == torch.long
    assert placed["labels"].dtype == placed["_scores"].dtype == torch.float32
    assert DeepSpeedBackend(Runtime(), BackendSettings(precision="fp32")).place_batch(batch) is batch


GPU_POINTS = {
    "fp16-loss-scaling": ["--zero-stage", "2", "--precision", "fp16"],
    "optimizer-offload": ["--zero-stage", "2", "--precision", "bf16", "--offload-optimizer", "true"],
    "zero3-param-offload": ["--zero-stage", "3", "--precision", "bf16", "--offload-optimizer", "true",
                            "--offload-params", "true"],
    # parameters alone in CPU memory: the client AdamW stays (no fused Adam to compile)
    "zero3-param-offload-only": ["--zero-stage", "3", "--precision", "bf16", "--offload-params", "true"],
}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("point", sorted(GPU_POINTS))
def test_gpu_only_options_train_save_and_resume(point, tmp_path, tokenizer_dir):
    """One GPU, one process: 4 steps and a checkpoint, then the same command continues to step 8 from it; the
    export holds fp32 weights (fp16: DeepSpeed's dynamic loss scale may skip a first step on overflow, so the
    losses are checked finite, not falling). Offload compiles DeepSpeed's CPU Adam on first use
    (scripts/gpu_check.sh builds it beforehand). Each run has 120 s: a hang fails its test, and the others
    still report, inside the check's time limit."""
    out = tmp_path / "run"
    flags = ["--backend", "deepspeed", *GPU_POINTS[point], "--check-replicas", "false"]
    ok(run(command(out, tokenizer_dir, *flags, "--max-steps", "4", nproc=1), timeout=120))
    again = ok(run(command(out, tokenizer_dir, *flags, "--max-steps", "8", nproc=1), timeout=120))
    assert "resumed from" in again.stdout and "step-000004" in again.stdout
    got = losses(out)
    assert sorted(got) == list(range(1, 9)) and all(v == v and v < 100 for v in got.values())
    logged = [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r
    ]
    if point.startswith("fp16"):  # the loss scale and the skipped steps, on every training log line
        assert all(r["deepspeed/loss_scale"] > 0 for r in logged), logged
        assert all(0 <= r["deepspeed/skipped_steps"] <= r["step"] for r in logged), logged
    else:
        assert not any("deepspeed/loss_scale" in r for r in logged)
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float32 for v in load_file(out / "export" / "model.safetensors").values())


def test_the_json_and_the_flags_agree_on_precision_and_offload_or_the_run_stops(tmp_path):
    """README: a key the JSON shares with a flag must agree with it. bf16/fp16 "enabled" did not: the flag
    won silently (bf16 false with --precision auto still trained in bf16). An offload block of the JSON
    (nvme, its buffers) is kept under --offload-optimizer; parameter offload alone keeps the client optimizer."""
    from recipebox.launch.deepspeed_config import offloads

    def build(json_config, **flags):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(json_config))
        cfg = TrainConfig(backend="deepspeed", batch_size=8, deepspeed_config=str(path), **flags)
        return build_deepspeed_config(cfg, 2, "cuda")

    def precision(ds):
        return [k for k in ("bf16", "fp16") if ds[k]["enabled"]] or ["fp32"]

    assert precision(build({"bf16": {"enabled": False}})) == ["fp32"]  # auto: the JSON's "no bf16" holds
    assert precision(build({"fp16": {"enabled": True}})) == ["fp16"]
    assert precision(build({})) == ["bf16"]
    auto = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}  # the Hugging Face template's values
    assert precision(build(auto, precision="bf16")) == ["bf16"] and precision(
        build(auto, precision="fp32")
    ) == ["fp32"]
    assert precision(build(auto, precision="bf16-pure")) == ["bf16"]  # DeepSpeed's bf16 is bf16-pure
    for json_config, flag, message in [
        ({"bf16": {"enabled": True}}, "fp16", "bf16.enabled is true but --precision is fp16"),
        ({"fp16": {"enabled": False}}, "fp16", "fp16.enabled is false but --precision is fp16"),
        ({"bf16": {"enabled": False}}, "bf16-pure", "bf16.enabled is false but --precision is bf16-pure"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "auto", "both true; DeepSpeed takes one"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build(json_config, precision=flag)
    nvme = {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 4}
    ds = build({"zero_optimization": {"offload_optimizer": nvme}}, offload_optimizer=True)
    assert ds["zero_optimization"]["offload_optimizer"] == {**nvme, "pin_memory": True} and offloads(ds)
    ds = build({}, zero_stage=3, offload_params=True)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu" and not offloads(ds)
