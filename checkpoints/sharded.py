"""Sharded checkpoints: model and optimizer through torch.distributed.checkpoint, each rank's train state
(RNG states, data position) in its own safetensors file, and a manifest that makes the folder count.

A checkpoint is written under a hidden temporary name; after every rank has finished, rank 0 records each
file's size in `manifest.json`, renames the folder into place and moves the `latest` pointer. A folder
without a manifest, or whose files do not match it, is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the file at fault."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, torch.Tensor],
    rank_meta: dict[str, Any],
    meta: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
    keep_last: int = 0,
) -> Path:
    """Collective: every rank calls it. Returns the committed folder."""
    root, rank = Path(root), _rank()
    final, tmp = step_dir(root, step), root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "state", no_dist=not dist.is_initialized()
    )
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in rank_state.items()},
        tmp / f"rank-{rank:05d}.safetensors",
        metadata={"json": json.dumps(rank_meta)},
    )
    _barrier()
    if rank == 0:
        for name, src in (extra_files or {}).items():
            dst = tmp / name
            if Path(src).is_dir():
                shutil.copytree(src, dst)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_atomic(tmp / MANIFEST, json.dumps({"step": step, "meta": meta, "files": files}, indent=1))
        if final.exists():  # the same step saved again (e.g. at the end right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError naming what is missing or truncated."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST}, so the save never finished") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path}: corrupt ({err})") from None
    for name, size in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: shard {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{path}: shard {name} is truncated or altered ({f.stat().st_size} bytes, expected {size})"
            )
    return manifest


def latest_complete_checkpoint(root: str | Path, report=print) -> Path | None:
    """The newest checkpoint under `root` that verifies; broken newer ones are named and skipped."""
    root = Path(root)
    candidates = sorted(root.glob("step-*"), reverse=True)
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            report(f"skipping checkpoint: {err}")
    return None


def load_checkpoint(
    path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Collective. Restores model and optimizer in place (any world size, any backend); returns the
    manifest's meta and this rank's saved state, or None for both when the rank did not exist then."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path / "state", no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = path / f"rank-{_rank():05d}.safetensors"
    if manifest["meta"].get("world_size") != (dist.get_world_size() if dist.is_initialized() else 1):
        return manifest["meta"], None, None
    with safe_open(rank_file, "pt") as f:
        return manifest["meta"], {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["json"])
