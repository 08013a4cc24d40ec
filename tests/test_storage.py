"""checkpoints.storage in one process: raw bytes out and back for every kind of tensor a recipe saves, the
hashes it records, checkpoints of DCP's stock writer, and what a stock reader or a truncated file does."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from recipebox.checkpoints.sharded import file_hash
from recipebox.checkpoints.storage import RAW, RawReader, RawWriter


def sample_state() -> dict:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 4, generator=g)
    return {
        "model": {
            "weight": torch.randn(5, 3, generator=g),
            "half": torch.randn(7, generator=g).to(torch.bfloat16),
            "ids": torch.arange(11, dtype=torch.int64),
            "mask": torch.rand(9, generator=g) > 0.5,
            "empty": torch.zeros(0, 3),
            "transposed": wide.t(),  # a non-contiguous view: only its own elements are written
        },
        "optim": {"step": torch.tensor(42.0), "lr": 3e-4, "betas": (0.9, 0.999)},
    }


def zeroed(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = zeroed(value)
        elif torch.is_tensor(value):
            out[key] = torch.zeros_like(value.contiguous())
        else:
            out[key] = None
    return out


def assert_same(loaded: dict, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict):
            assert_same(loaded[key], value)
        elif torch.is_tensor(value):
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value, key


def test_every_dtype_comes_back_exact_and_the_file_hashes_match(tmp_path):
    saved = sample_state()
    writer = RawWriter(tmp_path)
    dcp.save(saved, storage_writer=writer, no_dist=True)
    assert writer.hashes and all(file_hash(tmp_path / name) == h for name, h in writer.hashes.items())
    raw_items = [
        info
        for info in RawReader(tmp_path).read_metadata().storage_data.values()
        if info.transform_descriptors
    ]
    assert len(raw_items) == 7 and all(info.transform_descriptors == [RAW] for info in raw_items)
    target = zeroed(saved)
    weight = target["model"]["weight"]
    dcp.load(target, storage_reader=RawReader(tmp_path), no_dist=True)
    assert_same(target, saved)
    assert target["model"]["weight"] is weight  # read into the tensor in place, not replaced


def test_targets_of_another_dtype_or_layout_are_copied_into(tmp_path):
    saved = {"a": torch.randn(4, 8), "b": torch.randn(3, 5)}
    dcp.save(saved, storage_writer=RawWriter(tmp_path), no_dist=True)
    target = {"a": torch.zeros(8, 4).t(), "b": torch.zeros(3, 5, dtype=torch.float64)}
    dcp.load(target, storage_reader=RawReader(tmp_path), no_dist=True)
    assert torch.equal(target["a"], saved["a"]) and not target["a"].is_contiguous()
    assert torch.equal(target["b"], saved["b"].double())


def test_checkpoints_of_the_stock_writer_still_load(tmp_path):
    saved = sample_state()
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    target = zeroed(saved)
    dcp.load(target, storage_reader=RawReader(tmp_path), no_dist=True)
    assert_same(target, saved)


def test_the_stock_reader_refuses_raw_items_by_name(tmp_path):
    dcp.save(sample_state(), storage_writer=RawWriter(tmp_path), no_dist=True)
    with pytest.raises(CheckpointException, match="Unknown extension name='recipebox.raw'"):
        dcp.load(zeroed(sample_state()), storage_reader=dcp.FileSystemReader(tmp_path), no_dist=True)


def test_a_truncated_file_is_named(tmp_path):
    writer = RawWriter(tmp_path)
    dcp.save({"w": torch.randn(1000)}, storage_writer=writer, no_dist=True)
    (name,) = writer.hashes
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointException, match=f"{name}: ends .* bytes early"):
        dcp.load({"w": torch.zeros(1000)}, storage_reader=RawReader(tmp_path), no_dist=True)


def _late_listing(folder: Path, pattern: str) -> list[Path]:
    def gone(err):
        raise err

    time.sleep(0.3)
    return [Path(d) / name for d, _, names in os.walk(folder, onerror=gone) for name in names]


def _save_many(rank: int, root: str, store: str, saves: int) -> None:
    import torch.distributed as dist

    from recipebox.checkpoints.sharded import save_checkpoint, verify_checkpoint

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 1:  # a rank that lists the folder late, as a busy one does, and fails if it has gone
        Path.rglob = _late_listing
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    for step in range(saves):
        for checksums in (False, True):
            save_checkpoint(
                f"{root}/{checksums}", step, model=model, optimizer=opt, rank_state={"r": torch.tensor([rank])},
                rank_meta={}, meta={"world_size": 2}, checksums=checksums, keep_last=2,
            )  # fmt: skip
    verify_checkpoint(f"{root}/True/step-{saves - 1:06d}")  # collective: each rank hashes a share
    dist.destroy_process_group()


def test_two_ranks_save_again_and_again_with_and_without_hashes(tmp_path):
    """No rank lists the folder after rank 0 has renamed it: a sizes-only save has no collective between the
    listing and the rename, so a rank that lists late found the folder gone (in memory, where rank 0 is
    quick, it did almost every time)."""
    import tempfile

    import torch.multiprocessing as mp

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as root:
        mp.spawn(_save_many, args=(root, str(tmp_path / "store"), 4), nprocs=2)
