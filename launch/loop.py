"""The train/eval loop every recipe shares, driven by a `launch.task.Task` and a `launch.backends.Backend`.

Gradient accumulation with the step's loss normalised over every target of every micro-batch and rank,
clipping, AdamW with warmup + linear decay, autocast, evaluation of any split with task metrics summed over
ranks and records gathered to rank 0, throughput, and a step boundary where stop requests and checkpoints
happen.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from recipebox.checkpoints.export import PROCESSOR, processor_folder
from recipebox.checkpoints.sharded import (
    BackgroundSaves,
    checkpoint_folder,
    latest_complete_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_folders,
    verify_checkpoint,
)
from recipebox.data.sampler import ShardedSampler
from recipebox.launch.backends import ADAM_BETAS, ADAM_EPS, Backend, param_groups
from recipebox.launch.config import ConfigError, TrainConfig
from recipebox.launch.runtime import Runtime, ignore_signals
from recipebox.launch.task import Task, module_prefix, whole_model
from recipebox.launch.tracking import Tracker

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; run the same command again to continue
PREFIX = {"validation": "eval", "test": "test"}  # a split's metric prefix


def make_adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused where the device has it."""
    # One kernel for all parameters on CUDA and CPU (torch's default on CPU is a Python loop over tensors);
    # XLA traces the plain update into its graph.
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused)


@torch.no_grad()
def param_sums(rt: Runtime, model: nn.Module) -> list[float]:
    """Collective: one float64 fingerprint of `model`'s weights per rank (equal weights, equal numbers)."""
    mine = torch.zeros(1, dtype=torch.float64)
    for i, p in enumerate(model.parameters()):
        p = p.detach().double()
        mine += p.sum() * (1 + i % 7) + p.square().sum()
    return [t.item() for t in _from_every_rank(rt, mine)]


def training_data_key(rows) -> str | None:
    """What names a training set from run to run: the content key a `datasets` table was made under (its
    fingerprint: data, labels, tokeniser and settings, data.text.content_key) or a recipe's own dataset's
    `fingerprint`; None where neither is known (nothing is checked then)."""
    key = getattr(rows, "fingerprint", None) or getattr(rows, "_fingerprint", None)
    return key if isinstance(key, str) else None


def _from_every_rank(rt: Runtime, mine: torch.Tensor) -> list[torch.Tensor]:
    """Collective: every rank's `mine` (one element), in rank order."""
    if not rt.distributed:
        return [mine]
    mine = mine.to(rt.device)
    every = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(every, mine)
    return every


def check_built_alike(rt: Runtime, model: nn.Module) -> None:
    """--check-replicas, before the backend wraps the model: every rank built the same weights, byte for byte
    (a hash of the bytes, not a float sum, whose last bit may depend on the CPU). FSDP2 keeps each rank's
    own slice of what it built, so ranks that drew differently would train a patchwork."""
    digest = hashlib.blake2b(digest_size=8)
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    mine = torch.tensor([int.from_bytes(digest.digest(), "little", signed=True)], dtype=torch.int64)
    hashes = [f"{t.item() & (2**64 - 1):016x}" for t in _from_every_rank(rt, mine)]
    if len(set(hashes)) > 1:
        raise RuntimeError(
            f"the ranks built different weights (hashes by rank {hashes}): a build step drew random numbers "
            "differently on some ranks; build under the run's seed on every rank (Runtime.start seeds it)"
        )


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    consumed: int = 0  # samples of `epoch` this rank has already trained on


