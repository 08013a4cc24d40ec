"""Bucketed padding: every batch is padded to one of a few fixed lengths, so a compiler that specialises on
shapes (XLA) builds a bounded number of graphs instead of one per batch length.

`BucketedCollate` wraps a collate function that takes `pad_to_length` (such as `collate_padded`);
`pad_to_bucket_reference` is the plain per-row version the tests compare it with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from recipebox.kernels.masking import IGNORE_INDEX


def bucket_lengths(max_length: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` up to `max_length`, which is always the last bucket: 128 -> 16..128."""
    if max_length < 1 or smallest < 1:
        raise ValueError(
            f"bucket lengths need max_length >= 1 and smallest >= 1, got {max_length}, {smallest}"
        )
    buckets, length = [], smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return buckets + [max_length]


def parse_buckets(text: str) -> list[int]:
    """'32,64,128' -> [32, 64, 128]; sorted, positive, no repeats."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"bucket lengths must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise ValueError(f"bucket lengths must be distinct positive integers, got {text!r}")
    return sorted(values)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(
        f"a row has {length} tokens, more than the largest bucket ({buckets[-1]}); "
        f"truncate the data (--max-length) or add a larger bucket"
    )


class BucketedCollate:
    """`collate(features, pad_to_length=bucket)`, the bucket chosen by the batch's longest sequence of any
    field (token ids, labels, audio values): every sequence field is padded to it. Fields that `collate`
    stacks as they are (`collate_padded`'s `vectors`, e.g. multi-hot labels, one slot per label) are not
    sequences and choose nothing."""

    def __init__(self, collate: Callable, buckets: Sequence[int]):
        self.collate, self.buckets = collate, list(buckets)
        self.vectors = set(getattr(collate, "keywords", {}).get("vectors", ()))  # a functools.partial's

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        longest = max(
            len(v)
            for f in features
            for k, v in f.items()
            if k not in self.vectors and isinstance(v, list | tuple | Tensor)
        )
        return self.collate(features, pad_to_length=pick_bucket(longest, self.buckets))


def pad_to_bucket_reference(features: list[dict], buckets: Sequence[int], pad_id: int) -> dict[str, Tensor]:
    """Row by row in plain Python: what `BucketedCollate(collate_padded)` must produce for list features."""
    length = pick_bucket(max(len(f["input_ids"]) for f in features), buckets)
    batch: dict[str, list] = {}
    for key in features[0]:
        if key in ("attention_mask", "special_tokens_mask"):
            continue
        rows = []
        for f in features:
            value = f[key]
            if isinstance(value, list):
                pad = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
                value = value + [pad] * (length - len(value))
            rows.append(value)
        batch[key] = rows
    batch["attention_mask"] = [
        [1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features
    ]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
