"""Where DCP's bytes go: tensors written as they lie in memory and read straight back into place.

DCP's FileSystemWriter serialises every tensor with torch.save (a zip archive around a pickle, one per
tensor), and its FileSystemReader torch.loads each one into a fresh tensor before copying it where it
belongs. `RawWriter` writes a tensor's bytes as they are, hashing them (xxh3-64) on the way, so the manifest
needs no second read of the files; `RawReader` reads each tensor's bytes into the tensor being restored
(one copy, from the file or the page cache). Plans, `.metadata`, resharding on load and the non-tensor items
stay DCP's own; before a load, `check_index` makes sure `.metadata` (a pickle) builds only the classes a
DCP index is made of, and `weights_only_loads` makes every torch.load weights-only.

A raw item carries the descriptor `RAW` in its storage info: DCP's stock reader refuses it by that name
rather than misreading it, and `RawReader` reads checkpoints of the stock writer (older recipebox ones,
XLA's) through DCP's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pickle
from pathlib import Path

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

RAW = "recipebox.raw/1"
# What a DCP index (.metadata) is built from, besides torch dtypes and the classes of
# torch.distributed.checkpoint.metadata; anything else in it stops the load.
INDEX_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),  # its name from Python 3.13 on
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
}
FORCE_WEIGHTS_ONLY = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


class IndexUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file: DCP's own reader would build anything a crafted file names (and so
    run its code); this one builds only the index's classes, and names anything else."""

    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) in INDEX_GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if module == "torch.distributed.checkpoint.metadata":
                found = super().find_class(module, name)
                if isinstance(found, type):
                    return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's index")


def check_index(state_dir: str | Path) -> None:
    """Unpickles a DCP checkpoint's `.metadata` with IndexUnpickler before DCP reads it (with pickle, freely);
    a refusal is a pickle.UnpicklingError naming the class."""
    with open(Path(state_dir) / ".metadata", "rb") as f:
        IndexUnpickler(f).load()


@contextlib.contextmanager
def weights_only_loads(*allowed: tuple[str, str]):
    """Every torch.load inside reads tensors and plain containers only, whatever its caller asks: DCP's load
    planner (the optimizer's hyperparameters) and DeepSpeed's loaders pass weights_only=False, so a crafted
    file in a checkpoint folder could run code as the user. `allowed`: (module, class) pairs that may be
    built too; anything else stops the load with torch's pickle.UnpicklingError naming it."""
    torch.serialization.add_safe_globals([getattr(importlib.import_module(m), n) for m, n in allowed])
    saved = {key: os.environ.pop(key, None) for key in FORCE_WEIGHTS_ONLY}
    os.environ[FORCE_WEIGHTS_ONLY[0]] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _bytes_of(tensor: torch.Tensor):
    """A tensor's elements as a flat uint8 numpy view (no copy for a contiguous CPU tensor)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


class RawWriter(FileSystemWriter):
    """One file per rank; after the write, `hashes` maps each file's name (relative to the checkpoint's
    folder) to the xxh3-64 of its bytes."""

    def __init__(self, path: str | os.PathLike, sync_files: bool = True):
        super().__init__(path, single_file_per_rank=True, sync_files=sync_files, thread_count=1)
        self.hashes: dict[str, str] = {}

    def _write_data(self, planner, file_queue) -> Future:
        results = []
        while not file_queue.empty():
            path, name, items = file_queue.get_nowait()
            results += self._write_file(planner, Path(path), name, items)
        done: Future = Future()
        done.set_result(results)
        return done

    def _write_file(self, planner, path: Path, name: str, items) -> list[WriteResult]:
        import xxhash

        digest, results = xxhash.xxh3_64(), []
        with open(path, "wb") as f:
            for item in items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    buf, descriptors = data.getbuffer(), None
                else:
                    buf, descriptors = _bytes_of(data), [RAW]
                offset = f.tell()
                f.write(buf)
                digest.update(buf)
                info = _StorageInfo(name, offset, buf.nbytes, transform_descriptors=descriptors)
                results.append(WriteResult(index=item.index, size_in_bytes=buf.nbytes, storage_data=info))
            if self.sync_files:
                f.flush()
                os.fsync(f.fileno())
        self.hashes[name] = digest.hexdigest()
        return results


def _read_exactly(f, tensor: torch.Tensor, length: int, where: Path) -> None:
    view = memoryview(_bytes_of(tensor))
    if view.nbytes != length:
        raise RuntimeError(f"{where}: a tensor of {view.nbytes} bytes is stored in {length}")
    done = 0
    while done < length:
        n = f.readinto(view[done:])
        if not n:
            raise RuntimeError(f"{where}: ends {length - done} bytes early (truncated)")
        done += n


class RawReader(FileSystemReader):
    """Reads raw items into the restored tensors in place (through a temporary and a copy only when a
    request is a slice of the saved chunk, or the target is not a contiguous CPU tensor of the saved dtype);
    everything else goes through DCP's FileSystemReader."""

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.metadata = metadata

    def _chunk(self, index) -> tuple[torch.Size, torch.dtype]:
        md = self.metadata.state_dict_metadata[index.fqn]
        hint = md.chunks[index.index] if index.index is not None and index.index < len(md.chunks) else None
        if hint is None or hint.offsets != index.offset:
            hint = next(c for c in md.chunks if c.offsets == index.offset)
        return hint.sizes, md.properties.dtype

    def read_data(self, plan, planner) -> Future:
        raw = lambda r: RAW in (self.storage_data[r.storage_index].transform_descriptors or ())  # noqa: E731
        rest = [r for r in plan.items if not raw(r)]
        if rest:
            super().read_data(dataclasses.replace(plan, items=rest), planner).wait()
        per_file: dict[str, list] = {}
        for req in plan.items:
            if raw(req):
                per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for name, reqs in per_file.items():
            path = Path(self.path) / name
            with open(path, "rb", buffering=0) as f:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    info = self.storage_data[req.storage_index]
                    f.seek(info.offset)
                    target = planner.resolve_tensor(req).detach()
                    shape, dtype = self._chunk(req.storage_index)
                    whole = not any(req.storage_offsets) and tuple(req.lengths) == tuple(shape)
                    if whole and target.is_cpu and target.dtype == dtype and target.is_contiguous():
                        _read_exactly(f, target, info.length, path)
                    else:
                        saved = torch.empty(shape, dtype=dtype)
                        _read_exactly(f, saved, info.length, path)
                        target.copy_(narrow_tensor_by_index(saved, req.storage_offsets, req.lengths))
                    planner.commit_tensor(req, target)
        done: Future = Future()
        done.set_result(None)
        return done
