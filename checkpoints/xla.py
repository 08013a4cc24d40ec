"""XLA checkpoints: model + optimizer through torch.distributed.checkpoint with the SPMD planners (each
device's shard written as is), under the unwrapped model's names, so the checkpoint reads like any other
backend's and exports the same way. torch_xla is imported only when an XLA run saves or loads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from recipebox.checkpoints.sharded import DCPState

WRAPPER = "_orig_module."  # the attribute under which SpmdFullyShardedDataParallel keeps the module


def clean_name(name: str) -> str:
    """A parameter's name in the wrapped model -> its name in the recipe's model."""
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
    """DCPState for XLA tensors; `after_load(meta)` lets the backend restore what it keeps per step."""

    def __init__(self, model, optimizer, spmd: bool, after_load: Callable[[dict], None]):
        planners = (None, None)
        if spmd:
            from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner, SPMDSavePlanner

            planners = (SPMDSavePlanner(), SPMDLoadPlanner())
        super().__init__(model, optimizer, planners=planners)
        self.spmd, self.after_load = spmd, after_load

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        import torch_xla
        from torch.distributed.checkpoint.state_dict import get_state_dict

        torch_xla.sync()
        with _one_process_group():
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": _rename(model_sd, clean_name), "optim": _rename(optim_sd, clean_name)}
            if not self.spmd:
                state = _to_host(state)
            dcp.save(state, checkpoint_id=path, planner=self.save_planner)

    def load(self, path: Path, meta) -> None:
        import torch.distributed.checkpoint as dcp
        import torch_xla
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        shardings = _param_shardings(self.model)
        with _one_process_group():
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            wrapped = {clean_name(k): k for k in model_sd}
            state = {"model": _rename(model_sd, clean_name), "optim": _rename(optim_sd, clean_name)}
            # SPMDLoadPlanner reads only tensors whose every local shard is a slice of the whole (it fails on
            # some it classes as sharded but indexes with Ellipsis); the rest goes through host copies.
            sharded, rest = _split(state, _spmd_loadable if self.spmd else lambda t: False)
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
        self.after_load(meta)
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
