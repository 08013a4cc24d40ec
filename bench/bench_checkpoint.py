"""Checkpoint save/load speed: checkpoints.sharded vs a rank-0 torch.save, what --async-save blocks, and
where a save's time goes.

A BERT-base BertForPreTraining under DDP (2 CPU ranks, gloo) with AdamW state from one real step; each
measurement is the median of 3. Rows: the recipes' save (content hashes on, then sizes only), torch.save of
the same state on rank 0, the recipes' background save (what it blocks, and until the commit), the loads;
then the parts of one save (collecting the state dict, the raw write with and without fsync, DCP's stock
write, hashing files read back, the manifest and rename) and of one load (verifying, the raw read into
place, DCP's stock read). Usage:
    python bench/bench_checkpoint.py            # BERT-base (~110M params), a few minutes
    python bench/bench_checkpoint.py --quick    # 4 layers, smoke test
    python bench/bench_checkpoint.py --dir /dev/shm   # in memory: the software's cost without the disk's
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from launch_two_ranks import torchrun_two_ranks

REPEATS = 3
RESULT = "result.json"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _build(quick: bool, seed: int, *, step: bool):
    """DDP-wrapped BertForPreTraining and AdamW; with `step`, one real step on a random batch fills its state."""
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=4) if quick else BertConfig()
    model = DistributedDataParallel(BertForPreTraining(config))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    if step:
        ids = torch.randint(0, config.vocab_size, (2, 128))
        out = model(input_ids=ids, labels=ids, next_sentence_label=torch.zeros(2, dtype=torch.long))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # gradients are not checkpointed; freeing them keeps memory honest
    return model, opt


def _fingerprint(model, opt) -> dict[str, str]:
    """A digest of every parameter and its exp_avg: exact like torch.equal, without keeping a second copy
    of the model and optimizer alive next to the one being loaded (that would cost ~1.8 GB a rank)."""
    digests = {}
    for name, p in model.module.named_parameters():
        digests[name] = hashlib.blake2b(p.detach().contiguous().numpy()).hexdigest()
        if "exp_avg" in opt.state.get(p, {}):
            exp_avg = opt.state[p]["exp_avg"].contiguous().numpy()
            digests[f"{name} exp_avg"] = hashlib.blake2b(exp_avg).hexdigest()
    return digests


def _scramble(model, opt) -> None:
    """Zero what a load must restore, so every repeat's check proves that this load did the work."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
            for t in opt.state.get(p, {}).values():
                if t.dim():  # `step` is a 0-d tensor and stays
                    t.zero_()


def _assert_restored(method: str, saved: dict[str, str], model, opt) -> None:
    loaded = _fingerprint(model, opt)
    wrong = [name for name, digest in saved.items() if loaded.get(name) != digest]
    assert not wrong, f"{method}: {len(wrong)} tensors differ after load, first {wrong[0]}"


def _timed(fn):
    """fn's result and the seconds from a barrier both ranks pass to a barrier after both have finished."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    result = fn()
    dist.barrier()
    return result, time.perf_counter() - start


def _rotated(runs: list, rep: int) -> list:
    """The methods in another order each repeat, so that over REPEATS runs each one takes each place once:
    on a busy disk the first write after a delete, or the first read after other writes, costs more."""
    shift = rep % len(runs)
    return runs[shift:] + runs[:shift]


def _background_save(save, background) -> tuple[float, float]:
    """(seconds until save() returns, seconds until the checkpoint is committed on every rank)."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    save()
    blocked = time.perf_counter() - start
    background.wait()
    dist.barrier()
    return blocked, time.perf_counter() - start


