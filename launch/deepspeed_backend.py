"""DeepSpeed ZeRO 1/2/3 behind the backend interface: the recipe and the loop stay as they are.

The loop's AdamW and warmup schedule go to `deepspeed.initialize` as client objects (no fused op is
compiled; with offload on a GPU, DeepSpeed's CPU Adam is used instead). Accumulation boundaries are set
by the loop, so `step` runs once per optimizer step as under DDP. Checkpoints are DeepSpeed's own sharded
files, written by `DeepSpeedState` inside the atomic checkpoint folder of `checkpoints/`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from checkpoints.sharded import CheckpointError
from launch.deepspeed_config import build_deepspeed_config, offloads
from launch.runtime import Runtime

TAG = "ds"  # the one tag inside a checkpoint's state/ folder


def _import_deepspeed():
    """deepspeed, kept from compiling its shared-memory op on CPU (40 s, and fatal without a compiler):
    gloo does the same job."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(self, runtime: Runtime, precision: str = "auto"):
        self.rt, self.precision = runtime, precision
        self.model = self.optimizer = self.scheduler = None
        self.ds_config: dict | None = None

    def setup(self, model, make_optimizer, make_scheduler, cfg=None) -> None:
        deepspeed = _import_deepspeed()
        self.ds_config = build_deepspeed_config(cfg, self.rt.world_size, self.rt.device.type)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        if not dist.is_initialized():  # DeepSpeed always needs a group; one process gets its own
            dist.init_process_group(
                "nccl" if self.rt.device.type == "cuda" else "gloo",
                store=dist.HashStore(),
                rank=0,
                world_size=1,
            )
        os.environ.setdefault("LOCAL_RANK", str(self.rt.local_rank))  # DeepSpeed reads it, srun sets none
        model = model.to(self.rt.device)
        if offloads(self.ds_config):
            # A client optimizer cannot be offloaded: DeepSpeed's CPU Adam takes the same settings.
            self.ds_config["optimizer"] = {
                "type": "AdamW",
                "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": [0.9, 0.999]},
            }
            optimizer = None
            lr_scheduler = make_scheduler
        else:
            optimizer = make_optimizer(model)
            lr_scheduler = make_scheduler(optimizer)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.model, self.optimizer, self.scheduler = engine, optimizer, scheduler

    @property
    def raw_model(self):
        return self.model.module

    def autocast(self):
        return contextlib.nullcontext()  # bf16/fp16 are DeepSpeed's: the module itself runs in that dtype

    def accumulating(self, sync: bool):
        # ZeRO reduces (and partitions) gradients only at the boundary the loop marks.
        self.model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop has already divided by grad_accum

    def step(self, max_grad_norm: float):
        self.model.step()  # clipping (gradient_clipping), optimizer, schedule and zero_grad
        norm = self.model.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm)

    def current_lr(self) -> float:
        return self.model.get_lr()[0]

    def close(self) -> None:
        self.model = None

    def checkpoint_state(self):
        return DeepSpeedState(self)

    @contextlib.contextmanager
    def gathered_parameters(self):
        """Every parameter whole on every rank for the duration (ZeRO-3 partitions them)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.raw_model.parameters()), modifier_rank=None):
                yield list(self.raw_model.parameters())
        else:
            yield list(self.raw_model.parameters())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the fp32 weights of the whole model on every rank (for export), tied ones included."""
        masters = self._fp32_masters()
        with self.gathered_parameters():
            state = {k: v.detach().float().cpu().clone() for k, v in self.raw_model.state_dict().items()}
        # Tied weights appear under several names; every alias gets the master, or loading the 16-bit alias
        # last would overwrite it.
        first_name = {}
        for name, p in self.raw_model.named_parameters(remove_duplicate=False):
            first_name.setdefault(id(p), name)
            if first_name[id(p)] in masters and name in state:
                state[name] = masters[first_name[id(p)]].reshape(state[name].shape)
        return state

    def _fp32_masters(self) -> dict[str, torch.Tensor]:
        """Under bf16/fp16 the module holds 16-bit copies; the optimizer's fp32 masters are the weights."""
        if not (self.ds_config["bf16"]["enabled"] or self.ds_config["fp16"]["enabled"]):
            return {}
        from deepspeed.utils import safe_get_full_fp32_param

        # Every rank joins every gather (collective under ZeRO-3); names are the same on all ranks.
        return {
            name: safe_get_full_fp32_param(p).detach().float().cpu()
            for name, p in self.raw_model.named_parameters()
            if p.requires_grad
        }


class DeepSpeedState:
    """Model, optimizer and schedule in DeepSpeed's sharded format (`state/ds/*`), inside a checkpoint of
    `checkpoints/`, which adds the manifest, atomic rename and the `latest` pointer around it.

    The files are DeepSpeed's own torch.save pickles, read back only from this run's checkpoint folders;
    exporting one to a Hugging Face folder needs no DeepSpeed process group (see checkpoints/__main__.py).
    """

    format = "deepspeed"

    def __init__(self, backend: DeepSpeedBackend):
        self.backend = backend
        self.meta = {"deepspeed": {"zero_stage": backend.zero_stage}}

    def save(self, path: Path) -> None:
        self.backend.model.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def load(self, path: Path, meta: dict) -> None:
        engine, rt = self.backend.model, self.backend.rt
        same_world = meta.get("world_size") == rt.world_size
        saved_stage = meta.get("deepspeed", {}).get("zero_stage")
        if same_world and saved_stage not in (None, self.backend.zero_stage):
            raise CheckpointError(
                f"{path.parent}: saved with --zero-stage {saved_stage}, resumed with "
                f"{self.backend.zero_stage}; resume with the same stage"
            )
        if same_world:
            loaded, _ = engine.load_checkpoint(str(path), tag=TAG, load_lr_scheduler_states=True)
        else:
            loaded = self._load_universal(path, meta)
        if loaded is None:
            raise CheckpointError(f"{path.parent}: DeepSpeed could not load {path / TAG}")

    def _load_universal(self, path: Path, meta: dict):
        """Another world size: DeepSpeed's universal checkpoint, converted once into a sibling folder."""
        engine, rt = self.backend.model, self.backend.rt
        universal = path.parent.parent / f".universal-{path.parent.name}"
        if rt.is_main and not (universal / "done").is_file():
            shutil.rmtree(universal, ignore_errors=True)
            try:
                _convert_to_universal(path / TAG, universal / TAG)
            except Exception as err:  # DeepSpeed's converter raises bare asserts and KeyErrors
                shutil.rmtree(universal, ignore_errors=True)
                raise CheckpointError(
                    f"{path.parent}: saved by {meta.get('world_size')} rank(s) and DeepSpeed cannot convert it "
                    f"to {rt.world_size} ({type(err).__name__}: {err}); resume with "
                    f"{meta.get('world_size')} rank(s), or export it and start anew"
                ) from None
            (universal / "done").write_text("ok")
        if dist.is_initialized():
            dist.barrier()
        engine._config.load_universal_checkpoint = True
        try:
            loaded, _ = engine.load_checkpoint(str(universal), tag=TAG, load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False
        if dist.is_initialized():
            dist.barrier()
        if rt.is_main:
            shutil.rmtree(universal, ignore_errors=True)
        return loaded


def _convert_to_universal(source: Path, target: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    target.parent.mkdir(parents=True, exist_ok=True)
    args = SimpleNamespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        ds_to_universal.main(args)
