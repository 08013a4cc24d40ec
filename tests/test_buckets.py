"""Bucketed padding: the bucket set, the choice of bucket, and the fast path against the plain reference."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from recipebox.kernels.buckets import (
    BucketedCollate,
    bucket_lengths,
    pad_to_bucket_reference,
    parse_buckets,
    pick_bucket,
)
from recipebox.kernels.collate import collate_padded


def test_bucket_lengths_are_powers_of_two_capped_by_the_maximum():
    assert bucket_lengths(128) == [16, 32, 64, 128]
    assert bucket_lengths(100) == [16, 32, 64, 100]
    assert bucket_lengths(16) == [16]
    assert bucket_lengths(8) == [8]
    assert bucket_lengths(512, smallest=64) == [64, 128, 256, 512]
    with pytest.raises(ValueError):
        bucket_lengths(0)


def test_parse_buckets_sorts_and_refuses_nonsense():
    assert parse_buckets("64, 16,32") == [16, 32, 64]
    for bad in ("", "16,x", "0,16", "16,16"):
        with pytest.raises(
            ValueError, match=r"bucket lengths must be (distinct positive|comma-separated) integers, got "
        ):
            parse_buckets(bad)


def test_pick_bucket_takes_the_smallest_that_fits_and_names_an_overflow():
    buckets = [16, 32, 64]
    assert [pick_bucket(n, buckets) for n in (1, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]
    with pytest.raises(ValueError, match="65 tokens, more than the largest bucket"):
        pick_bucket(65, buckets)


def _rows(rng: random.Random, n: int, longest: int) -> list[dict]:
    rows = []
    for _ in range(n):
        length = rng.randint(1, longest)
        rows.append(
            {
                "input_ids": [rng.randint(5, 99) for _ in range(length)],
                "labels": [rng.randint(0, 4) for _ in range(length)],
                "token_type_ids": [rng.randint(0, 1) for _ in range(length)],
                "example_id": rng.randint(0, 1000),
            }
        )
    return rows


def test_bucketed_collate_matches_the_reference_and_only_makes_bucket_shapes():
    rng = random.Random(0)
    buckets = bucket_lengths(128)
    collate = BucketedCollate(functools.partial(collate_padded, pad_id=0), buckets)
    shapes = set()
    for _ in range(200):
        rows = _rows(rng, rng.randint(1, 8), rng.choice([5, 20, 60, 128]))
        fast = collate(rows)
        slow = pad_to_bucket_reference(rows, buckets, pad_id=0)
        assert sorted(fast) == sorted(slow)
        for key in slow:
            assert torch.equal(fast[key], slow[key]), key
        shapes.add(fast["input_ids"].shape[1])
    assert shapes == set(buckets)  # every length from 1 to 128 lands on one of four shapes


def test_bucketed_collate_refuses_a_row_longer_than_every_bucket():
    collate = BucketedCollate(functools.partial(collate_padded, pad_id=0), [8, 16])
    with pytest.raises(ValueError, match="17 tokens"):
        collate([{"input_ids": list(range(17))}])


def test_multi_hot_label_vectors_choose_no_bucket():
    """Multi-label classification stacks one slot per label (`vectors`): 41 labels on 3-token texts took
    the 64 bucket, and 100 labels stopped the run as "a row has 100 tokens"; the texts choose alone."""
    collate = BucketedCollate(functools.partial(collate_padded, pad_id=0, vectors=("labels",)), [16, 64])
    for labels in (41, 100):
        rows = [{"input_ids": [5, 6, 7], "labels": [0.0] * labels} for _ in range(2)]
        batch = collate(rows)
        assert batch["input_ids"].shape == (2, 16) and batch["labels"].shape == (2, labels)


def test_explicit_buckets_shorter_than_max_length_stop_before_training():
    """A batch longer than every bucket would stop the run when it comes: caught while the config is read."""
    from recipebox.launch.backends import xla_buckets
    from recipebox.launch.config import ConfigError

    with pytest.raises(ConfigError, match=r"largest bucket \(48\) is shorter than --max-length 64"):
        xla_buckets("16,32,48", 64)
    assert xla_buckets("16,64", 64) == [16, 64]
    assert xla_buckets("", 64) == bucket_lengths(64)
