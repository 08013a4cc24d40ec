"""The torch_xla backend (TPU pods; XLA on CPU for tests): SPMD + FSDPv2, or one process per chip.

`--xla-mode spmd` (the pod path): one process per host drives every device through a mesh whose single
axis is named `fsdp`; parameters, gradients and optimizer state are sharded over it
(`SpmdFullyShardedDataParallel`, one wrap per transformer layer) and each batch is split along its first
dimension, so --batch-size is the global batch. `--xla-mode replicas`: the classic data-parallel launch,
one process per chip, gradients all-reduced by torch_xla. Batches are padded to bucket lengths and only
whole batches train, so XLA compiles a bounded number of graphs; the count is logged as `xla/compiles`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from recipebox.checkpoints.xla import XLAState, clean_name
from recipebox.kernels.buckets import BucketedCollate
from recipebox.launch.backends import BackendSettings, grad_norm, layer_lists
from recipebox.launch.config import ConfigError, check_backend_precision
from recipebox.launch.runtime import Runtime


def _compile_count() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return data[0] if data else 0


class XLABackend:
    name = "xla"
    static_shapes = True  # whole batches only (a last partial one would be one more shape), no generate
    data_device = torch.device("cpu")  # batches are collated and prepared (masked) on the host

    def __init__(self, runtime: Runtime, settings: BackendSettings):
        check_backend_precision("xla", settings.precision)
        if settings.xla_mode not in ("spmd", "replicas"):
            raise ConfigError(f"--xla-mode must be spmd or replicas, got {settings.xla_mode!r}")
        if not settings.buckets:
            raise ConfigError("--backend xla pads batches to fixed lengths: give --xla-buckets, e.g. 64,128")
        self.rt, self.settings, self.mode = runtime, settings, settings.xla_mode
        self.precision, self.buckets = settings.precision, list(settings.buckets)
        self.model = self.raw_model = self.optimizer = self.scheduler = self.device = None
        self.mesh = None  # the SPMD device mesh (--xla-mode spmd)
        self._shapes: set[tuple] = set()
        self._warm: int | None = None  # compile count after the first step
        self._logged: dict | None = None  # the compile figures of the last training log line
        self._eval_compiles = 0  # graphs compiled by evaluation passes, kept out of the training figures
        self._last_micro = True

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self, model, make_optimizer, make_scheduler) -> None:
        import torch_xla
        import torch_xla.runtime as xr

        if self.mode == "spmd":
            if self.rt.world_size > 1:
                raise ConfigError(
                    "--xla-mode spmd runs one process per host that drives all of its devices; "
                    "launch it without torchrun/srun tasks (one task per host)"
                )
            xr.use_spmd()  # before any XLA tensor exists
        self.device = torch_xla.device()
        self.on_cpu = xr.device_type() == "CPU"
        if self.mode == "replicas":
            self._start_replicas(xr)
        self.autocast_dtype = (
            torch.bfloat16
            if self.precision == "bf16" or (self.precision == "auto" and xr.device_type() == "TPU")
            else None
        )
        # Dropout on the device draws from XLA's own RNG, reseeded from (seed, micro-step) before every
        # forward: a resumed run then draws the same masks without carrying XLA's running seed along.
        self._seed = self.settings.seed * 1000 + self.rt.rank
        self._micro = 0
        _no_mask_peeking()
        if self.mode == "spmd":
            self.raw_model, self.model = self._wrap_fsdpv2(model)
        else:
            self.raw_model = self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model)
        self.scheduler = make_scheduler(self.optimizer)

    def _start_replicas(self, xr) -> None:
        """One process per chip, started by torchrun or srun: the Runtime's ranks are the replicas. Gradients
        are averaged by XLA's own collectives (`reduce_gradients`); the loop's host-side sums stay on gloo."""
        world = xr.world_size()
        if world > 1 and self.on_cpu:
            raise ConfigError(
                f"--xla-mode replicas with {world} replicas on CPU: torch_xla's collectives abort there "
                "(pytorch/xla#9089); use --xla-mode spmd with CPU_NUM_DEVICES=N, or run on TPU"
            )
        if (xr.global_ordinal(), world) != (self.rt.rank, self.rt.world_size):
            raise ConfigError(
                f"--xla-mode replicas: torch_xla sees replica {xr.global_ordinal()} of {world}, the launcher "
                f"rank {self.rt.rank} of {self.rt.world_size}; start one process per chip with torchrun or srun"
            )

    def _wrap_fsdpv2(self, model: nn.Module):
        import numpy as np
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr
        from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
        from torch_xla.experimental.spmd_fully_sharded_data_parallel import (
            SpmdFullyShardedDataParallel as FSDPv2,
        )

        n = xr.global_runtime_device_count()
        self.mesh = xs.Mesh(np.arange(n), (n,), ("fsdp",))
        layer_types = {type(layers[0]) for layers in layer_lists(model)}
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_types)
        wrapped = FSDPv2(model, mesh=self.mesh, shard_output=_shard_output, auto_wrap_policy=policy)
        self.rt.print(
            f"xla: SPMD over {n} device(s), mesh axis fsdp, {len(layer_types)} layer type(s) wrapped"
        )
        return model, wrapped

    # -- data ---------------------------------------------------------------------------------------------
    def wrap_collate(self, collate):
        return BucketedCollate(collate, self.buckets)

    def place_batch(self, batch: dict) -> dict:
        """Host batch -> device; under SPMD each tensor is split along the batch over the fsdp axis."""
        if self.model.training:
            self._shapes.add(tuple(tuple(v.shape) for v in batch.values() if isinstance(v, torch.Tensor)))
        placed = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if self.mode == "spmd" and value.ndim:
                    import torch_xla.distributed.spmd as xs

                    xs.mark_sharding(value, self.mesh, ("fsdp",) + (None,) * (value.ndim - 1))
            placed[key] = value
        return placed

    # -- the step -----------------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("xla", dtype=self.autocast_dtype)

    def accumulating(self, sync: bool):
        import torch_xla.core.xla_model as xm

        self._last_micro = sync
        xm.set_rng_state((self._seed * 1_000_003 + self._micro) % 2**31)
        self._micro += 1
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        import torch_xla

        loss.backward()
        if not self._last_micro:
            torch_xla.sync()  # one graph per micro-step, not one per combination of micro-batch shapes

    def step(self, max_grad_norm: float) -> torch.Tensor:
        import torch_xla
        import torch_xla.core.xla_model as xm

        if self.mode == "replicas" and self.rt.world_size > 1:
            xm.reduce_gradients(self.optimizer)
        norm = grad_norm(self.model.parameters(), max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        torch_xla.sync()
        return norm

    def log_metrics(self) -> dict[str, float]:
        """Compilations so far; training's after the first step (evaluation's are counted apart, as they happen
        between training steps); the distinct training batch shapes."""
        total = _compile_count()
        if self._warm is None:  # warm-up: the first step and its log line
            self._warm = total
        self._logged = {
            "xla/compiles": total,
            "xla/compiles_after_warmup": total - (self._warm or total) - self._eval_compiles,
            "xla/eval_compiles": self._eval_compiles,
            "xla/batch_shapes": len(self._shapes),
        }
        return self._logged

    def close(self) -> None:
        """The figures of the last training log line (what the bounds are about), then the total, which adds
        evaluation and the export's transfers."""
        m = self._logged
        if self.rt.is_main and m is not None:
            print(
                f"xla: training compiled {m['xla/compiles'] - m['xla/eval_compiles']} graphs, "
                f"{m['xla/compiles_after_warmup']} after the first step; {m['xla/batch_shapes']} batch shape(s), "
                f"buckets {self.buckets}; {_compile_count()} in all with evaluation and export",
                flush=True,
            )

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def to_data_device(self, tree):
        """Eval losses and outputs to the host, one transfer per batch: metric code indexes by data-dependent
        masks, and on the device each distinct mask would compile a graph of its own."""
        import torch_xla

        before = _compile_count()
        if self.mesh is not None:  # gathered inside the graph: fetching a sharded tensor compiles per call
            _map_tensors(tree, functools.partial(_replicated, mesh=self.mesh))
        torch_xla.sync()
        host = _map_tensors(tree, torch.Tensor.cpu)
        self._eval_compiles += _compile_count() - before
        return host

    def generate(self, **inputs) -> torch.Tensor:
        raise ConfigError(
            "--backend xla evaluates loss and metrics from one forward; generation there recompiles per "
            "token and falls back to the host: generate from the export instead"
        )

    # -- state --------------------------------------------------------------------------------------------
    def checkpoint_state(self):
        def after_load(meta: dict) -> None:  # the dropout seeds continue from the saved step
            self._micro = meta["step"] * self.settings.grad_accum

        return XLAState(self.model, self.optimizer, self.mode == "spmd", after_load)

    def full_state_dict(self, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """The whole model on the host (SPMD shards gathered), names as in the unwrapped model."""
        return {clean_name(k): v.cpu() for k, v in self.model.state_dict().items()}


def _no_mask_peeking() -> None:
    """transformers skips an all-ones attention mask after reading it on the host (`mask.all()`): under XLA
    that is a device round trip in every forward and one more graph per shape, for a fast path (flash SDPA
    without a mask) XLA does not have. Always pass the mask instead."""
    from transformers import masking_utils

    for name in ("_ignore_bidirectional_mask_sdpa", "_ignore_causal_mask_sdpa"):
        if hasattr(masking_utils, name):
            setattr(masking_utils, name, lambda *args, **kwargs: False)


def _shard_output(output, mesh) -> None:
    """Split a layer's or model's main output along the batch (FSDPv2 needs the hint to stay data-parallel)."""
    import torch_xla.distributed.spmd as xs

    first = output[0] if isinstance(output, tuple) else getattr(output, "logits", None)
    if isinstance(first, torch.Tensor) and first.ndim:
        xs.mark_sharding(first, mesh, ("fsdp",) + (None,) * (first.ndim - 1))


def _map_tensors(tree, fn):
    """`tree` (tensors in tuples, lists, dicts, ModelOutputs or namespaces) with `fn` applied to its tensors."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple | list):
        return type(tree)(_map_tensors(v, fn) for v in tree)
    if isinstance(tree, dict) and not hasattr(tree, "to_tuple"):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if hasattr(tree, "keys") or hasattr(tree, "__dict__"):  # ModelOutput mirrors items as attributes
        fields = tree if hasattr(tree, "keys") else vars(tree)
        for key, value in list(fields.items()):
            fields[key] = _map_tensors(value, fn)
    return tree


def _replicated(value: torch.Tensor, mesh) -> torch.Tensor:
    import torch_xla.distributed.spmd as xs

    if value.ndim and value.device.type == "xla":
        xs.clear_sharding(value)
        xs.mark_sharding(value, mesh, (None,) * value.ndim)
    return value
