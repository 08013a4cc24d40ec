"""DeepSpeed checkpoints: model, optimizer and schedule in DeepSpeed's own sharded files (`state/ds/*`),
inside a checkpoint folder of `checkpoints.sharded`, which adds the manifest, atomic rename and `latest`.

The files are DeepSpeed's torch.save pickles; DeepSpeed's loaders read them with weights_only=False, so
every load here runs weights-only (`checkpoints.storage.weights_only_loads`, SAFE_CLASSES allowed): a
crafted file is refused, not run. The export (`python -m recipebox.checkpoints export`) consolidates them in one
process without a process group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

from recipebox.checkpoints.sharded import CheckpointError

TAG = "ds"  # the one tag inside a checkpoint's state/ folder
# What DeepSpeed's .pt files hold besides tensors and plain containers: its optimizer's stage and loss scaler,
# the fragment addresses of its flat groups. Loads are weights-only, with these classes allowed.
SAFE_CLASSES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def import_deepspeed():
    """deepspeed, kept from compiling its shared-memory op on CPU (slow, and fatal without a compiler): gloo
    does the same job."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedState:
    """A DeepSpeed engine's model, optimizer and schedule, for `save_checkpoint` / `load_checkpoint`."""

    format = "deepspeed"
    safe_classes = SAFE_CLASSES

    def __init__(self, engine, zero_stage: int, rank: int, world_size: int):
        self.engine, self.zero_stage, self.rank, self.world_size = engine, zero_stage, rank, world_size
        self.meta = {"deepspeed": {"zero_stage": zero_stage}}

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def load(self, path: Path, meta: dict) -> None:
        engine = self.engine
        same_world = meta.get("world_size") == self.world_size
        saved_stage = meta.get("deepspeed", {}).get("zero_stage")
        if same_world and saved_stage not in (None, self.zero_stage):
            raise CheckpointError(
                f"{path.parent}: saved with --zero-stage {saved_stage}, resumed with "
                f"{self.zero_stage}; resume with the same stage"
            )
        if same_world:
            loaded, _ = engine.load_checkpoint(str(path), tag=TAG, load_lr_scheduler_states=True)
        else:
            loaded = self._load_universal(path, meta)
        if loaded is None:
            raise CheckpointError(f"{path.parent}: DeepSpeed could not load {path / TAG}")

    def _load_universal(self, path: Path, meta: dict):
        """Another world size: DeepSpeed's universal checkpoint, converted once into a sibling folder."""
        engine = self.engine
        universal = path.parent.parent / f".universal-{path.parent.name}"
        if self.rank == 0 and not (universal / "done").is_file():
            shutil.rmtree(universal, ignore_errors=True)
            try:
                _convert_to_universal(path / TAG, universal / TAG)
            except Exception as err:  # DeepSpeed's converter raises bare asserts and KeyErrors
                shutil.rmtree(universal, ignore_errors=True)
                raise CheckpointError(
                    f"{path.parent}: saved by {meta.get('world_size')} rank(s) and DeepSpeed cannot convert it "
                    f"to {self.world_size} ({type(err).__name__}: {err}); resume with "
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
        if self.rank == 0:
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
