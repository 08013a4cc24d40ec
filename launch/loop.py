"""The train/eval loop every recipe shares.

Gradient accumulation, clipping, AdamW with warmup + linear decay, autocast, periodic evaluation with task
metrics summed over ranks, throughput, and a step boundary where stop requests and checkpoints happen.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from checkpoints.sharded import latest_complete_checkpoint, load_checkpoint, save_checkpoint
from data.sampler import ShardedSampler
from launch.config import ConfigError, TrainConfig
from launch.runtime import Runtime
from launch.tracking import Tracker

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; run the same command again to continue

# A recipe's hooks: move task randomness (e.g. MLM masking) onto the device batch, and count task metrics
# as {name: tensor([numerator, denominator])} so they sum exactly over batches and ranks.
PrepareBatch = Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]]
CountMetrics = Callable[[object, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
# Metrics that do not sum (macro F1, entity F1 after merging windows): `collect` turns one eval batch into
# one picklable record per sample; `summarize` gets every rank's records in eval-set order, on rank 0.
Collect = Callable[[object, dict], list]
Summarize = Callable[[list], dict[str, float]]


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """What the model sees: a batch's keys that start with "_" (example ids, word ids) are for metrics."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def make_adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without decay on biases and norm weights (the BERT recipe), fused where the device has it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One kernel for all parameters on CUDA and CPU (torch's default on CPU is a Python loop over tensors:
    # about 30 % of a MiniLM fine-tuning step on one thread); XLA traces the plain update into its graph.
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


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
        self,
        cfg: TrainConfig,
        rt: Runtime,
        backend,
        model: nn.Module,
        train_data,
        eval_data,
        collate: Callable,
        *,
        run_dir: Path | None = None,
        export_files: dict[str, Path] | None = None,
        export_prefix: str = "",
        prepare_batch: PrepareBatch | None = None,
        count_metrics: CountMetrics | None = None,
        lengths: list[int] | None = None,
        collect: Collect | None = None,
        summarize: Summarize | None = None,
    ):
        self.cfg, self.rt, self.backend = cfg, rt, backend
        self.tracker: Tracker | None = None
        self.run_dir, self.export_files = run_dir, export_files or {}
        self.export_prefix = export_prefix  # where the exported model sits in the trained one ("model.")
        self.stopped = False  # a stop request (preemption) ended the run early
        self._last_save = (-1, time.monotonic())  # (step, time) of the last save or resume
        self.train_data, self.eval_data, self.collate = train_data, eval_data, collate
        self.prepare_batch = prepare_batch or (lambda batch, _g: batch)
        self.count_metrics = count_metrics
        self.collect, self.summarize = collect, summarize
        self.sampler = ShardedSampler(
            len(train_data),
            rank=rt.rank,
            world_size=rt.world_size,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            lengths=lengths,
        )
        # Backends that compile one graph per shape (XLA) train on whole batches only: a last partial batch
        # of an epoch is dropped.
        self.whole_batches = getattr(backend, "whole_batches", False)
        per_epoch = self.sampler.per_rank / cfg.batch_size
        self.batches_per_epoch = math.floor(per_epoch) if self.whole_batches else math.ceil(per_epoch)
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
            model,
            lambda m: make_adamw(m, cfg.lr, cfg.weight_decay),
            lambda opt: linear_schedule(opt, warmup, self.total_steps),
            cfg=cfg,
        )
        # XLA pads batches to a few bucket lengths, prepares them on the host (data_device) and places them
        # on its devices itself; the other backends keep the recipe's collate and move batches here.
        self.collate = getattr(backend, "wrap_collate", lambda c: c)(collate)
        self.data_device = getattr(backend, "data_device", rt.device)
        self.place_batch = getattr(backend, "place_batch", lambda b: b)
        self.state = TrainState()
        # Task randomness on the device (masking) draws from its own generator, so it is reproducible
        # per rank and can be saved and restored with the checkpoint.
        self.generator = torch.Generator(device=self.data_device).manual_seed(cfg.seed * 1000 + rt.rank)
        self._batches: Iterator | None = None

    # -- data ---------------------------------------------------------------------------------------------
    def _loader(self, dataset, sampler, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=self.collate,
            num_workers=self.cfg.num_workers,
            pin_memory=self.rt.device.type == "cuda",
            # Its own generator: a DataLoader otherwise draws a seed from the global RNG at every new
            # iterator, and a resumed run starts one mid-epoch, which would shift every dropout mask after.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _next_batch(self) -> dict[str, torch.Tensor]:
        while True:
            if self._batches is None:
                self.sampler.set_epoch(self.state.epoch, self.state.consumed)
                self._batches = iter(self._loader(self.train_data, self.sampler, self.whole_batches))
            batch = next(self._batches, None)
            if batch is not None:
                self.state.consumed += len(next(iter(batch.values())))
                return batch
            self.state.epoch, self.state.consumed, self._batches = self.state.epoch + 1, 0, None

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: v.to(self.data_device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    # -- phases -------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, int, int]:
        """One optimizer step over `grad_accum` micro-batches: (mean loss, samples, real tokens)."""
        model, backend = self.backend.model, self.backend
        model.train()
        loss_sum = torch.zeros((), device=self.rt.device)
        samples = tokens = 0
        for micro in range(self.cfg.grad_accum):
            batch = self.prepare_batch(self._to_device(self._next_batch()), self.generator)
            samples += batch["input_ids"].shape[0]
            tokens += (
                int(batch["attention_mask"].sum())
                if "attention_mask" in batch
                else batch["input_ids"].numel()
            )
            batch = self.place_batch(batch)
            with backend.accumulating(sync=micro == self.cfg.grad_accum - 1):
                with backend.autocast():
                    loss = model(**model_inputs(batch)).loss / self.cfg.grad_accum
                backend.backward(loss)
            loss_sum += loss.detach()
        backend.step(self.cfg.max_grad_norm)
        self.state.step += 1
        return loss_sum, samples, tokens

    @torch.no_grad()
    def replica_param_sums(self) -> list[float]:
        """One float64 fingerprint of the parameters per rank; data-parallel replicas must agree exactly."""
        mine = torch.zeros(1, dtype=torch.float64, device=self.rt.device)
        gathered = getattr(self.backend, "gathered_parameters", None)  # ZeRO-3 partitions parameters
        plain = contextlib.nullcontext(list(self.backend.raw_model.parameters()))
        with gathered() if gathered else plain as params:
            for i, p in enumerate(params):
                p = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()  # FSDP shards
                mine += p.double().sum() * (1 + i % 7) + p.double().square().sum()
        if not self.rt.distributed:
            return [mine.item()]
        every = [torch.zeros_like(mine) for _ in range(self.rt.world_size)]
        torch.distributed.all_gather(every, mine)
        return [t.item() for t in every]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and task metrics over the whole eval split, each rank a disjoint share, summed exactly."""
        if self.eval_data is None or len(self.eval_data) == 0:
            return {}
        model = self.backend.model
        model.eval()
        indices = list(range(self.rt.rank, len(self.eval_data), self.rt.world_size))
        loader = self._loader(torch.utils.data.Subset(self.eval_data, indices), None)
        # The same masks at every evaluation, so successive numbers are comparable.
        g = torch.Generator(device=self.data_device).manual_seed(self.cfg.seed + 7919 * (self.rt.rank + 1))
        # Metrics are summed where batches are prepared (XLA: on the host, with outputs fetched there).
        dev = self.data_device
        sums: dict[str, torch.Tensor] = {"loss": torch.zeros(2, device=dev, dtype=torch.float64)}
        # Every rank runs as many forwards as the busiest one (FSDP gathers layers collectively); the
        # extra ones repeat a batch and are not counted.
        batches = torch.tensor([len(loader)], device=dev)
        if self.rt.distributed:
            torch.distributed.all_reduce(batches, op=torch.distributed.ReduceOp.MAX)
        it, batch, records = iter(loader), None, []
        for _ in range(int(batches.item())):
            fresh = next(it, None)
            batch = self.prepare_batch(self._to_device(fresh), g) if fresh is not None else batch
            with self.backend.autocast():
                out = model(**model_inputs(self.place_batch(batch)))
            if fresh is None:
                continue
            if self.collect is not None:
                records.extend(self.collect(out, batch))
            n = batch["input_ids"].shape[0]
            sums["loss"] += torch.tensor([out.loss.item() * n, n], device=dev, dtype=torch.float64)
            for name, pair in (self.count_metrics(out, batch) if self.count_metrics else {}).items():
                sums.setdefault(name, torch.zeros(2, device=dev, dtype=torch.float64))
                sums[name] += pair.to(torch.float64)
        names = sorted(sums)
        # Ranks may have different metric keys only if a shard is empty; the key list is fixed by rank 0's.
        stacked = torch.stack([sums[n] for n in names])
        if self.rt.distributed:
            torch.distributed.all_reduce(stacked)
        metrics = {
            f"eval/{n}": (v[0] / v[1]).item() if v[1] > 0 else float("nan") for n, v in zip(names, stacked)
        }
        if self.summarize is not None:
            metrics.update({f"eval/{k}": v for k, v in self._summarize(indices, records).items()})
        return metrics

    def _summarize(self, indices: list[int], records: list) -> dict[str, float]:
        """Rank 0 puts every rank's records back in eval-set order and computes; all ranks get the result."""
        if len(records) != len(indices):
            raise RuntimeError(f"collect gave {len(records)} records for {len(indices)} eval samples")
        mine = list(zip(indices, records))
        if self.rt.distributed:
            every = [None] * self.rt.world_size
            torch.distributed.all_gather_object(every, mine)  # our own ranks' records, never a file
            mine = [pair for part in every for pair in part]
        result = (
            [self.summarize([r for _, r in sorted(mine, key=lambda p: p[0])])] if self.rt.is_main else [None]
        )
        if self.rt.distributed:
            torch.distributed.broadcast_object_list(result, src=0)
        return result[0]

    # -- checkpoints --------------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def save(self) -> Path:
        """Collective: model, optimizer, schedule, data position and every rank's RNG states."""
        rank_state = {"rng/torch": torch.get_rng_state(), "rng/task": self.generator.get_state()}
        if self.rt.device.type == "cuda":
            rank_state["rng/cuda"] = torch.cuda.get_rng_state(self.rt.device)
        rank_meta = {"python_random": _jsonable_random_state(random.getstate())}
        meta = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "consumed": self.state.consumed,
            "world_size": self.rt.world_size,
            "batch_size": self.cfg.batch_size,
            "backend": self.backend.name,
            "tracker_run_id": self.tracker.run_id if self.tracker else None,
            "export": {"model_prefix": self.export_prefix},
        }
        path = save_checkpoint(
            self.checkpoint_root,
            self.state.step,
            state=self.backend.checkpoint_state(),
            rank_state=rank_state,
            rank_meta=rank_meta,
            meta=meta,
            extra_files=self.export_files,
            keep_last=self.cfg.keep_last,
        )
        self._last_save = (self.state.step, time.monotonic())
        return path

    def resume(self) -> dict | None:
        """Restore from --resume (auto: the newest complete checkpoint of this run, if any); the saved meta."""
        mode, root = self.cfg.resume, self.checkpoint_root
        if mode == "never":
            if any(root.glob("step-*")):
                raise ConfigError(
                    f"{root} already holds checkpoints and --resume never was given; "
                    f"use --resume auto to continue that run or another --output-dir to start afresh"
                )
            return None
        path = latest_complete_checkpoint(root, report=self.rt.print) if mode == "auto" else Path(mode)
        if path is None:
            return None
        meta, rank_state, rank_meta = load_checkpoint(path, state=self.backend.checkpoint_state())
        self.state.step = meta["step"]
        self.state.epoch = meta["epoch"]
        self.backend.scheduler.last_epoch = self.state.step
        self.backend.scheduler._step_count = self.state.step + 1
        if rank_state is not None:  # same world size: continue exactly
            self.state.consumed = meta["consumed"]
            torch.set_rng_state(rank_state["rng/torch"])
            self.generator.set_state(rank_state["rng/task"])
            if "rng/cuda" in rank_state:
                torch.cuda.set_rng_state(rank_state["rng/cuda"], self.rt.device)
            random.setstate(_random_state_from_json(rank_meta["python_random"]))
        else:
            # Another world size: keep the global position (samples of the epoch already seen by all ranks);
            # with the same global batch the same samples come next. RNG streams start anew per rank.
            self.state.consumed = meta["consumed"] * meta["world_size"] // self.rt.world_size
            self.rt.print(
                f"resharding {path}: saved by {meta['world_size']} rank(s), resumed by {self.rt.world_size}"
            )
        self._last_save = (self.state.step, time.monotonic())
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
        window_loss = torch.zeros((), device=rt.device)
        window = torch.zeros(3, dtype=torch.float64)  # steps, samples, tokens since the last log
        t0 = time.perf_counter()
        while self.state.step < self.total_steps:
            loss, samples, tokens = self.train_step()
            window_loss += loss
            window += torch.tensor([1, samples, tokens], dtype=torch.float64)
            bar.update(1)
            step = self.state.step
            if step % cfg.log_every == 0 or step == self.total_steps:
                self._log_window(window_loss, window, time.perf_counter() - t0, bar)
                window_loss.zero_()
                window.zero_()
                t0 = time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0 and step != self.total_steps:
                tracker.log(self.evaluate(), step)
                t0 = time.perf_counter()
            stop = rt.any_rank(rt.stop_requested)
            if self.run_dir is not None and (stop or self._save_due(step)):
                self.save()
                t0 = time.perf_counter()
            if stop:
                rt.print(
                    f"stopped at step {step} on request; checkpoint saved" if self.run_dir else "stopped"
                )
                self.stopped = True
                bar.close()
                return {}
        bar.close()
        if self.run_dir is not None and self._last_save[0] != self.state.step:
            self.save()
        tracker.log({"replica_param_sums": self.replica_param_sums()}, self.state.step)
        final = self.evaluate()
        tracker.log(final, self.state.step)
        tracker.summary(final)
        return final

    def _log_window(self, window_loss: torch.Tensor, window: torch.Tensor, elapsed: float, bar) -> None:
        stats = torch.cat([window_loss.detach().double().reshape(1).cpu(), window])
        if self.rt.distributed:
            stats = stats.to(self.rt.device)
            torch.distributed.all_reduce(stats)
            stats = stats.cpu()
        loss_mean = stats[0].item() / stats[1].item()  # summed over ranks and steps
        metrics = {
            "train/loss": loss_mean,
            "train/lr": self.backend.current_lr(),
            "train/samples_per_s": stats[2].item() / elapsed,
            "train/tokens_per_s": stats[3].item() / elapsed,
            "train/epoch": self.state.epoch + self.state.consumed / max(1, self.sampler.per_rank),
        }
        metrics.update(getattr(self.backend, "log_metrics", dict)())  # e.g. XLA's compile count
        self.tracker.log(metrics, self.state.step)
        bar.set_postfix(loss=f"{loss_mean:.4f}")


def _jsonable_random_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _random_state_from_json(state: list):
    return (state[0], tuple(state[1]), state[2])