class Trainer:
    def __init__(
        self, cfg: TrainConfig, rt: Runtime, backend: Backend, task: Task, *, run_dir: Path | None = None
    ):
        self.cfg, self.rt, self.backend, self.task = cfg, rt, backend, task
        self.tracker: Tracker | None = None
        self.run_dir = run_dir
        self.export_prefix = module_prefix(task.trained, task.model)
        self.stopped = False  # a stop request (preemption) ended the run early
        self._last_save = (-1, time.monotonic())  # (step, time) of the last save or resume
        # The log window's running sums (this rank's loss share, grad norm, steps/samples/tokens), kept here
        # so a checkpoint between two logs carries them: a resumed run logs the same mean over the window.
        self._window: tuple = (0.0, 0.0, torch.zeros(3, dtype=torch.float64))
        self.peak_tflops = cfg.peak_tflops or _device_peak(rt.device, cfg.precision)
        pinned = rt.device.type == "cuda"
        self.background = BackgroundSaves(pinned) if cfg.async_save and run_dir is not None else None
        train = task.splits["train"]
        self.sampler = ShardedSampler(
            len(train), rank=rt.rank, world_size=rt.world_size, batch_size=cfg.batch_size, seed=cfg.seed,
            lengths=task.lengths,
        )  # fmt: skip
        # Backends that compile one graph per shape train on whole batches only: a last partial batch of an
        # epoch is dropped.
        per_epoch = self.sampler.per_rank / cfg.batch_size
        self.batches_per_epoch = math.floor(per_epoch) if backend.static_shapes else math.ceil(per_epoch)
        self.epoch_samples = min(self.batches_per_epoch * cfg.batch_size, self.sampler.per_rank)  # per rank
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"--backend {backend.name} trains on whole batches only, and {self.sampler.per_rank} training "
                f"samples per rank make no batch of {cfg.batch_size}; lower --batch-size"
            )
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))
        warmup = int(cfg.warmup_ratio * self.total_steps)
        backend.setup(
            task.trained,
            lambda m: make_adamw(m, cfg.lr, cfg.weight_decay),
            lambda opt: linear_schedule(opt, warmup, self.total_steps),
        )
        self.collate = backend.wrap_collate(task.collate)
        self.state = TrainState()
        # Task randomness (masking) draws on the host, before the copy, from its own generator: reproducible
        # per rank, saved and restored with the checkpoint, and what it decides (which positions are masked)
        # is known on the host, so the step never asks the device.
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + rt.rank)
        self._batches: Iterator | None = None

    # -- data ---------------------------------------------------------------------------------------------
    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=self.collate,
            num_workers=self.cfg.num_workers,
            worker_init_fn=functools.partial(ignore_signals, self.rt.stop_signals),  # the rank stops them
            pin_memory=self.backend.device.type == "cuda",
            # Its own generator: a DataLoader otherwise draws a seed from the global RNG at every new
            # iterator, and a resumed run starts one mid-epoch, which would shift every dropout mask after.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _next_batch(self) -> dict[str, torch.Tensor]:
        while True:
            if self._batches is None:
                self.sampler.set_epoch(self.state.epoch, self.state.consumed)
                train = self.task.splits["train"]
                loader = self._loader(train, self.sampler, self.cfg.batch_size, self.backend.static_shapes)
                self._batches = iter(loader)
            batch = next(self._batches, None)
            if batch is not None:
                self.state.consumed += len(next(iter(batch.values())))
                return batch
            self.state.epoch, self.state.consumed, self._batches = self.state.epoch + 1, 0, None

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.backend.data_device
        pin = device.type == "cuda"  # what `prepare` made is not pinned yet: a pageable copy would wait
        moved = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = (v.pin_memory() if pin and not v.is_pinned() else v).to(device, non_blocking=True)
            moved[k] = v
        return moved

    def _all_ranks_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.rt.distributed:
            dist.all_reduce(t)
        return t

    # -- phases -------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """One optimizer step over `grad_accum` micro-batches: (this rank's share x world of the step's loss,
        gradient norm, samples, real tokens)."""
        task, backend = self.task, self.backend
        backend.model.train()
        micro, samples, tokens = [], 0, 0
        for _ in range(self.cfg.grad_accum):
            host = self._next_batch()
            rows, real = task.sizes(host)
            samples, tokens = samples + rows, tokens + real
            micro.append(self._to_device(task.prepare(host, self.generator)))
        # Each term's targets over the whole step, every rank, before any backward: gradients (averaged over
        # ranks by every backend, hence x world) are then those of sum / count over the step.
        per_batch = [task.targets(b) for b in micro]
        terms = sorted(per_batch[0])
        counts = self._all_ranks_sum(torch.stack([sum(t[n] for t in per_batch).float() for n in terms]))
        scale = (self.rt.world_size / counts.clamp(min=1)).to(backend.device)
        step_loss = torch.zeros((), device=backend.device)
        for i, batch in enumerate(micro):
            with backend.accumulating(sync=i == len(micro) - 1):
                with backend.autocast():
                    sums, _ = task.loss(backend.model, backend.place_batch(batch))
                loss = sum(sums[n].float() * scale[j] for j, n in enumerate(terms))
                backend.backward(loss)
            step_loss += loss.detach()
        norm = backend.step(self.cfg.max_grad_norm)
        self.state.step += 1
        return step_loss, norm, samples, tokens

    @torch.no_grad()
    def replica_param_sums(self) -> list[float]:
        """Collective: one float64 fingerprint of the trained weights per rank; replicas must agree exactly.
        A check for tests (--check-replicas), not part of a run: it gathers the whole model on every rank."""
        whole = whole_model(self.task, self.backend.full_state_dict(every_rank=True), self.export_prefix)
        return param_sums(self.rt, whole)

    @torch.no_grad()
    def evaluate(self, split: str = "validation") -> dict[str, float] | None:
        """Loss and task metrics over a whole split, each rank a disjoint share: counts summed exactly over
        ranks, records gathered to rank 0, which alone adds the task's summary. Keys are PREFIX[split]/...

        None when a stop signal came during it: the ranks vote before each batch (they run the same batches),
        so a preempted run saves within one batch instead of after the whole split. It leaves the run's RNG
        streams (torch's, CUDA's, Python's, numpy's) as it found them: training goes on the same with or
        without it, so the checkpoint of a step may come before the step's evaluation."""
        devices = [self.rt.device] if self.rt.device.type == "cuda" else []
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices):
                return self._evaluate(split)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def _evaluate(self, split: str) -> dict[str, float] | None:
        task, backend, rt = self.task, self.backend, self.rt
        data = task.splits.get(split)
        if data is None or len(data) == 0:
            return {}
        model = backend.model
        model.eval()
        indices = list(range(rt.rank, len(data), rt.world_size))
        # A rank without rows (a split smaller than the world) still joins every collective forward, with row
        # 0, counting nothing.
        shard = Subset(data, indices or [0])
        loader = self._loader(shard, None, self.cfg.eval_batch_size or self.cfg.batch_size)
        # Each batch names its rows (`_row`, their indices in the split; the loader keeps `indices` in order), so
        # a task can draw each row's randomness from the row alone: the same on any number of ranks.
        row_ids = torch.tensor(indices or [0])
        # Randomness drawn without `_row` comes from one stream per rank, the same at every evaluation.
        g = torch.Generator().manual_seed(self.cfg.seed + 7919 * (rt.rank + 1))
        generate = None if backend.static_shapes else backend.generate
        sums: dict[str, torch.Tensor] = {}  # name -> [numerator, denominator]
        # Every rank runs as many batches as the busiest one (FSDP and ZeRO-3 gather layers collectively, in
        # forward and in generate); the extra ones repeat a batch and are not counted.
        batches = torch.tensor([len(loader)], device=rt.device)
        if rt.distributed:
            dist.all_reduce(batches, op=dist.ReduceOp.MAX)
        it, batch, records, seen = iter(loader), None, [], 0
        for _ in range(int(batches.item())):
            if rt.any_rank(rt.stop_requested):
                return None
            fresh = next(it, None)
            if fresh is not None:
                n = len(next(iter(fresh.values())))
                fresh["_row"], seen = row_ids[seen : seen + n], seen + n
                batch = self._to_device(task.prepare(fresh, g))
            with backend.autocast():
                losses, outputs = backend.to_data_device(task.loss(model, backend.place_batch(batch)))
            counts, rows = task.evaluate(model, batch, outputs, generate)
            if fresh is None or not indices:
                continue
            targets = task.targets(batch)
            pairs = {f"loss/{n}": torch.stack([losses[n].float(), targets[n].float()]) for n in losses}
            for name, pair in {**pairs, **counts}.items():
                sums[name] = sums.get(name, 0) + pair.detach().double().to(rt.device)
            records.extend(rows)
        names = [sorted(sums)]  # rank 0's: it always has rows
        if rt.distributed:
            dist.broadcast_object_list(names, src=0)
        zero = torch.zeros(2, dtype=torch.float64, device=rt.device)
        stacked = self._all_ranks_sum(torch.stack([sums.get(n, zero) for n in names[0]])).cpu()
        means = {n: (v[0] / v[1]).item() if v[1] > 0 else float("nan") for n, v in zip(names[0], stacked)}
        terms = [n for n in means if n.startswith("loss/")]
        if len(terms) == 1:  # one term: it is the loss
            means["loss"] = means.pop(terms[0])
        elif terms:  # several: each has its mean (eval/loss/<term>), the loss is their sum
            means["loss"] = sum(means[n] for n in terms)
        if records and len(records) != len(indices):
            raise RuntimeError(f"evaluate gave {len(records)} records for {len(indices)} {split} rows")
        every = self._gather_to_main(list(zip(indices, records)))
        if rt.is_main:
            ordered = [r for _, r in sorted(every, key=lambda p: p[0])]
            means.update(task.summarize(ordered, dict(means), split))
        return {f"{PREFIX.get(split, split)}/{k}": v for k, v in means.items()}

    def _gather_to_main(self, mine: list) -> list:
        """Every rank's (index, record) pairs on rank 0 (our own ranks' objects, never a file); [] elsewhere."""
        if not self.rt.distributed:
            return mine
        every = [None] * self.rt.world_size if self.rt.is_main else None
        dist.gather_object(mine, every, dst=0)
        return [pair for part in every for pair in part] if self.rt.is_main else []

    # -- checkpoints --------------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def save(self) -> Path:
        """Collective: model, optimizer, schedule, data position and every rank's RNG states."""
        rank_state = {"rng/torch": torch.get_rng_state(), "rng/task": self.generator.get_state()}
        if self.rt.device.type == "cuda":
            rank_state["rng/cuda"] = torch.cuda.get_rng_state(self.rt.device)
        numpy_state = np.random.get_state()  # e.g. wav2vec2's SpecAugment masks draw from numpy
        rank_meta = {
            "python_random": _jsonable_random_state(random.getstate()),
            "numpy_random": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        }
        epoch, consumed = self.state.epoch, self.state.consumed
        if consumed >= self.epoch_samples:  # its last batch is trained: the next epoch is where to go on from
            epoch, consumed = epoch + 1, 0  # (a resume on another world size would deal the rest of this one)
        meta = {
            "step": self.state.step,
            "epoch": epoch,
            "consumed": consumed,
            "world_size": self.rt.world_size,
            "batch_size": self.cfg.batch_size,
            "backend": self.backend.name,
            "scheduler": self.backend.scheduler.state_dict(),
            "tracker_run_id": self.tracker.run_id if self.tracker else None,
            "export": {"model_prefix": self.export_prefix},
            "train_data": training_data_key(self.task.splits["train"]),
            "log_window": self._window_meta(),
        }
        path = save_checkpoint(
            self.checkpoint_root,
            self.state.step,
            state=self.backend.checkpoint_state(),
            rank_state=rank_state,
            rank_meta=rank_meta,
            meta=meta,
            extra_files={
                "hf": self.run_dir / "model_config",
                f"hf/{PROCESSOR}": processor_folder(self.run_dir),
            },
            keep_last=self.cfg.keep_last,
            checksums=self.cfg.checkpoint_checksums,
            background=self.background,
        )
        self._last_save = (self.state.step, time.monotonic())
        return path

    def _window_meta(self) -> dict:
        """The log window so far, over all ranks (a checkpoint is a sync point): its steps, the loss summed
        over ranks, the grad norm summed over steps (the same on every rank)."""
        loss, norm, counts = self._window
        total = self._all_ranks_sum(torch.as_tensor(loss, dtype=torch.float64).reshape(1).to(self.rt.device))
        return {"steps": int(counts[0]), "loss": total.item(), "grad_norm": float(norm)}

    def finish_saves(self) -> None:
        """Wait for a checkpoint still being written in the background (--async-save) to be committed."""
        if self.background is not None:
            self.background.wait()

    def resume(self) -> dict | None:
        """Restore from --resume (auto: the newest complete checkpoint of this run, if any); the saved meta."""
        mode, root = self.cfg.resume, self.checkpoint_root
        if mode == "never":
            if step_folders(root):
                raise ConfigError(
                    f"{root} already holds checkpoints and --resume never was given; "
                    f"use --resume auto to continue that run or another --output-dir to start afresh"
                )
            return None
        checksums = self.cfg.checkpoint_checksums
        # auto, and --resume PATH once the run has saved its own (a requeue or rerun of the same command
        # continues; it does not start again from PATH): the newest verified here, so loading checks sizes.
        path = latest_complete_checkpoint(root, report=self.rt.print, checksums=checksums)
        verified = path is not None
        if not verified and step_folders(root):  # training from step 0 would replace what the run made
            raise ConfigError(
                f"{root}: none of this run's checkpoints verifies (each is named above), so it cannot "
                f"continue; move that folder aside (or delete it) to train this run again from step 0, or "
                f"give a new --output-dir"
            )
        if mode != "auto" and path is not None:
            self.rt.print(f"--resume {mode}: this run has saved checkpoints of its own since; it continues from "
                          f"its newest (to start again from {mode}, give a new --output-dir)")  # fmt: skip
        elif mode != "auto":
            path = checkpoint_folder(mode)
        if path is None:
            return None
        # From the manifest, before any state is read: a checkpoint of other data is refused at once.
        saved = verify_checkpoint(path, checksums=False)["meta"].get("train_data")
        now = training_data_key(self.task.splits["train"])
        if saved and now and saved != now:  # resuming means continuing the same training
            raise ConfigError(
                f"{path} was trained on other training data (another file, other contents or labels, or other "
                f"tokenisation settings: key {saved}, this run's {now}); the same command continues a run. "
                f"To train on this data, give a new --output-dir (to start from that run's weights, export "
                f"it with python -m recipebox.checkpoints export and pass the export as --model)"
            )
        state = self.backend.checkpoint_state()
        meta, rank_state, rank_meta = load_checkpoint(path, state=state, checksums=checksums and not verified)
        self.state.step = meta["step"]
        self.state.epoch = meta["epoch"]
        # Checkpoints from before the schedule was saved: its position is the step.
        schedule = meta.get("scheduler") or {"last_epoch": meta["step"], "_step_count": meta["step"] + 1}
        self.backend.scheduler.load_state_dict({**self.backend.scheduler.state_dict(), **schedule})
        if rank_state is not None:  # same world size: continue exactly
            self.state.consumed = meta["consumed"]
            torch.set_rng_state(rank_state["rng/torch"])
            self.generator.set_state(rank_state["rng/task"])
            if "rng/cuda" in rank_state:
                torch.cuda.set_rng_state(rank_state["rng/cuda"], self.rt.device)
            random.setstate(_random_state_from_json(rank_meta["python_random"]))
            if "numpy_random" in rank_meta:  # checkpoints before it was saved: numpy starts from the seed
                name, keys, *rest = rank_meta["numpy_random"]
                np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        else:
            # Another world size: keep the global position (samples of the epoch already seen by all ranks);
            # with the same global batch the same samples come next. RNG streams start anew per rank.
            self.state.consumed = meta["consumed"] * meta["world_size"] // self.rt.world_size
            self.rt.print(
                f"resharding {path}: saved by {meta['world_size']} rank(s), resumed by {self.rt.world_size}"
            )
        saved_batch, batch = meta["batch_size"] * meta["world_size"], self.cfg.batch_size * self.rt.world_size
        if saved_batch != batch:  # the epoch's order is cut into batches of that size before it is dealt
            fits = saved_batch % self.rt.world_size == 0
            hint = f" (--batch-size {saved_batch // self.rt.world_size} here)" if fits else ""
            self.rt.print(
                f"warning: {path} was saved with --batch-size x ranks = {saved_batch}, this run has {batch}: "
                f"until this epoch ends some samples come again and others are skipped; keep {saved_batch}"
                f"{hint} to continue exactly"
            )
        self._last_save = (self.state.step, time.monotonic())
        if window := meta.get("log_window"):  # rank 0 carries the loss summed over the saving ranks
            counts = torch.tensor([window["steps"], 0, 0], dtype=torch.float64)  # throughput: from now on
            # Each rank's loss share is its part times the world size: rescaled to this run's world size.
            loss = window["loss"] / meta["world_size"] * self.rt.world_size if self.rt.is_main else 0.0
            self._window = (loss, window["grad_norm"], counts)
        self.rt.print(f"resumed from {path} at step {self.state.step}")
        return meta

    def _save_due(self, step: int) -> bool:
        cfg = self.cfg
        if cfg.save_every and step % cfg.save_every == 0:
            return True
        if cfg.save_every_minutes:
            # Every rank votes at every step: clocks differ, and a collective that only some ranks join hangs.
            return self.rt.any_rank(time.monotonic() - self._last_save[1] >= cfg.save_every_minutes * 60)
        return False

    # -- the run ------------------------------------------------------------------------------------------
    def fit(self, tracker: Tracker) -> dict[str, float]:
        cfg, rt = self.cfg, self.rt
        from tqdm.auto import tqdm

        self.tracker = tracker
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not rt.is_main, desc="train")
        # Loss and norm add up where they are (on the GPU) and are read at log steps only: a step never waits
        # for the device. Sizes come from host batches.
        window_loss, window_norm, window = self._window  # window: steps, samples, tokens since the last log
        # A step's evaluation comes after its checkpoint, so a run resumed from that checkpoint evaluates first.
        if self._eval_due(self.state.step) and not self._evaluate_between_steps(tracker):
            return self._stop(bar)
        t0 = time.perf_counter()
        while self.state.step < self.total_steps:
            loss, norm, samples, tokens = self.train_step()
            window_loss = window_loss + loss
            window_norm = window_norm + norm.detach().float()
            window += torch.tensor([1, samples, tokens], dtype=torch.float64)
            bar.update(1)
            step = self.state.step
            if step % cfg.log_every == 0 or step == self.total_steps:
                self._log_window(window_loss, window_norm, window, t0, bar)
                window_loss, window_norm = 0.0, 0.0
                window.zero_()
                t0 = time.perf_counter()
            self._window = (window_loss, window_norm, window)
            # The stop vote, then the save, then the evaluation: a stop asked for before it is not kept waiting
            # by it (one asked for during it ends it, below). Their time is left out of the log window's.
            stop = rt.any_rank(rt.stop_requested)  # a host-side vote: no wait for the device
            save = self.run_dir is not None and (stop or self._save_due(step))
            evaluate = not stop and self._eval_due(step)
            paused = self._device_caught_up() if save or evaluate else None
            if save:
                self.save()
            if evaluate:
                stop = not self._evaluate_between_steps(tracker)
            if stop:
                return self._stop(bar)
            if paused is not None:
                t0 += time.perf_counter() - paused
        bar.close()
        if self.run_dir is not None and self._last_save[0] != self.state.step:
            self.save()
        if cfg.check_replicas:
            tracker.log({"replica_param_sums": self.replica_param_sums()}, self.state.step)
        final = self.evaluate()  # overlaps the last checkpoint's write (--async-save)
        self.finish_saves()
        if self.stop_voted(during_evaluation=final is None):
            return {}
        tracker.log(final, self.state.step)
        tracker.summary(final)
        return final

    def _device_caught_up(self) -> float:
        """The time once the device has run what the host queued (a pause's start: the step's kernels still
        queued on a GPU belong to the training time)."""
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)
        return time.perf_counter()

    def _eval_due(self, step: int) -> bool:
        """An --eval-every evaluation follows this step (the one after the last step is the final one)."""
        every = self.cfg.eval_every
        return bool(every) and 0 < step < self.total_steps and step % every == 0

    def _evaluate_between_steps(self, tracker: Tracker) -> bool:
        """The --eval-every evaluation after the current step, logged; False when a stop signal ended it, and
        then the step is saved (if it was not just before), to be evaluated again by the rerun."""
        metrics = self.evaluate()
        if metrics is not None:
            tracker.log(metrics, self.state.step)
            return True
        if self.run_dir is not None and self._last_save[0] != self.state.step:
            self.save()
        return False

    def _stop(self, bar) -> dict:
        """End training on a stop request, once the checkpoint is committed."""
        self.finish_saves()
        saved = f"stopped at step {self.state.step} on request; checkpoint saved"
        self.rt.print(saved if self.run_dir else "stopped")
        self.stopped = True
        bar.close()
        return {}

    def stop_voted(self, during_evaluation: bool = False) -> bool:
        """After training: a stop signal that came during the final save or an evaluation (`during_evaluation`:
        it ended one, so every rank knows already) ends the run now (exit 75, requeued with --requeue) rather
        than when the scheduler kills it mid-export; the last checkpoint holds the final step, so the same
        command evaluates and exports without training."""
        if not during_evaluation and (self.run_dir is None or not self.rt.any_rank(self.rt.stop_requested)):
            return False
        saved = "; its checkpoint is saved" if self.run_dir else ""
        self.rt.print(f"stopped on request after step {self.state.step}, the last{saved}")
        self.stopped = True
        return True

    def _log_window(self, window_loss, window_norm, window: torch.Tensor, t0: float, bar) -> None:
        # The one read of the window's device values: at log steps only. The window's time ends after it, when
        # the device has run every step of the window, not when the host has merely queued them.
        stats = torch.cat([window_loss.detach().double().reshape(1).cpu(), window])
        elapsed = time.perf_counter() - t0
        stats = self._all_ranks_sum(stats.to(self.rt.device)).cpu()
        steps = window[0].item()
        loss_mean = (
            stats[0].item() / stats[1].item()
        )  # each rank's share x world, summed over ranks and steps
        metrics = {
            "train/loss": loss_mean,
            "train/grad_norm": float(window_norm) / steps,  # the same on every rank
            "train/lr": self.backend.current_lr(),
            "train/samples_per_s": stats[2].item() / elapsed,
            "train/tokens_per_s": stats[3].item() / elapsed,
            "train/epoch": self.state.epoch + self.state.consumed / max(1, self.sampler.per_rank),
        }
        if self.task.flops_per_token:  # achieved model FLOP/s per device, and its share of the peak
            metrics["train/tflops"] = self.task.flops_per_token * metrics["train/tokens_per_s"] / 1e12
            metrics["train/tflops"] /= self.rt.world_size
            if self.peak_tflops:
                metrics["train/mfu"] = metrics["train/tflops"] / self.peak_tflops
        if self.backend.device.type == "cuda":  # the allocator's own counter: no wait for the device
            metrics["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.backend.device) / 1e9
        metrics.update(self.backend.log_metrics())  # e.g. XLA's compile count
        self.tracker.log(metrics, self.state.step)
        bar.set_postfix(loss=f"{loss_mean:.4f}")


def _device_peak(device: torch.device, precision: str) -> float | None:
    """The dense peak TFLOPS of this GPU at the run's precision (launch.flops' table); None elsewhere."""
    if device.type != "cuda":
        return None
    from recipebox.launch.flops import device_peak_tflops

    dtype = "bf16" if precision in ("auto", "bf16-pure") else precision
    return device_peak_tflops(torch.cuda.get_device_name(device), dtype)


def _jsonable_random_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(state: list):
    return (state[0], tuple(state[1]), state[2])
