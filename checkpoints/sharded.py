"""Sharded checkpoints: model and optimizer through torch.distributed.checkpoint, each rank's train state
(RNG states, data position) in its own safetensors file, and a manifest that makes the folder count.

A checkpoint is written under a hidden temporary name (model and optimizer through `checkpoints.storage`,
which hashes each rank's file with xxh3-64 as it writes it); after every rank has finished, the ranks hash
the few other files in shares, and rank 0 records every file's size and hash in `manifest.json`, renames
the folder into place and moves the `latest` pointer. A folder without a manifest, or whose files do not match
it (missing, truncated, or the same size with other bytes: a bad sector, a faulty copy), is never loaded.

With `BackgroundSaves` (--async-save) training waits only while model and optimizer are copied to host
memory (pinned on GPUs); the write, the hashes and the commit above run in a background thread on a gloo
process group of their own, one checkpoint at a time. Until that commit the previous checkpoint is `latest`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from recipebox.checkpoints.storage import RawReader, RawWriter, check_index, weights_only_loads

# DCP warns on every save without a process group, even with no_dist=True passed; a one-process run means it.
warnings.filterwarnings(
    "ignore",
    message="torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to save in a "
    "single process",
)

MANIFEST = "manifest.json"
LATEST = "latest"
HASH = "xxh3_64"  # fast enough that reading a file, not hashing it, is the cost
CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the file at fault."""


def _behind(err: BaseException | None, wanted, seen: int = 0) -> BaseException | None:
    """The first error behind a load's error that `wanted` accepts: DCP wraps each rank's error in a
    CheckpointException (a BaseException) and reports a failed index read as an AssertionError raised while
    handling it."""
    if err is None or seen > 20 or isinstance(err, (KeyboardInterrupt, SystemExit)):
        return None
    if wanted(err):
        return err
    for inner in [failure[0] for failure in getattr(err, "failures", {}).values()]:
        if found := _behind(inner, wanted, seen + 1):
            return found
    return _behind(err.__cause__ or err.__context__, wanted, seen + 1)


# How torch, DCP and DeepSpeed word a saved tensor that the model being loaded has in another shape or not at all.
MISFIT = re.compile(r"size mismatch|missing key|unexpected key", re.IGNORECASE)


def _misfit(err: BaseException) -> bool:
    return isinstance(err, (ValueError, RuntimeError, KeyError)) and bool(MISFIT.search(str(err)))


RESUME_FIX = "resume with the model settings it was saved with ({hf} holds them) or give a new --output-dir"


