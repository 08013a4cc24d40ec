"""Backends: how a model, its optimizer and its schedule run across ranks, behind one written protocol.

`Backend` below is the whole contract: the loop calls these members and nothing else, so DDP, FSDP2,
DeepSpeed ZeRO and XLA slot in without a recipe changing. A backend gets its own typed `BackendSettings`
(never a recipe's config) and never changes the Runtime's ranks or device (DeepSpeed run alone starts a
process group of one, which DeepSpeed needs). `BACKENDS` is the one registry of names; the
CLI's choices come from it. This file holds the plain/DDP and FSDP2 backends; DeepSpeed and XLA live
beside it and are imported only when chosen.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recipebox.kernels.buckets import bucket_lengths, parse_buckets
from recipebox.launch.config import FP16_NEEDS_DEEPSPEED, FSDP_NEEDS_RANKS, ConfigError, TrainConfig
from recipebox.launch.runtime import Runtime, bf16_native

ADAM_BETAS = (0.9, 0.999)  # every backend's AdamW, DeepSpeed's CPU Adam under offload included
ADAM_EPS = 1e-8


@dataclass
class BackendSettings:
    """What a backend may know of the run: the shared training options, typed, and the task's lengths."""

    precision: str = "auto"  # auto | fp32 | bf16 | bf16-pure | fp16 (DeepSpeed on GPU)
    seed: int = 42
    batch_size: int = 32  # per process and micro-step (XLA SPMD: one process, so the global batch)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    lr: float = 5e-4
    weight_decay: float = 0.01
    zero_stage: int = 2
    deepspeed_config: str = ""
    offload_optimizer: bool = False
    offload_params: bool = False
    xla_mode: str = "spmd"
    compile: bool = False  # torch.compile the model's blocks in place (DDP, FSDP2)
    buckets: list[int] = field(default_factory=list)  # XLA: the padded lengths every batch is cut to


def backend_settings(cfg: TrainConfig, max_length: int) -> BackendSettings:
    """The backend's share of a run's options; `max_length` is the task's longest sequence (XLA buckets)."""
    shared = {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(BackendSettings) if hasattr(cfg, f.name)
    }
    buckets = xla_buckets(cfg.xla_buckets, max_length) if backend_class(cfg.backend).static_shapes else []
    return BackendSettings(**shared, buckets=buckets)


def xla_buckets(text: str, max_length: int) -> list[int]:
    """--xla-buckets, else powers of two up to the task's longest sequence (always the last bucket)."""
    if not text:
        return bucket_lengths(max_length)
    try:
        buckets = parse_buckets(text)
    except ValueError as err:
        raise ConfigError(f"--xla-buckets: {err}") from None
    if buckets[-1] < max_length:  # a batch that long would stop the run when it comes
        raise ConfigError(
            f"--xla-buckets {text}: the largest bucket ({buckets[-1]}) is shorter than --max-length "
            f"{max_length}; add a bucket of {max_length} or lower --max-length to {buckets[-1]}"
        )
    return buckets