def measure_parts(model, opt, out: Path) -> dict:
    """One save taken apart, each part timed on its own (seconds, slowest rank's view via barriers)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.utils._pytree import tree_map

    from recipebox.checkpoints.sharded import DCPState, _hash_shares, _write_atomic
    from recipebox.checkpoints.storage import RawWriter

    r = {}
    state, r["part_state_dict"] = _timed(lambda: DCPState(model, opt)._state()[0])
    # The floor for what an asynchronous save blocks on a CPU: one in-memory copy of everything it writes.
    copies = [
        _timed(lambda: tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, state))[1]
        for _ in range(REPEATS)
    ]
    r["part_memory_copy"] = statistics.median(copies)
    writers = {
        "stock": lambda folder: dcp.FileSystemWriter(folder),  # torch.save of each tensor, fsync
        "raw": lambda folder: RawWriter(folder),  # as saved: raw bytes hashed while written, fsync
        "raw_nosync": lambda folder: RawWriter(folder, sync_files=False),
    }
    for kind, make in writers.items():
        times = []
        for _ in range(REPEATS):
            folder = out / f"parts-{kind}"
            if dist.get_rank() == 0:
                shutil.rmtree(folder, ignore_errors=True)
            times.append(_timed(lambda f=folder, m=make: dcp.save(state, storage_writer=m(f)))[1])
        r[f"part_write_{kind}"] = statistics.median(times)
    folder = out / "parts-raw"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    r["part_hash"] = _timed(lambda: _hash_shares(folder, names))[1]

    def manifest_and_rename():
        if dist.get_rank() == 0:
            _write_atomic(folder / "manifest.json", json.dumps({"files": names}))
            folder.rename(out / "parts-renamed")

    r["part_manifest_rename"] = _timed(manifest_and_rename)[1]
    dist.barrier()
    if dist.get_rank() == 0:
        for name in ("parts-raw_nosync", "parts-renamed"):  # parts-stock stays for the load parts
            shutil.rmtree(out / name, ignore_errors=True)
    return r


def measure_saves(model, opt, out: Path) -> dict:
    """Seconds per repeat for each save, sizes in bytes; leaves the last sharded folder and .pt file."""
    import torch
    import torch.distributed as dist

    from recipebox.checkpoints.sharded import BackgroundSaves, save_checkpoint, step_dir

    rank = dist.get_rank()
    background = BackgroundSaves()  # what --async-save uses: its own gloo group, one save in flight
    r = {k: [] for k in ("sharded_save", "sizes_only_save", "torch_save", "torch_save_fsync")}
    r.update(async_blocked=[], async_total=[])
    r["baseline"] = out / "torch_save.pt"
    for rep in range(REPEATS):
        # Each repeat writes anew; the previous output is removed untimed, so every repeat starts from the
        # same disk state, and the last survives for the loads.
        if rank == 0:
            shutil.rmtree(out / "sharded", ignore_errors=True)
            r["baseline"].unlink(missing_ok=True)
        dist.barrier()

        def ours(root, checksums=True, background=None, rep=rep):
            return save_checkpoint(
                root,
                rep,
                model=model,
                optimizer=opt,
                rank_state={"rng": torch.get_rng_state(), "position": torch.tensor([rep])},
                rank_meta={},
                meta={"world_size": 2},
                checksums=checksums,
                background=background,
            )

        def plain_state():
            return {"model": model.module.state_dict(), "optim": opt.state_dict()}

        def plain_save():
            if rank == 0:
                torch.save(plain_state(), r["baseline"])

        def durable_save():  # torch.save made as durable as our save: its file fsynced before it returns
            if rank == 0:
                with open(out / "torch_save_fsync.pt", "wb") as f:
                    torch.save(plain_state(), f)
                    f.flush()
                    os.fsync(f.fileno())
                (out / "torch_save_fsync.pt").unlink()

        def background_save():
            blocked, total = _background_save(lambda: ours(out / "async", background=background), background)
            r["async_blocked"].append(blocked)
            r["async_total"].append(total)

        runs = [
            ("sharded_save", lambda: ours(out / "sharded")),
            ("sizes_only_save", lambda: ours(out / "sizes-only", checksums=False)),
            ("torch_save", plain_save),
            ("torch_save_fsync", durable_save),
            (None, background_save),
        ]
        for key, fn in _rotated(runs, rep):
            if key is None:
                fn()
            else:
                r[key].append(_timed(fn)[1])
        r["sharded"] = step_dir(out / "sharded", rep)
        r["async_bytes"] = _folder_bytes(out / "async")
        dist.barrier()
        if rank == 0:
            for name in ("async", "sizes-only"):
                shutil.rmtree(out / name, ignore_errors=True)
    background.close()
    return r


def measure_loads(sharded: Path, baseline: Path, stock: Path, saved: dict[str, str], quick: bool) -> dict:
    """Seconds per repeat for each load into a fresh (never stepped) model and optimizer, each checked."""
    import torch

    from recipebox.checkpoints.sharded import load_checkpoint

    model, opt = _build(quick, seed=1, step=False)
    r = {"sharded_load": [], "sizes_only_load": [], "torch_load": []}

    def plain_load():
        # Every rank reads the file and restores in place, as a DDP resume must; load_checkpoint does the
        # same, so both rows time the same job.
        state = torch.load(baseline, weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    runs = [
        ("sharded_load", "load_checkpoint", lambda: load_checkpoint(sharded, model=model, optimizer=opt)),
        (
            "sizes_only_load",
            "load_checkpoint(checksums=False)",
            lambda: load_checkpoint(sharded, model=model, optimizer=opt, checksums=False),
        ),
        ("torch_load", "torch.load", plain_load),
    ]
    for rep in range(REPEATS):
        for key, method, fn in _rotated(runs, rep):
            _scramble(model, opt)
            r[key].append(_timed(fn)[1])
            _assert_restored(method, saved, model, opt)
    r.update(measure_load_parts(sharded, stock, model, opt))
    return r


def measure_load_parts(sharded: Path, stock: Path, model, opt) -> dict:
    """One load taken apart (the steps of load_checkpoint, each timed on its own; medians)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from recipebox.checkpoints.sharded import DCPState, verify_checkpoint
    from recipebox.checkpoints.storage import RawReader

    parts = {
        k: []
        for k in ("verify_hashes", "verify_sizes", "state_dict", "read_raw", "read_stock", "set_state_dict")
    }
    for _ in range(REPEATS):
        _scramble(model, opt)
        parts["verify_hashes"].append(_timed(lambda: verify_checkpoint(sharded, checksums=True))[1])
        parts["verify_sizes"].append(_timed(lambda: verify_checkpoint(sharded, checksums=False))[1])
        (state, aliases), seconds = _timed(lambda: DCPState(model, opt)._state())
        parts["state_dict"].append(seconds)
        reader = RawReader(sharded / "state")  # as loaded
        parts["read_raw"].append(_timed(lambda s=state, rd=reader: dcp.load(s, storage_reader=rd))[1])
        # DCP's stock reader on the stock writer's folder from measure_parts: torch.load of each tensor
        parts["read_stock"].append(_timed(lambda s=state: dcp.load(s, checkpoint_id=stock))[1])
        model_sd = {**state["model"], **{alias: state["model"][key] for alias, key in aliases.items()}}
        parts["set_state_dict"].append(
            _timed(
                lambda m=model_sd, o=state["optim"]: set_state_dict(
                    model, opt, model_state_dict=m, optim_state_dict=o
                )
            )[1]
        )
    return {f"part_load_{k}": statistics.median(v) for k, v in parts.items()}