@contextlib.contextmanager
def loading_safely(path: Path, allowed: tuple = (), misfit_fix: str = RESUME_FIX):
    """`weights_only_loads` (with `allowed` classes), and a pickle it refuses as a CheckpointError naming
    the checkpoint: one that holds code or objects beyond weights and plain state is not loaded. A DCP
    checkpoint's index (state/.metadata) is checked first, here for every format and reader: DCP would
    unpickle it freely, and report a refusal only as text. A checkpoint of a model in other shapes (a run
    resumed with another --hidden-size) is a CheckpointError too, naming the first tensor that differs and
    `misfit_fix` ({hf}: the checkpoint's hf/config.json)."""
    try:
        if (Path(path) / "state" / ".metadata").is_file():
            check_index(Path(path) / "state")
        with weights_only_loads(*allowed):
            yield
    except BaseException as err:
        if isinstance(err, (CheckpointError, KeyboardInterrupt, SystemExit)):
            raise
        if refused := _behind(err, lambda e: isinstance(e, pickle.UnpicklingError)):
            text = str(refused).strip()
            named = re.search(r"GLOBAL ([\w.]+)", text)  # torch's weights-only refusal names it
            first = f"{named.group(1)} is not allowed in a checkpoint" if named else text.splitlines()[0]
            raise CheckpointError(
                f"{path}: holds pickled objects beyond weights and plain state ({first}); they are not "
                f"loaded, since they could run code: use a checkpoint written by recipebox"
            ) from None
        if misfit := _behind(err, _misfit):
            first = next(line.strip() for line in str(misfit).splitlines() if MISFIT.search(line))
            fix = misfit_fix.format(hf=Path(path) / "hf" / "config.json")
            raise CheckpointError(
                f"{path} does not fit the model it is loaded into ({first}): {fix}"
            ) from None
        raise


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder under root, oldest first: by number, so step-1000000 comes
    after step-999999 (by name it would not)."""
    found = [(p.name.removeprefix("step-"), p) for p in Path(root).glob("step-*")]
    return sorted((int(n), p) for n, p in found if n.isdigit())


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename inside it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def file_hash(path: Path) -> str:
    import xxhash

    h, buf = xxhash.xxh3_64(), bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):  # one buffer for the whole file
            h.update(view[:n])
    return h.hexdigest()


def _hash_shares(
    folder: Path, names: list[str], group=None, known: dict[str, str] | None = None
) -> dict[str, str]:
    """Collective: every rank gets the hashes of all `names`. Files some rank hashed while writing them
    (its `known`) are not read again; each rank hashes every world-size-th of the rest."""
    rank, world = _rank(), dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    known = dict(known or {})
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, known, group=group)
        known = {k: v for part in every for k, v in part.items()}
    todo = [name for name in names if name not in known]
    mine = {name: file_hash(folder / name) for name in todo[rank::world]}
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine, group=group)
        mine = {k: v for part in every for k, v in part.items()}
    return {**known, **mine}


def _nbytes(value) -> int:
    """A state entry's size for balancing the writers: a tensor's bytes; a plain setting counts 1."""
    return value.numel() * value.element_size() if torch.is_tensor(value) else 1


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tied_aliases(state: dict[str, Any]) -> dict[str, str]:
    """{key: the earlier key it shares its tensor with} in a model state dict. Tied weights (BERT's MLM
    decoder and its word embeddings, GPT-2's and T5's output layer) are written and read once."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for key, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value  # a DTensor's shard (FSDP2)
        try:
            ptr = local.untyped_storage().data_ptr()
        except (AttributeError, RuntimeError, NotImplementedError):  # not a plain tensor: keep it
            continue
        ident = (ptr, local.storage_offset(), tuple(local.shape), local.dtype)
        if ptr and ident in seen:
            aliases[key] = seen[ident]
        elif ptr:
            seen[ident] = key
    return aliases


