"""Backends: how a model, its optimizer and its schedule run across ranks, behind one small interface.

The loop only calls `setup` (which also gets the run's config), `autocast`, `accumulating`, `backward`,
`step`, `raw_model`, `checkpoint_state` and `full_state_dict`, so FSDP2, DeepSpeed or XLA slot in without a
recipe changing. This file holds the plain/DDP and FSDP2 backends; DeepSpeed and XLA live beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launch.config import ConfigError
from launch.runtime import Runtime


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for full fp32; refuses what the hardware cannot do."""
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_ok else None
    if precision == "bf16":
        if not bf16_ok:
            raise ConfigError(
                f"--precision bf16 asked for, but {device} has no bf16 support; use --precision fp32"
            )
        return torch.bfloat16
    if precision == "fp16":
        raise ConfigError("--precision fp16 is available with --backend deepspeed on a GPU; use bf16 here")
    raise ConfigError(f"unknown --precision {precision!r}; use auto, fp32 or bf16")


class DDPBackend:
    """One process: the model as is. Several: DistributedDataParallel, gradients all-reduced in backward."""

    name = "ddp"

    def __init__(self, runtime: Runtime, precision: str = "auto"):
        self.rt = runtime
        self.autocast_dtype = resolve_precision(precision, runtime.device)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    def setup(
        self,
        model: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        make_scheduler: Callable[[torch.optim.Optimizer], object],
        cfg=None,
    ) -> None:
        model = model.to(self.rt.device)
        self._raw = model
        if self.rt.world_size > 1:
            model = DistributedDataParallel(
                model, device_ids=[self.rt.device] if self.rt.device.type == "cuda" else None
            )
        self.model = model
        self.optimizer = make_optimizer(self._raw)
        self.scheduler = make_scheduler(self.optimizer)

    @property
    def raw_model(self) -> nn.Module:
        return self._raw

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.autocast_dtype)

    def accumulating(self, sync: bool):
        """Skip the gradient all-reduce on micro-steps that are not the last of an accumulation."""
        if sync or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> torch.Tensor | None:
        norm = None
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._raw.parameters(), max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def close(self) -> None:
        """Drop the DDP wrapper while the process group lives: its reducer, destroyed at interpreter exit
        after the group, can deadlock against gloo's worker thread (seen with torch 2.13 on CPU)."""
        self.model = None

    def checkpoint_state(self):
        """What writes and reads model + optimizer in a checkpoint (see checkpoints.sharded)."""
        from checkpoints.sharded import DCPState

        return DCPState(self.model, self.optimizer)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model's state, complete on every rank (for export)."""
        return self._raw.state_dict()


class FSDPBackend(DDPBackend):
    """FSDP2: every transformer layer and then the whole model `fully_shard`-ed over all ranks.

    Parameters, gradients and optimizer state are split across ranks; each layer is gathered just before
    it runs. The loop is unchanged: accumulation skips the reduce-scatter on inner micro-steps.
    """

    name = "fsdp"

    def setup(self, model, make_optimizer, make_scheduler, cfg=None) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.rt.world_size < 2:
            raise ConfigError(
                "--backend fsdp shards across ranks: launch with torchrun --nproc_per_node=2 or more"
            )
        model = model.to(self.rt.device)
        mesh = init_device_mesh(self.rt.device.type, (self.rt.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32)
        for layers in _layer_lists(model):
            for layer in layers:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self._raw = self.model = model
        self.optimizer = make_optimizer(model)
        self.scheduler = make_scheduler(self.optimizer)

    def autocast(self):
        return contextlib.nullcontext()  # FSDP2's MixedPrecisionPolicy casts parameters itself

    def accumulating(self, sync: bool):
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def close(self) -> None:
        pass

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self._raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )


def _layer_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks (encoder layers, decoder blocks): the usual unit of FSDP sharding."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and sum(1 for _ in m[0].parameters())
    ]


BACKENDS = ("ddp", "fsdp", "deepspeed", "xla")
# Backends that compile one graph per tensor shape: a recipe keeps its shapes independent of the data there
# (no boolean-mask indexing whose size changes every batch).
STATIC_SHAPE_BACKENDS = ("xla",)


def make_backend(name: str, runtime: Runtime, precision: str):
    """The backend named by --backend; DeepSpeed and torch_xla are imported only when asked for."""
    if name == "ddp":
        return DDPBackend(runtime, precision)
    if name == "fsdp":
        return FSDPBackend(runtime, precision)
    if name == "deepspeed":
        from launch.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(runtime, precision)
    if name == "xla":
        from launch.xla_backend import XLABackend

        return XLABackend(runtime, precision)
    raise ConfigError(f"unknown --backend {name!r}; available: {', '.join(BACKENDS)}")
