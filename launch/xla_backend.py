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
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from checkpoints.sharded import DCPState
from kernels.buckets import BucketedCollate, bucket_lengths, parse_buckets
from launch.backends import _layer_lists
from launch.config import ConfigError
from launch.runtime import Runtime

WRAPPER = "_orig_module."  # the attribute under which SpmdFullyShardedDataParallel keeps the module


def _compile_count() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return data[0] if data else 0


class XLABackend:
    name = "xla"
    whole_batches = True  # a last partial batch would be one more shape to compile
    data_device = torch.device("cpu")  # batches are collated and prepared (masked) on the host

    def __init__(self, runtime: Runtime, precision: str = "auto"):
        if precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--backend xla supports --precision auto, fp32 or bf16, not {precision!r}")
        self.rt, self.precision = runtime, precision
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.buckets: list[int] = []
        self.mesh = None  # the SPMD device mesh (--xla-mode spmd)
        self._shapes: set[tuple] = set()
        self._warm: int | None = None  # compile count after the first step
        self._logged: dict | None = None  # the compile figures of the last training log line
        self._eval_compiles = 0  # graphs compiled by evaluation passes, kept out of the training figures
        self._last_micro = True

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self, model, make_optimizer, make_scheduler, cfg=None) -> None:
        import torch_xla
        import torch_xla.runtime as xr

        self.mode = getattr(cfg, "xla_mode", "spmd")
        if self.mode not in ("spmd", "replicas"):
            raise ConfigError(f"--xla-mode must be spmd or replicas, got {self.mode!r}")
        self.buckets = _buckets(cfg)
        if self.mode == "spmd":
            if self.rt.world_size > 1:
                raise ConfigError(
                    "--xla-mode spmd runs one process per host that drives all of its devices; "
                    "launch it without torchrun/srun tasks (one task per host)"
                )
            xr.use_spmd()  # before any XLA tensor exists
        self.device = torch_xla.device()
        self.rt.device = self.device
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
        self._seed = getattr(cfg, "seed", 0) * 1000 + self.rt.rank
        self._grad_accum = getattr(cfg, "grad_accum", 1)
        self._micro = 0
        _no_mask_peeking()
        if self.mode == "spmd":
            self._raw, self.model = self._wrap_fsdpv2(model)
        else:
            self._raw = self.model = model.to(self.device)
        # Evaluation hands outputs to metric code that indexes by data-dependent masks: on the device each
        # distinct mask would compile a graph, so outputs come to the host (one transfer per batch).
        self.model.register_forward_hook(functools.partial(_outputs_to_host_in_eval, backend=self))
        self.optimizer = make_optimizer(self.model)
        self.scheduler = make_scheduler(self.optimizer)

    def _start_replicas(self, xr) -> None:
        world = xr.world_size()
        if world > 1 and self.on_cpu:
            raise ConfigError(
                f"--xla-mode replicas with {world} replicas on CPU: torch_xla's collectives abort there "
                "(pytorch/xla#9089); use --xla-mode spmd with CPU_NUM_DEVICES=N, or run on TPU"
            )
        if world > 1:
            # torchrun/srun started a gloo group on the host; the loop's collectives need XLA tensors.
            if dist.is_initialized():
                dist.destroy_process_group()
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

            dist.init_process_group("xla", init_method="xla://")
            self.rt.rank, self.rt.world_size = xr.global_ordinal(), world

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
        layer_types = {type(layers[0]) for layers in _layer_lists(model)}
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
            self._shapes.add(tuple(batch["input_ids"].shape))
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
    @property
    def raw_model(self) -> nn.Module:
        return self._raw

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

    def step(self, max_grad_norm: float) -> torch.Tensor | None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        if self.mode == "replicas" and self.rt.world_size > 1:
            xm.reduce_gradients(self.optimizer)
        norm = None
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
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

    # -- state --------------------------------------------------------------------------------------------
    def checkpoint_state(self):
        return XLAState(self)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model on the host (SPMD shards gathered), names as in the unwrapped model."""
        return {_clean(k): v.cpu() for k, v in self.model.state_dict().items()}


def _buckets(cfg) -> list[int]:
    """--xla-buckets, else one --pad-to-length, else powers of two up to the recipe's --max-length."""
    text = getattr(cfg, "xla_buckets", "")
    if text:
        try:
            buckets = parse_buckets(text)
        except ValueError as err:
            raise ConfigError(f"--xla-buckets: {err}") from None
        longest = getattr(cfg, "max_length", 0)
        if longest and buckets[-1] < longest:  # a batch that long would stop the run when it comes
            raise ConfigError(
                f"--xla-buckets {text}: the largest bucket ({buckets[-1]}) is shorter than --max-length "
                f"{longest}; add a bucket of {longest} or lower --max-length to {buckets[-1]}"
            )
        return buckets
    if getattr(cfg, "pad_to_length", 0):
        return [cfg.pad_to_length]
    if getattr(cfg, "max_length", 0):
        return bucket_lengths(cfg.max_length)
    raise ConfigError("--backend xla pads batches to fixed lengths: give --xla-buckets, e.g. 64,128,256")


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