class DCPState:
    """Model and optimizer through torch.distributed.checkpoint: loads under any world size and any backend
    whose parameters DCP understands (plain, DDP, FSDP2 DTensors; SPMD with its planners)."""

    format = "dcp"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        planners=(None, None),
        after_load: Callable[[], None] | None = None,  # e.g. a backend's bf16 copy of the loaded weights
    ):
        self.model, self.optimizer = model, optimizer
        self.save_planner, self.load_planner = planners
        self.after_load = after_load

    def _state(self) -> tuple[dict[str, Any], dict[str, str]]:
        """What is written (tied weights once) and the aliases left out of it."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        aliases = tied_aliases(model_sd)
        return {"model": {k: v for k, v in model_sd.items() if k not in aliases}, "optim": optim_sd}, aliases

    def _share(self) -> dict[str, Any]:
        """What this rank writes, under DCP's flattened names. Every value that is the same on every rank (a
        plain tensor: all of DDP's state, FSDP2's buffers; a setting such as a learning rate) goes to one
        rank, the largest first to the least loaded, so the ranks split the copying (--async-save stages
        only its share) and the writing; a DTensor holds this rank's own shard and always goes in. DCP
        would drop the duplicates itself, but only after every rank had copied all of them."""
        state = self._state()[0]
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1:
            return state
        flat, _ = flatten_state_dict(state)
        load, mine = [0] * world, {}
        for key in sorted(flat, key=lambda k: (-_nbytes(flat[k]), k)):
            if isinstance(flat[key], DTensor):
                mine[key] = flat[key]
                continue
            owner = min(range(world), key=load.__getitem__)
            load[owner] += _nbytes(flat[key])
            if owner == dist.get_rank():
                mine[key] = flat[key]
        return mine

    def save(self, path: Path) -> dict[str, str]:
        """Writes this rank's share under `path`; returns the xxh3-64 of each file it wrote, by name."""
        writer = RawWriter(path)
        dcp.save(
            self._share(), storage_writer=writer, planner=self.save_planner, no_dist=not dist.is_initialized()
        )
        return writer.hashes

    def save_async(self, path: Path, background: BackgroundSaves) -> tuple[Future, dict[str, str]]:
        """Returns once model and optimizer are copied to host memory: the future ends with the write, and
        the dict holds this rank's file hashes from then on."""
        writer = RawWriter(path)
        written = dcp.async_save(
            self._share(),
            storage_writer=writer,
            planner=self.save_planner,
            process_group=background.group,
            async_stager=background.stager,
            no_dist=not dist.is_initialized(),
        )
        return written, writer.hashes

    def load(self, path: Path, meta: dict[str, Any]) -> None:
        state, aliases = self._state()  # checkpoints that hold the aliases too load the same way
        reader = RawReader(path)
        dcp.load(state, storage_reader=reader, planner=self.load_planner, no_dist=not dist.is_initialized())
        model_sd = {**state["model"], **{alias: state["model"][key] for alias, key in aliases.items()}}
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=state["optim"])
        if self.after_load is not None:
            self.after_load()