class Backend(Protocol):
    """The members the loop uses; every backend defines all of them."""

    name: str  # its --backend value
    device: torch.device  # where the model, the loss and the optimizer live
    data_device: torch.device  # where batches are prepared (the host for XLA, else `device`)
    static_shapes: bool  # one compiled graph per shape: whole batches, bucketed lengths, no generate
    model: nn.Module  # what training and evaluation call (DDP / engine / SPMD wrapper)
    raw_model: nn.Module  # the module the recipe gave, unwrapped: its parameters (ddp under bf16-pure: an
    # fp32 copy of it, the master weights, while the recipe's module runs in bf16)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # saved and restored through state_dict

    def setup(self, model: nn.Module, make_optimizer: Callable, make_scheduler: Callable) -> None:
        """Place and wrap the model, then build optimizer and schedule for what was wrapped."""

    def wrap_collate(self, collate: Callable) -> Callable:
        """The collate the loaders use (XLA: padded to a bucket)."""

    def place_batch(self, batch: dict) -> dict:
        """A prepared batch onto the compute devices (XLA: sharded over the mesh); others: as is."""

    def autocast(self) -> ContextManager:
        """The mixed-precision context of a forward (a no-op where the backend casts parameters itself)."""

    def accumulating(self, sync: bool) -> ContextManager:
        """Around one micro-step; `sync` marks the last of a step, when gradients must be whole across ranks."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of an already normalised loss (no further scaling by accumulation)."""

    def step(self, max_grad_norm: float) -> torch.Tensor:
        """Clip (when > 0; DeepSpeed clips to the same value from its config), optimizer and schedule step,
        zero grads; the total gradient norm before clipping."""

    def current_lr(self) -> float:
        """The learning rate of the first parameter group."""

    def to_data_device(self, tree: Any) -> Any:
        """Eval losses and outputs (tensors in any nesting) to `data_device`, where metrics are counted."""

    def generate(self, **inputs) -> torch.Tensor:
        """Collective: `generate` on the raw model in lockstep on every rank (sharded weights gathered)."""

    def checkpoint_state(self) -> Any:
        """The object that writes and reads model + optimizer in a checkpoint (see checkpoints/)."""

    def full_state_dict(self, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """Collective: the whole model's fp32 state under the raw model's names, on the host of rank 0 (the
        export); on every rank's with `every_rank` (the replica check). Other ranks may get {} otherwise."""

    def log_metrics(self) -> dict[str, float]:
        """Backend figures for each training log line (XLA's compile counts); may be empty."""

    def close(self) -> None:
        """Release wrappers while the process group lives; print a closing summary if any."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for full fp32; refuses what the hardware cannot do."""
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "auto":  # bf16 where the GPU has it in hardware: emulated (V100, T4) is slower than fp32
        native = device.type == "cuda" and bf16_native()
        return torch.bfloat16 if native else None
    if precision in ("bf16", "bf16-pure"):
        if not bf16_ok:
            raise ConfigError(
                f"--precision {precision} asked for, but {device} has no bf16 support; use --precision fp32"
            )
        return torch.bfloat16
    if precision == "fp16":
        raise ConfigError(FP16_NEEDS_DEEPSPEED)
    raise ConfigError(f"unknown --precision {precision!r}; use auto, fp32, bf16 or bf16-pure")


def cast_model_inputs(batch: dict, dtype: torch.dtype) -> dict:
    """The float tensors the model takes (audio values) in `dtype`; labels and a task's `_`-prefixed metadata
    keep theirs. For a backend whose module runs in a 16-bit dtype itself, without autocast."""

    def model_float(key: str, value) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and key != "labels"
            and key[:1] != "_"
        )

    return {k: v.to(dtype) if model_float(k, v) else v for k, v in batch.items()}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups on every backend: no decay on biases and norm weights (the BERT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def grad_norm(parameters, max_grad_norm: float) -> torch.Tensor:
    """Clip to `max_grad_norm` when it is positive; the total norm either way (for train/grad_norm)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def _dense(t: torch.Tensor) -> bool:
    """Whether `t` covers its memory without gaps or overlaps, in some order of its dimensions."""
    return t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d))).is_contiguous()


class DDPBackend:
    """One process: the model as is. Several: DistributedDataParallel, gradients all-reduced in backward.

    Under bf16 the forward runs in autocast: fp32 weights, cast to bf16 for each matmul, with layer norms,
    residual adds and their activations in fp32. Under bf16-pure the model the recipe gave is cast to bf16
    in place (the twin: the task's references to it and its modules run in bf16) and runs without autocast,
    so all of that is bf16, as under FSDP2 and DeepSpeed; `raw_model` is an fp32 copy made first, the master
    weights that clipping, the optimizer, checkpoints and the export see. The twin's bf16 gradients
    become the masters' fp32 ones at each step, summed over micro-steps and averaged across ranks in fp32
    (`_stash_grads`, `_all_reduce_fp32`), and the stepped masters are copied back into the twin.
    """

    name = "ddp"
    static_shapes = False

    def __init__(self, runtime: Runtime, settings: BackendSettings):
        self.rt, self.settings = runtime, settings
        self.device = self.data_device = runtime.device
        self.autocast_dtype = resolve_precision(settings.precision, runtime.device)
        self.model = self.raw_model = self.compute_model = self.optimizer = self.scheduler = None
        self.twin: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None  # (bf16, fp32 master)
        self.earlier: dict[nn.Parameter, torch.Tensor] = {}  # bf16-pure: the step's micro-steps so far, fp32

    def setup(self, model: nn.Module, make_optimizer: Callable, make_scheduler: Callable) -> None:
        self.raw_model = self.compute_model = model.to(self.device)
        if self.settings.precision == "bf16-pure":
            self._make_twin(model)
        if self.settings.compile:
            compile_blocks(self.compute_model)
        self.model = self.compute_model
        if self.rt.world_size > 1:
            self.model = DistributedDataParallel(
                self.compute_model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
            if self.twin is not None:
                self.model.register_comm_hook(self, DDPBackend._all_reduce_fp32)
        self.optimizer = make_optimizer(self.raw_model)
        self.scheduler = make_scheduler(self.optimizer)

    def wrap_collate(self, collate: Callable) -> Callable:
        return collate

    def place_batch(self, batch: dict) -> dict:
        return batch if self.twin is None else cast_model_inputs(batch, torch.bfloat16)

    def autocast(self):
        if self.autocast_dtype is None or self.twin is not None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def accumulating(self, sync: bool):
        micro_step = contextlib.ExitStack()
        if not sync:
            if isinstance(self.model, DistributedDataParallel):
                micro_step.enter_context(self.model.no_sync())
            if self.twin is not None:  # after its backward, on leaving
                micro_step.callback(self._stash_grads)
        return micro_step

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> torch.Tensor:
        if self.twin is not None:
            self._grads_to_masters()
        norm = grad_norm(self.raw_model.parameters(), max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.refresh_twin()
        return norm

    @torch.no_grad()
    def _make_twin(self, model: nn.Module) -> None:
        """bf16-pure: fp32 masters copied from `model` (whatever dtype it was loaded in; ties stay tied), rank
        0's on every rank as DDP would make them, then `model`'s own parameters turned into their bf16
        copies in place, so the task's references to it and its modules run the twin. Buffers keep their
        dtype (rotary frequencies, logit biases), as FSDP2's MixedPrecisionPolicy leaves them."""
        self.raw_model = copy.deepcopy(model).to(torch.float32)
        if self.rt.world_size > 1:
            for t in [*self.raw_model.parameters(), *self.raw_model.buffers()]:
                torch.distributed.broadcast(t, src=0)
        for low in model.parameters():
            low.data = low.data.to(torch.bfloat16)
        self.twin = (list(model.parameters()), list(self.raw_model.parameters()))
        self.refresh_twin(buffers=True)

    @torch.no_grad()
    def _stash_grads(self) -> None:
        """bf16-pure, leaving a micro-step before the step's last: its bf16 gradients added to fp32 sums and
        dropped, so a step's micro-steps add up in fp32 (as FSDP2's fp32 gradients do), not in bf16. The last
        micro-step's gradients join these sums in the all-reduce (several ranks) or on their way to the
        masters (one)."""
        for low in self.twin[0]:
            if low.grad is not None:
                if low in self.earlier:
                    self.earlier[low].add_(low.grad)
                else:
                    self.earlier[low] = low.grad.float()
                low.grad = None

    def _all_reduce_fp32(self, bucket):  # no annotation: DDP checks it, and this module's are strings
        """DDP's comm hook under bf16-pure: a bucket of bf16 gradients, plus the fp32 sums of the step's
        earlier micro-steps, averaged across ranks in fp32 and rounded to bf16 once, not at every micro-step
        and every step of the reduction (FSDP2 here reduces in fp32 too); an all-reduce moves what an fp32
        model's does."""
        grads = bucket.buffer()
        total = grads.float()
        if self.earlier:
            slots, sums = [], []
            for grad, param in zip(bucket.gradients(), bucket.parameters()):
                if param in self.earlier:
                    # The reducer lays a dense parameter's slot out with the parameter's strides; `gradients()`
                    # views each slot row-major, so only its offset is taken.
                    stride = param.stride() if _dense(param) else grad.stride()
                    offset = grad.storage_offset() - grads.storage_offset()
                    slots.append(total.as_strided(param.size(), stride, offset))
                    sums.append(self.earlier.pop(param))
            if slots:
                torch._foreach_add_(slots, sums)
        total.div_(self.rt.world_size)
        work = torch.distributed.all_reduce(total, async_op=True)
        return work.get_future().then(lambda fut: grads.copy_(fut.value()[0]))

    @torch.no_grad()
    def _grads_to_masters(self) -> None:
        """bf16-pure: the twin's bf16 gradients become the masters' fp32 ones in one foreach copy (a few
        multi-tensor kernels on a GPU, not a cast kernel per parameter), into new tensors laid out as the
        masters are (fused AdamW wants a gradient's strides to be its parameter's), freed with the gradients
        after the step: no fp32 gradient is held through the next forward and backward. With one process
        and accumulation, the last micro-step's gradients are added to the fp32 sums of the earlier ones,
        which become the masters' gradients. A parameter the step did not reach keeps no gradient, as
        without the twin."""
        earlier, self.earlier = self.earlier, {}
        if earlier and self.rt.world_size > 1:  # the comm hook takes every sum it all-reduces
            names = [n for n, p in self.compute_model.named_parameters() if p in earlier]
            raise RuntimeError(
                f"bf16-pure: the last micro-step of the step never reached {', '.join(names)}, so their "
                "gradients were not all-reduced; DDP needs every trained parameter in every micro-step"
            )
        # The masters have no gradient here (the last step's zero_grad set them to None).
        summed = [(low, master) for low, master in zip(*self.twin) if low in earlier]
        if summed:
            last = [low for low, _ in summed if low.grad is not None]
            if last:
                torch._foreach_add_([earlier[low] for low in last], [low.grad for low in last])
            for low, master in summed:
                master.grad = earlier[low]
        fresh = [
            (low, master) for low, master in zip(*self.twin) if low.grad is not None and low not in earlier
        ]
        if fresh:
            grads = [torch.empty_like(master) for _, master in fresh]
            torch._foreach_copy_(grads, [low.grad for low, _ in fresh])
            for (_, master), grad in zip(fresh, grads):
                master.grad = grad
        for low in self.twin[0]:
            low.grad = None

    @torch.no_grad()
    def refresh_twin(self, buffers: bool = False) -> None:
        """bf16-pure: the master weights into the bf16 twin after a step; with `buffers`, after the masters
        were made or loaded from a checkpoint, their buffers too."""
        if self.twin is None:
            return
        torch._foreach_copy_(*self.twin)
        if buffers:
            self.earlier = {}  # a step cut short leaves nothing for the next
            for low, master in zip(self.compute_model.buffers(), self.raw_model.buffers()):
                low.copy_(master)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def to_data_device(self, tree):
        return tree

    def generate(self, **inputs) -> torch.Tensor:
        with self.autocast():
            return generating_module(self.compute_model).generate(**inputs)

    def checkpoint_state(self):
        from recipebox.checkpoints.sharded import DCPState

        if self.twin is not None:  # the fp32 masters, under the same names as without the twin
            return DCPState(
                self.raw_model, self.optimizer, after_load=lambda: self.refresh_twin(buffers=True)
            )
        return DCPState(self.model, self.optimizer)

    def full_state_dict(self, every_rank: bool = False) -> dict[str, torch.Tensor]:
        return self.raw_model.state_dict()

    def log_metrics(self) -> dict[str, float]:
        return compile_figures() if self.settings.compile else {}

    def close(self) -> None:
        """Drop the DDP wrapper while the process group lives: its reducer, destroyed at interpreter exit
        after the group, can deadlock against gloo's worker thread (seen with torch 2.13 on CPU)."""
        self.model = None


class FSDPBackend(DDPBackend):
    """FSDP2: each outermost transformer layer, then the whole model, `fully_shard`-ed over all ranks.

    Parameters, gradients and optimizer state are split across ranks; each layer is gathered just before it
    runs. Embeddings and heads stay in the root group, so tied weights are never split between groups.
    """

    name = "fsdp"

    def setup(self, model: nn.Module, make_optimizer: Callable, make_scheduler: Callable) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        if self.rt.world_size < 2:
            raise ConfigError(FSDP_NEEDS_RANKS)
        model = model.to(self.device)
        if (
            self.settings.compile
        ):  # before sharding, as torchtitan does: FSDP2's hooks stay outside the graphs
            compile_blocks(model)
        mesh = init_device_mesh(self.device.type, (self.rt.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32)
        for layers in layer_lists(model):
            for layer in layers:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
        generating = _find_generating(model)
        if generating is not None and generating is not model:  # a task's wrapper around its HF model
            fully_shard(generating, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        if generating is not None:  # FSDP2 gathers a module's parameters around forward only
            register_fsdp_forward_method(generating, "generate")
        for m in model.modules():  # transformers then keeps ranks in step where a model skips layers
            m._is_fsdp_managed_module = True  # (layerdrop), as for a model it wrapped itself
        self.raw_model = self.model = model
        self.optimizer = make_optimizer(model)
        self.scheduler = make_scheduler(self.optimizer)

    def autocast(self):
        return contextlib.nullcontext()  # FSDP2's MixedPrecisionPolicy casts parameters itself

    def accumulating(self, sync: bool):
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def generate(self, **inputs) -> torch.Tensor:
        # A rank that finishes early keeps joining the others' forwards, or their all-gathers would hang.
        return generating_module(self.raw_model).generate(**inputs, synced_gpus=True)

    def full_state_dict(self, every_rank: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload gathers layer by layer into rank 0's host memory alone; every rank holding the whole
        # model (on its device first) is for the replica check only.
        options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
        return {k: v.cpu() for k, v in get_model_state_dict(self.raw_model, options=options).items()}

    def close(self) -> None:
        pass


def _find_generating(model: nn.Module) -> nn.Module | None:
    """The model itself, or the first module inside it that has `generate` (a recipe may wrap its model)."""
    return next((m for m in model.modules() if callable(getattr(m, "generate", None))), None)


def generating_module(model: nn.Module) -> nn.Module:
    """`_find_generating`, or a TypeError naming the model."""
    found = _find_generating(model)
    if found is None:
        raise TypeError(f"{type(model).__name__} has no generate method; evaluate without generation")
    return found


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block of the outermost layer lists (the whole model when it has none), in place:
    `Module.compile` keeps every parameter name (no `_orig_mod.`), so checkpoints and exports are unchanged,
    and what runs between blocks (a recipe's loss, masked-position selection) stays eager."""
    blocks = [block for layers in layer_lists(model) for block in layers]
    for block in blocks or [model]:
        block.compile()


def compile_figures() -> dict[str, float]:
    """What --compile has done in this process so far, from torch._dynamo's counters: graphs compiled (more
    than one per distinct block means recompiles, e.g. on new batch shapes) and graph breaks (code that ran
    eagerly between graphs). Zero graphs after a step means nothing was compiled."""
    from torch._dynamo.utils import counters

    return {
        "compile/graphs": counters["stats"]["unique_graphs"],
        "compile/graph_breaks": sum(counters["graph_break"].values()),
    }


def layer_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The outermost lists of repeated blocks (encoder layers, decoder blocks, conv layers): the unit of
    sharding. Lists nested inside a listed block (T5Block.layer) are left to their block: a parameter may
    belong to one FSDP group only."""
    found: list[nn.ModuleList] = []
    inside: set[int] = set()
    for m in model.modules():  # parents come before their children
        if id(m) in inside:
            continue
        if isinstance(m, nn.ModuleList) and len(m) > 0 and any(True for _ in m[0].parameters()):
            found.append(m)
            inside.update(id(sub) for sub in m.modules())
    return found


# --backend NAME -> "module:class"; modules are imported only when their backend is chosen.
BACKENDS = {
    "ddp": "recipebox.launch.backends:DDPBackend",
    "fsdp": "recipebox.launch.backends:FSDPBackend",
    "deepspeed": "recipebox.launch.deepspeed_backend:DeepSpeedBackend",
    "xla": "recipebox.launch.xla_backend:XLABackend",
}


def backend_class(name: str) -> type:
    """The class registered for --backend `name` (its module imports neither deepspeed nor torch_xla)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown --backend {name!r}; available: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(name: str, runtime: Runtime, settings: BackendSettings) -> Backend:
    return backend_class(name)(runtime, settings)
