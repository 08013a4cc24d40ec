"""Backends: how a model, its optimizer and its schedule run across ranks, behind one small interface.

The loop only calls `setup`, `autocast`, `accumulating`, `backward`, `step` and `raw_model`, so FSDP2,
DeepSpeed or XLA can slot in without a recipe changing. This file holds the plain and DDP backends.
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

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def make_backend(name: str, runtime: Runtime, precision: str):
    if name == "ddp":
        return DDPBackend(runtime, precision)
    raise ConfigError(f"unknown --backend {name!r}; available: ddp")