class BackgroundSaves:
    """--async-save: at most one checkpoint in flight. Collective to create (a process group of its own, so
    the background thread's collectives never meet the training's); `wait` before anything that needs the
    checkpoint committed (the next save, a stop, the end of the run); it raises what the save raised."""

    def __init__(self, pinned: bool = False):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.group = dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None
        # On GPUs, one set of pinned host buffers, reused by every save; on CPU DCP copies into fresh tensors.
        self.stager = DefaultStager(StagingOptions(True, False, False, False)) if pinned else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.in_flight: Future | None = None

    def submit(self, fn) -> None:
        self.wait()
        self.in_flight = self.pool.submit(fn)

    def wait(self) -> None:
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            in_flight.result()

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()
        if self.stager is not None:
            self.stager.close()


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state=None,
    rank_state: dict[str, torch.Tensor],
    rank_meta: dict[str, Any],
    meta: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
    keep_last: int = 0,
    checksums: bool = True,
    background: BackgroundSaves | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the folder the checkpoint is (or, in the background, will be)
    committed to.

    `state` writes model and optimizer into a folder (`DCPState` by default; a backend with its own format,
    such as DeepSpeed's, passes its own object with the same `format`, `save` and `load`). Without
    `checksums` the manifest records sizes only. With `background` (a `DCPState` only) it returns once the
    state is in host memory; the write and the commit finish in `background`."""
    root, rank = Path(root), _rank()
    state = state or DCPState(model, optimizer)
    meta = {**meta, "state_format": state.format, **getattr(state, "meta", {})}
    final, tmp = step_dir(root, step), root / f".tmp-step-{step:06d}"
    if background is not None:
        background.wait()  # one in flight: its commit may still use the folder names below
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in rank_state.items()},
        tmp / f"rank-{rank:05d}.safetensors",
        metadata={"json": json.dumps(rank_meta)},
    )
    if rank == 0:
        for name, src in (extra_files or {}).items():
            dst = tmp / name
            if Path(src).is_dir():
                shutil.copytree(src, dst)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    commit = dict(
        root=root, step=step, tmp=tmp, final=final, meta=meta, keep_last=keep_last, checksums=checksums
    )
    if background is None:
        _commit(**commit, known=_in_state(state.save(tmp / "state")))
    else:
        written, hashes = state.save_async(tmp / "state", background)
        background.submit(
            lambda: (written.result(), _commit(**commit, known=_in_state(hashes), group=background.group))
        )
    return final


def _in_state(hashes: dict[str, str] | None) -> dict[str, str]:
    """A writer's hashes, named as the manifest names its files (under state/). A format that does not hash
    as it writes (DeepSpeed's, XLA's) returns none: its files are read back."""
    return {f"state/{name}": h for name, h in (hashes or {}).items()}


def _commit(root, step, tmp, final, meta, keep_last, checksums, known=None, group=None) -> None:
    """Collective, once every rank's files are written: the hashes (`known` ones as the writers computed
    them, the rest read back in shares), then rank 0 writes the manifest, renames the folder into place and
    moves `latest`."""
    _barrier(group)
    # Only ranks that hash list the folder: their hashes' all_gather holds rank 0's rename until they have.
    listing = checksums or _rank() == 0
    names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) if listing else []
    hashes = _hash_shares(tmp, names, group, known) if checksums else {}
    if _rank() == 0:
        files = {name: (tmp / name).stat().st_size for name in names}
        for folder in {tmp / name for name in names} | {(tmp / name).parent for name in names}:
            _fsync(folder)  # every shard, copy and folder on the disk before the manifest says complete
        manifest = {"step": step, "meta": meta, "files": files}
        if checksums:
            manifest.update(hash=HASH, hashes=hashes)
        manifest["self"] = _manifest_hash(json.loads(json.dumps(manifest)))  # as a reader will parse it
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # the same step saved again (e.g. at the end right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        _fsync(root)  # the rename and `latest` too
        _prune(root, keep_last, step)
    _barrier(group)


def _manifest_hash(manifest: dict) -> str:
    """The xxh3-64 of a manifest's own contents (all but "self", keys sorted): a damaged manifest that still
    parses (a step, a size or a hash changed in place) is caught like a damaged shard."""
    import xxhash

    body = {k: v for k, v in manifest.items() if k != "self"}
    return xxhash.xxh3_64(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _prune(root: Path, keep_last: int, committed: int) -> None:
    """Keeps the `keep_last` newest checkpoints up to the one just committed, and removes what killed saves
    left (`.tmp-step-*`; a save in the background commits before the next begins). Folders of later steps (a
    history abandoned when resume skipped them as broken, or a run resumed from an earlier checkpoint) are
    neither counted nor deleted here: the same step saved again replaces each one in turn."""
    for stale in root.glob(".tmp-step-*"):  # a save killed mid-way (this one's was just renamed)
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    for _, old in [sp for sp in step_folders(root) if sp[0] <= committed][:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: str | Path, checksums: bool = True, report=None) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError naming the file that is missing, truncated or
    altered. Collective under a process group: each rank hashes a share of the files, so a resume reads the
    checkpoint once, not once per rank. `checksums=False` checks sizes only (no file is read); a checkpoint written without hashes
    (before they existed, or with checksums off) is checked by size, and `report` says so."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST}, so the save never finished") from None
    except (OSError, ValueError) as err:  # not JSON, not UTF-8, a folder, unreadable
        raise CheckpointError(f"{manifest_path}: corrupt ({err}); this checkpoint cannot be used") from None
    shape = {"step": int, "files": dict, "meta": dict, "hashes": dict}  # hashes: none when size-only
    if not isinstance(manifest, dict) or any(
        not isinstance(manifest.get(key, {} if key == "hashes" else None), kind)
        for key, kind in shape.items()
    ):
        raise CheckpointError(
            f"{manifest_path}: corrupt (not a manifest: it needs a 'step' number, 'files' and 'meta' tables and "
            f"'hashes', if any, as a table); this checkpoint "
            f"cannot be used"
        )
    # Manifests written before "self" existed have none; they are checked by what they list, as before.
    if "self" in manifest and manifest["self"] != _manifest_hash(manifest):
        raise CheckpointError(
            f"{manifest_path}: corrupt (it does not match its own hash: changed after it was written, by a bad "
            f"sector, a faulty copy or an edit); this checkpoint cannot be used"
        )
    if "hashes" in manifest and set(manifest["hashes"]) != set(manifest["files"]):
        raise CheckpointError(
            f"{manifest_path}: corrupt (its hashes and its files name different files); this checkpoint "
            f"cannot be used"
        )
    for name, size in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: shard {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{path}: shard {name} is truncated or altered ({f.stat().st_size} bytes, expected {size})"
            )
    if checksums and "hashes" not in manifest:
        if report is not None:
            report(f"{path}: its manifest has sizes only (no content hashes); checked by size")
    elif checksums:
        actual = _hash_shares(path, sorted(manifest["hashes"]))  # collective when a process group runs
        for name, expected in sorted(manifest["hashes"].items()):
            if actual[name] != expected:
                raise CheckpointError(
                    f"{path}: shard {name} is corrupt: same size, other content ({HASH} does not match the "
                    f"manifest); this checkpoint cannot be used"
                )
    return manifest


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint a user names: a step folder, or the `latest` pointer (the folder it names). A run
    folder, or its checkpoints/ folder, is a CheckpointError naming the checkpoint in it to pass."""
    path = Path(path)
    if path.name == LATEST and path.is_file():
        return _pointed(path)
    if path.is_dir() and not (path / MANIFEST).is_file():
        for root in (path / "checkpoints", path):
            if found := step_folders(root):
                newest = _pointed(root / LATEST) if (root / LATEST).is_file() else found[-1][1]
                raise CheckpointError(f"{path} is not a checkpoint but holds them; pass one, e.g. {newest}")
    return path


