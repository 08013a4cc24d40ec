"""A rank-sharded, optionally length-grouped sampler whose position is part of the checkpoint.

The order of an epoch is a pure function of (seed, epoch, world size), so resuming at any position costs
one permutation, never a pass over the skipped data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from recipebox.data.text import DataError


class ShardedSampler(Sampler[int]):
    def __init__(
        self,
        num_samples: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        group_size: int = 64,
    ):
        if num_samples < world_size:  # the same on every rank: all stop here, before any collective
            raise DataError(
                f"{num_samples} training sample(s) cannot be shared by {world_size} ranks: give more training "
                "data or launch fewer ranks"
            )
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.lengths = torch.as_tensor(lengths) if lengths is not None else None
        self.group_size = group_size  # global batches sorted together when grouping by length
        self.epoch = 0
        self.start = 0  # samples of this epoch already consumed on this rank

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start

    @property
    def per_rank(self) -> int:
        return self.num_samples // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_order(self) -> torch.Tensor:
        """This rank's indices for the whole epoch (every rank the same count, ranks disjoint)."""
        total = self.per_rank * self.world_size  # drop the remainder so ranks stay in step
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = (
            torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
        )
        global_batch = self.batch_size * self.world_size
        if self.lengths is not None:
            # Sort chunks of many global batches by length so a batch pads little, then shuffle the batches
            # so long and short ones stay mixed over the epoch. Each global batch is dealt to ranks in
            # stride, so all ranks see similar lengths and wait little for each other.
            chunk = global_batch * self.group_size
            parts = []
            for piece in order.split(chunk):
                parts.append(piece[torch.argsort(self.lengths[piece], descending=True, stable=True)])
            order = torch.cat(parts)
            batches = list(order.split(global_batch))
            tail = [batches.pop()] if len(batches[-1]) < global_batch else []  # a short batch stays last
            if self.shuffle:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=g)]
            order = torch.cat(batches + tail)
        # The remainder goes from the end of the whole order, after grouping: the order itself depends on
        # the global batch only, so a checkpoint resumed on other ranks with the same global batch sees the
        # same samples next (cut before grouping, chunks and batch edges moved with the world size).
        order = order[:total]
        batches = order.split(global_batch)
        return torch.cat([b[self.rank :: self.world_size] for b in batches])

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start :].tolist())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "world_size": self.world_size}