def _map_tensors(output, fn):
    """`output` (a tensor, a tuple, a ModelOutput or a recipe's namespace) with `fn` applied to its tensors."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return type(output)(fn(v) if isinstance(v, torch.Tensor) else v for v in output)
    fields = output if hasattr(output, "keys") else vars(output)  # ModelOutput mirrors items as attributes
    for key, value in list(fields.items()):
        if isinstance(value, torch.Tensor):
            fields[key] = fn(value)
    return output


def _replicated(value: torch.Tensor, mesh) -> torch.Tensor:
    import torch_xla.distributed.spmd as xs

    if value.ndim and value.device.type == "xla":
        xs.clear_sharding(value)
        xs.mark_sharding(value, mesh, (None,) * value.ndim)
    return value


def _outputs_to_host_in_eval(module, _args, output, *, backend: XLABackend):
    if module.training:
        return output
    import torch_xla

    before = _compile_count()
    if backend.mesh is not None:  # gathered inside the graph: fetching a sharded tensor compiles per call
        _map_tensors(output, functools.partial(_replicated, mesh=backend.mesh))
    torch_xla.sync()
    host = _map_tensors(output, torch.Tensor.cpu)
    backend._eval_compiles += _compile_count() - before
    return host


def _clean(name: str) -> str:
    return name.replace(WRAPPER, "")


def _rename(sd: dict, rename) -> dict:
    """A model or optimizer state dict from get_state_dict with its parameter names mapped (same tensors)."""
    if "param_groups" in sd:  # optimizer: {"state": {fqn: ...}, "param_groups": [{"params": [fqn...]}]}
        return {
            "state": {rename(k): v for k, v in sd["state"].items()},
            "param_groups": [{**g, "params": [rename(p) for p in g["params"]]} for g in sd["param_groups"]],
        }
    return {rename(k): v for k, v in sd.items()}


@contextlib.contextmanager
def _one_process_group():
    """DCP plans through torch.distributed; SPMD runs one process, so give it a gloo group of one."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class XLAState(DCPState):
    """Model + optimizer through DCP with the SPMD planners (each device's shard written as is), under the
    unwrapped model's names, so the checkpoint reads like any other backend's."""

    def __init__(self, backend: XLABackend):
        planners = (None, None)
        if backend.mode == "spmd":
            from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner, SPMDSavePlanner

            planners = (SPMDSavePlanner(), SPMDLoadPlanner())
        super().__init__(backend.model, backend.optimizer, planners=planners)
        self.backend = backend

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        import torch_xla
        from torch.distributed.checkpoint.state_dict import get_state_dict

        torch_xla.sync()
        with _one_process_group():
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": _rename(model_sd, _clean), "optim": _rename(optim_sd, _clean)}
            if self.backend.mode == "replicas":
                state = _to_host(state)
            dcp.save(state, checkpoint_id=path, planner=self.save_planner)

    def load(self, path: Path, meta) -> None:
        import torch.distributed.checkpoint as dcp
        import torch_xla
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        shardings = _param_shardings(self.model)
        with _one_process_group():
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            wrapped = {_clean(k): k for k in model_sd}
            state = {"model": _rename(model_sd, _clean), "optim": _rename(optim_sd, _clean)}
            # SPMDLoadPlanner reads only tensors whose every local shard is a slice of the whole (it fails on
            # some it classes as sharded but indexes with Ellipsis); the rest goes through host copies.
            sharded, rest = _split(state, _spmd_loadable if self.backend.mode == "spmd" else lambda t: False)
            if sharded:
                dcp.load(sharded, checkpoint_id=path, planner=self.load_planner)
            host = _to_host(rest)
            dcp.load(host, checkpoint_id=path)
            _merge(state, host)
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=_rename(state["model"], wrapped.__getitem__),
                optim_state_dict=_rename(state["optim"], lambda k: wrapped.get(k, k)),
            )
        _restore_shardings(shardings, self.optimizer)
        self.backend._micro = meta["step"] * self.backend._grad_accum
        torch_xla.sync()


