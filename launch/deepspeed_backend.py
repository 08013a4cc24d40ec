"""DeepSpeed ZeRO 1/2/3 behind the backend protocol: the recipe and the loop stay as they are.

The loop's AdamW (same parameter groups, betas and decay as every backend) and its warmup schedule go to
`deepspeed.initialize` as client objects, so no fused op is compiled. With offload on a GPU, DeepSpeed's
CPU Adam takes the same groups, betas and decay. Accumulation boundaries are set by the loop, so `step`
runs once per optimizer step as under DDP. Checkpoints: `checkpoints.deepspeed.DeepSpeedState`.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.distributed as dist

from recipebox.checkpoints.deepspeed import DeepSpeedState, import_deepspeed
from recipebox.launch.backends import (
    ADAM_BETAS,
    ADAM_EPS,
    BackendSettings,
    cast_model_inputs,
    generating_module,
    param_groups,
)
from recipebox.launch.deepspeed_config import build_deepspeed_config, offloads
from recipebox.launch.runtime import Runtime


def offload_optimizer_config(settings: BackendSettings) -> dict:
    """The config optimizer DeepSpeed builds itself under offload (a client optimizer cannot be offloaded):
    AdamW with the betas, eps and lr every other backend uses; decay comes per group (see param_groups)."""
    params = {"lr": settings.lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay": 0.0}
    return {"type": "AdamW", "params": params}


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # DeepSpeed config section -> the module's dtype


class DeepSpeedBackend:
    name = "deepspeed"
    static_shapes = False

    def __init__(self, runtime: Runtime, settings: BackendSettings):
        self.rt, self.settings = runtime, settings
        self.device = self.data_device = runtime.device
        self.model = self.raw_model = self.optimizer = self.scheduler = None
        self.ds_config = build_deepspeed_config(settings, runtime.world_size, runtime.device.type)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        # The module's dtype under bf16/fp16 (DeepSpeed casts the weights), None under fp32.
        half = [dtype for key, dtype in HALF.items() if self.ds_config[key]["enabled"]]
        self.half_dtype = half[0] if half else None

    def setup(self, model, make_optimizer, make_scheduler) -> None:
        deepspeed = import_deepspeed()
        # ZeRO-3 gathers and reduce-scatters through torch collectives that torch deprecates; the notice is
        # for DeepSpeed, not the user, and it came several times a step.
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
            category=FutureWarning,
        )
        # DeepSpeed always needs a group; one process gets its own, kept to the end of the process: DeepSpeed
        # caches groups made from it (deepspeed.utils.groups), which a second engine here reuses.
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
            )
        os.environ.setdefault("LOCAL_RANK", str(self.rt.local_rank))  # DeepSpeed reads it, srun sets none
        model = model.to(self.device)
        if offloads(self.ds_config):
            self.ds_config["optimizer"] = offload_optimizer_config(self.settings)
            optimizer, lr_scheduler = None, make_scheduler
            parameters = param_groups(model, self.settings.weight_decay)
        else:
            optimizer = make_optimizer(model)
            lr_scheduler, parameters = make_scheduler(optimizer), None
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=parameters,
            lr_scheduler=lr_scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.model, self.raw_model, self.optimizer, self.scheduler = (
            engine,
            engine.module,
            optimizer,
            scheduler,
        )

    def wrap_collate(self, collate):
        return collate

    def place_batch(self, batch: dict) -> dict:
        """Float inputs (audio values) in the module's 16-bit dtype under bf16/fp16: DeepSpeed casts the weights,
        not keyword inputs. Labels and metadata keep theirs."""
        return batch if self.half_dtype is None else cast_model_inputs(batch, self.half_dtype)

    def autocast(self):
        return contextlib.nullcontext()  # bf16/fp16 are DeepSpeed's: the module itself runs in that dtype

    def accumulating(self, sync: bool):
        # The boundary the loop marks: ZeRO-1 reduces there only; ZeRO-2/3 reduce-scatter every micro-step
        # into their partitions and step at the boundary.
        self.model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop has already normalised the step's loss

    def step(self, max_grad_norm: float) -> torch.Tensor:
        self.model.step()  # clipping (gradient_clipping), optimizer, schedule and zero_grad
        norm = self.model.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):  # kept where it is: reading it here would wait for the device
            return norm.detach().float()
        return torch.tensor(float("nan") if norm is None else norm, dtype=torch.float32)

    def current_lr(self) -> float:
        return self.model.get_lr()[0]

    def to_data_device(self, tree):
        return tree

    def generate(self, **inputs) -> torch.Tensor:
        # ZeRO-3 gathers each layer's parameters collectively: every rank runs every forward of the longest.
        synced = self.zero_stage == 3 and self.rt.world_size > 1
        inputs = self.place_batch(inputs)
        return generating_module(self.raw_model).generate(**inputs, synced_gpus=synced)

    def checkpoint_state(self):
        return DeepSpeedState(self.model, self.zero_stage, self.rt.rank, self.rt.world_size)

    @contextlib.contextmanager
    def gathered_parameters(self):
        """Every parameter whole on every rank for the duration (ZeRO-3 partitions them)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.raw_model.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def full_state_dict(self, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """Collective: the fp32 weights of the whole model on every rank, tied ones included (ZeRO-3 gathers
        every parameter on every rank: DeepSpeed has no gather to one rank)."""
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
        if self.half_dtype is None:
            return {}
        from deepspeed.utils import safe_get_full_fp32_param

        # Every rank joins every gather (collective under ZeRO-3); names are the same on all ranks.
        return {
            name: safe_get_full_fp32_param(p).detach().float().cpu()
            for name, p in self.raw_model.named_parameters()
            if p.requires_grad
        }

    def log_metrics(self) -> dict[str, float]:
        """Under bf16 and fp16, the steps DeepSpeed skipped because a gradient held inf or NaN (it leaves the
        weights and the schedule where they were; the loop still counts the step, as the Trainer does), and
        under fp16 the dynamic loss scale. DeepSpeed skips bf16 steps too (ZeRO-1's bf16 optimizer and ZeRO-3
        on a gradient norm that is not finite; ZeRO-2 through `bf16.check_grad_overflow`, on by default, at
        the cost of kernels per gradient and a read from the device per step) and logs nothing when it does:
        here the count shows it."""
        if self.half_dtype is None:
            return {}
        figures = {"deepspeed/skipped_steps": int(self.model.skipped_steps)}
        fp16 = self.half_dtype == torch.float16
        scale = getattr(self.model.optimizer, "cur_scale", None) if fp16 else None  # ZeRO's, stages 1-3
        return figures if scale is None else {**figures, "deepspeed/loss_scale": float(scale)}

    def close(self) -> None:
        self.model = None
