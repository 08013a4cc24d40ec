"""Counting what a training step reads back from the device, on a machine without one (tests only).

On CUDA a step that reads a device value (`.item()`, `bool(t)`, `.tolist()`, a copy to the host, an op whose
output size depends on the values such as `nonzero` or a boolean mask), or copies a host number to the device
(`t.new_tensor(n)`), makes the host wait for every kernel queued before it. On CPU nothing waits, so
`HostReads` tracks which tensors *would* live on the device and records each such read of one:

- device tensors: the batch the loop moved (`Trainer._to_device`), the trained module's parameters and
  buffers, results of `.to(<device>)`, tensors made by a factory op during the step (`torch.zeros`,
  `torch.arange`, `torch.rand`: on CPU they cannot be told from host ones, so they count as device ones),
  and every result of an op with a device tensor among its inputs (gradients, optimizer state, losses);
- host tensors (the batches the loader makes, `task.sizes`, `torch.tensor([...])` of Python numbers) are
  never counted.

A read in the backward is charged to the forward line that made the graph node being run (anomaly mode keeps
each node's forward stack), not to the `.backward()` call. What it cannot see: reads inside C++ code that
never reaches the dispatcher; the CUDA test (tests/test_host_sync.py, `gpu`) checks the same step with
torch's own sync detection.
"""

from __future__ import annotations

import contextlib
import re
import traceback
import warnings
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parent.parent
# Ops that need a device value on the host to run (on CUDA they synchronise).
READS_VALUES = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2",
                "unique_dim", "unique_consecutive", "repeat_interleave", "allclose"}  # fmt: skip
PYTHON_READS = ("tolist", "numpy", "cpu")  # Tensor methods that read values without an op to dispatch
# Host numbers copied to the device: on CUDA the copy from pageable memory waits for the stream as well.
HOST_COPIES = ("new_tensor",)


_FRAME = re.compile(r'File "(?P<filename>[^"]+)", line (?P<lineno>\d+), in (?P<name>\S+)')


def _where() -> str:
    """The innermost frame outside torch and this file: the code that asked for the read. In a backward, the
    forward line that made the graph node being run (anomaly mode keeps it), not the `.backward()` call."""
    node = torch._C._current_autograd_node()
    if node is not None and node.metadata.get("traceback_"):
        found = (_FRAME.search(line) for line in node.metadata["traceback_"])
        stack = [traceback.FrameSummary(m["filename"], int(m["lineno"]), m["name"]) for m in found if m]
    else:
        stack = traceback.extract_stack()[:-2]
    for frame in reversed(stack):
        if "/torch/" not in frame.filename and Path(frame.filename).name != "host_sync.py":
            path = frame.filename
            path = (
                path.split("site-packages/")[-1]
                if "site-packages/" in path
                else str(Path(path).relative_to(REPO))
            )
            return f"{path}:{frame.lineno} ({frame.name})"
    return "?"


class HostReads(TorchDispatchMode):
    """While active (and not `paused`), `reads` counts (what, where) for each read of a device tensor."""

    def __init__(self, device_modules=()):
        super().__init__()
        self.reads: Counter[tuple[str, str]] = Counter()
        self._device: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.counting = True
        for module in device_modules:
            for t in [*module.parameters(), *module.buffers()]:
                self.mark(t)

    def mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._device[id(t)] = t

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self._device.get(id(t)) is t

    def record(self, what: str) -> None:
        if self.counting:
            self.reads[(what, _where())] += 1

    @contextlib.contextmanager
    def paused(self):
        """Host work between steps (logging, checkpoints) reads on purpose: not counted."""
        before, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs, _ = tree_flatten((args, kwargs))
        from_device = any(self.on_device(t) for t in inputs)
        name = func.overloadpacket.__name__
        if from_device and (name in READS_VALUES or (name.startswith("index") and _bool_index(args))):
            self.record(f"aten.{name}")
        out = func(*args, **kwargs)
        # A factory names its device always (cpu here); while counting, a step's factories are the device's.
        if from_device or (self.counting and kwargs.get("device") is not None):
            for t in tree_flatten(out)[0]:
                self.mark(t)
        return out

    def __enter__(self):
        self._patched = []
        for method in (*PYTHON_READS, *HOST_COPIES, "to"):
            original = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._watch(method, original))
            self._patched.append((method, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched:
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)

    def _watch(self, method: str, original):
        mode = self

        def watched(t, *args, **kwargs):
            if method != "to" and mode.on_device(t):
                mode.record(f"Tensor.{method}")
            out = original(t, *args, **kwargs)
            if (method == "to" and _names_a_device(args, kwargs)) or (
                method in HOST_COPIES and mode.on_device(t)
            ):
                mode.mark(out)  # on CPU `.to(device)` may return the host tensor itself; on CUDA it is a copy
            return out

        return watched


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _names_a_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, torch.device | str) for a in args)


def count_step_reads(trainer, steps: int, inject=None) -> Counter:
    """Run `steps` steps of `trainer.fit` (train_step and the per-step bookkeeping: window sums, the stop
    vote, the save check) under `HostReads`. Host work is not counted: the loader's batches, their sizes and
    the task's `prepare` (it runs on the host batch, before the copy), logging, evaluation. `inject(batch)`,
    if given, runs on every device batch (to show that a read is caught)."""
    from recipebox.launch.tracking import Tracker

    mode = HostReads([trainer.backend.raw_model, trainer.task.trained])  # differ under ddp's bf16-pure
    originals = {
        name: getattr(trainer, name) for name in ("_next_batch", "_to_device", "_log_window", "evaluate")
    }
    prepare = trainer.task.prepare

    def host(work):
        def paused(*args, **kwargs):
            with mode.paused():
                return work(*args, **kwargs)

        return paused

    def moved(batch):
        out = host(originals["_to_device"])(batch)
        for t in out.values():
            mode.mark(t)
        if inject is not None:
            inject(out)
        return out

    trainer._next_batch, trainer._log_window = host(originals["_next_batch"]), host(originals["_log_window"])
    trainer._to_device, trainer.evaluate = moved, lambda split="validation": {}
    trainer.task.prepare = host(prepare)
    trainer.total_steps = trainer.state.step + steps
    tracker = Tracker(Path("."), enabled=False, use_wandb=False, project="t", name="t", config={})
    try:  # anomaly mode: each graph node keeps its forward stack, so a backward read names its forward line
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Anomaly Detection has been enabled")
            with mode, torch.autograd.detect_anomaly(check_nan=False):
                trainer.fit(tracker)
    finally:
        for name, original in originals.items():
            setattr(trainer, name, original)
        trainer.task.prepare = prepare
    return mode.reads