def worker(out: Path, quick: bool) -> None:
    """One rank; rank 0 writes medians (seconds) and sizes (bytes) to out/RESULT."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    model, opt = _build(quick, seed=0, step=True)
    params = sum(p.numel() for p in model.parameters())
    saves = measure_saves(model, opt, out)
    saves.update(measure_parts(model, opt, out))
    saved = _fingerprint(model, opt)
    del model, opt  # the digests stand in for them from here on
    loads = measure_loads(saves["sharded"], saves["baseline"], out / "parts-stock", saved, quick)

    if dist.get_rank() == 0:
        timings = {k: v for k, v in {**saves, **loads}.items() if isinstance(v, list) and v}
        result = {k: statistics.median(v) for k, v in timings.items()}
        result.update({k: v for k, v in {**saves, **loads}.items() if k.startswith("part_")})
        result.update(
            params=params,
            threads=torch.get_num_threads(),
            sizes={
                "sharded": _folder_bytes(saves["sharded"]),
                "torch_save": saves["baseline"].stat().st_size,
                "async": saves.get("async_bytes"),
            },
        )
        (out / RESULT).write_text(json.dumps(result))
    dist.destroy_process_group()


def print_table(r: dict, quick: bool) -> None:
    mb = {k: v / 1e6 for k, v in r["sizes"].items() if v is not None}
    print(
        f"BertForPreTraining {'4 layers' if quick else 'base'} ({r['params'] / 1e6:.0f}M params) + AdamW state, "
        f"DDP 2 ranks gloo, {r['threads']} thread/rank; median of {REPEATS}"
    )
    print(f"{'method':<34} {'MB':>8} {'seconds':>8} {'MB/s':>8}")
    rows = [
        ("save  recipebox sharded", mb["sharded"], r["sharded_save"]),
        ("save  recipebox, sizes only", mb["sharded"], r["sizes_only_save"]),
        ("save  torch.save (rank 0)", mb["torch_save"], r["torch_save"]),
        ("save  torch.save + fsync (rank 0)", mb["torch_save"], r["torch_save_fsync"]),
        ("load  recipebox sharded", mb["sharded"], r["sharded_load"]),
        ("load  recipebox, sizes only", mb["sharded"], r["sizes_only_load"]),
        ("load  torch.load+load_state_dict", mb["torch_save"], r["torch_load"]),
    ]
    for name, size, secs in rows:
        print(f"{name:<34} {size:>8.0f} {secs:>8.2f} {size / secs:>8.0f}")
    print(f"{'save  recipebox --async-save':<34} {mb['async']:>8.0f} {'blocked':>8} {'total':>8}")
    print(f"{'':<34} {'':>8} {r['async_blocked']:>8.2f} {r['async_total']:>8.2f}")
    print("one save, part by part (seconds):")
    parts = [
        ("get_state_dict", "part_state_dict"),
        ("one in-memory copy of the state", "part_memory_copy"),
        ("write: raw, hashed as written, fsync (as saved)", "part_write_raw"),
        ("write: raw, hashed as written, no fsync", "part_write_raw_nosync"),
        ("write: DCP stock (torch.save a tensor), fsync", "part_write_stock"),
        ("xxh3-64 of every file read back, in shares", "part_hash"),
        ("manifest + rename", "part_manifest_rename"),
    ]
    for name, key in parts:
        print(f"  {name:<48} {r[key]:>6.2f}")
    print("one load, part by part (seconds):")
    parts = [
        ("verify: sizes and xxh3-64 of every file", "part_load_verify_hashes"),
        ("verify: sizes only", "part_load_verify_sizes"),
        ("get_state_dict (the tensors to read into)", "part_load_state_dict"),
        ("read: raw, into them in place (as loaded)", "part_load_read_raw"),
        ("read: DCP stock (torch.load a tensor, copy)", "part_load_read_stock"),
        ("set_state_dict (model and optimizer)", "part_load_set_state_dict"),
    ]
    for name, key in parts:
        print(f"  {name:<48} {r[key]:>6.2f}")
    print(
        f"save: recipebox sharded vs torch.save: {r['sharded_save'] / r['torch_save']:.2f}x time; vs torch.save "
        f"+ fsync (durable when it returns, as ours is): {r['sharded_save'] / r['torch_save_fsync']:.2f}x"
    )
    print(f"save: content hashes cost {r['sharded_save'] - r['sizes_only_save']:+.2f} s over sizes only")
    print(f"load: recipebox sharded vs torch.load: {r['sharded_load'] / r['torch_load']:.2f}x time")
    print(
        f"load: sizes only (as --resume auto after its own check) vs torch.load: "
        f"{r['sizes_only_load'] / r['torch_load']:.2f}x time"
    )
    print(
        f"async save blocks the loop for {r['async_blocked']:.2f} s of {r['async_total']:.2f} s "
        f"({r['async_blocked'] / r['part_memory_copy']:.2f}x one in-memory copy of the state)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true", help="a 4-layer BERT, a smoke test")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to write (default: the system's temporary folder); /dev/shm takes the disk out and leaves "
        "the software's own cost",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.out, args.quick)
        return
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_", dir=args.dir) as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        quick = ["--quick"] if args.quick else []
        torchrun_two_ranks(
            ["bench/bench_checkpoint.py", "--worker", f"--out={run}", *quick], Path(tmp) / "worker.log"
        )
        result = json.loads((run / RESULT).read_text())
    print_table(result, args.quick)


if __name__ == "__main__":
    main()