def _pointed(pointer: Path) -> Path:
    """The step folder a `latest` pointer names, beside it."""
    try:
        named = pointer.read_text(encoding="utf-8").strip()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{pointer}: unreadable ({err}); pass a step-* folder instead") from None
    if not named.startswith("step-") or "/" in named:
        raise CheckpointError(f"{pointer} names {named!r}, not a step-* checkpoint; pass a step-* folder")
    return pointer.parent / named


def latest_complete_checkpoint(root: str | Path, report=print, checksums: bool = True) -> Path | None:
    """The newest checkpoint under `root` that verifies; broken newer ones are named and skipped."""
    for _, path in reversed(step_folders(root)):
        try:
            verify_checkpoint(path, checksums=checksums, report=report)
            return path
        except CheckpointError as err:
            report(f"skipping checkpoint: {err}")
    return None


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state=None,
    checksums: bool = True,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Collective. Restores model and optimizer in place (any world size, any backend); returns the
    manifest's meta and this rank's saved state, or None for both when the rank did not exist then.
    `checksums=False` when the caller has just verified the folder's content (sizes are checked still)."""
    path = Path(path)
    manifest = verify_checkpoint(path, checksums=checksums)
    state = state or DCPState(model, optimizer)
    saved_format = manifest["meta"].get("state_format", "dcp")
    if saved_format != state.format:
        raise CheckpointError(
            f"{path} holds a {saved_format} checkpoint (backend {manifest['meta'].get('backend')}), which "
            f"this backend ({state.format}) cannot read; resume with the backend that saved it, or export "
            f"it (python -m recipebox.checkpoints export {path} OUT) and start a new run from that model"
        )
    with loading_safely(path, getattr(state, "safe_classes", ())):
        state.load(path / "state", manifest["meta"])
    rank_file = path / f"rank-{_rank():05d}.safetensors"
    if manifest["meta"].get("world_size") != (dist.get_world_size() if dist.is_initialized() else 1):
        return manifest["meta"], None, None
    with safe_open(rank_file, "pt") as f:
        return manifest["meta"], {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["json"])