def _param_shardings(model) -> list[tuple[torch.Tensor, object, str]]:
    """Each parameter with its SPMD sharding (op sharding and spec text), as the mesh wrapper placed it."""
    import torch_xla

    found = []
    for p in model.parameters():
        if p.device.type == "xla":
            spec = torch_xla._XLAC._get_xla_sharding_spec(p)
            if spec:
                found.append((p, torch_xla._XLAC._get_xla_op_sharding(p), spec))
    return found


def _restore_shardings(shardings, optimizer) -> None:
    """Loading through host copies leaves a tensor replicated, and a fresh optimizer state starts unsharded,
    while in the run that saved, the moments carry their parameter's sharding (propagated from the step's
    graph). Different shardings compile a different step graph, which sums in another order: put every
    parameter and its moments back on the parameter's sharding, so the resumed run runs the same graphs."""
    import torch_xla

    for p, op, spec in shardings:
        state = optimizer.state.get(p, {})
        same_shape = [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == p.shape]
        for t in (p, *same_shape):
            if t.device.type == "xla" and torch_xla._XLAC._get_xla_sharding_spec(t) != spec:
                torch_xla._XLAC._xla_clear_sharding(t)
                torch_xla._XLAC._xla_mark_sharding(t, op)


def _to_host(tree):
    if isinstance(tree, dict):
        return {k: _to_host(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_host(v) for v in tree]
    return tree.cpu() if isinstance(tree, torch.Tensor) else tree


def _spmd_loadable(t) -> bool:
    import torch_xla

    if not isinstance(t, torch.Tensor) or t.device.type != "xla":
        return False
    if torch_xla._XLAC._get_xla_sharding_spec(t) in ("", "{replicated}"):
        return False
    shards = torch_xla._XLAC._get_local_shard_replica_and_indices([t])[0]
    return all(indices is not Ellipsis for _, indices in shards)


def _split(tree: dict, take) -> tuple[dict, dict]:
    """Two nested dicts with the same keys: the tensor leaves `take` accepts, and everything else."""
    taken, rest = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            a, b = _split(value, take)
            if a:
                taken[key] = a
            if b:
                rest[key] = b
        elif take(value):
            taken[key] = value
        else:
            rest[key] = value
    return taken, rest


def _merge(tree, loaded) -> None:
    """Write what DCP loaded into host copies back into `tree`: tensors in place, other values replaced."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in list(items):
        if isinstance(loaded, dict) and key not in loaded:
            continue
        new = loaded[key]
        if isinstance(value, torch.Tensor):
            value.copy_(new.to(value.device))
        elif isinstance(value, dict | list):
            _merge(value, new)
        else:
            tree[key] = new
