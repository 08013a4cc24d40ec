"""Batch collation: right-pad variable-length sequences (token ids, audio) into tensors without per-element
Python work.

`pad_sequences` and `collate_padded` run in the data loader; `MLMCollator` adds masking there too, for
benchmarks and users without the training loop (whose `prepare` masks in the main process, from a generator
saved with each checkpoint).
"""

from __future__ import annotations

import array
import numbers
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor

from recipebox.kernels.masking import IGNORE_INDEX, _check_args, mask_tokens

_RECOMPUTED_KEYS = ("attention_mask", "special_tokens_mask")


def _flatten(sequences: Sequence, dtype: torch.dtype) -> tuple[Tensor, list[int]]:
    """All sequences concatenated into one 1-D tensor, plus their lengths."""
    lengths = [len(s) for s in sequences]
    if sequences and isinstance(sequences[0], Tensor):
        if any(s.dim() != 1 for s in sequences):
            shapes = [tuple(s.shape) for s in sequences]
            raise ValueError(f"pad_sequences takes 1-D tensors; got shapes {shapes}")
        return torch.cat(list(sequences)).to(dtype), lengths
    # array.fromlist converts a list of ints far faster than torch.tensor on the same list (bench_collate.py).
    typecode, buffer_dtype = ("d", torch.float64) if dtype.is_floating_point else ("q", torch.long)
    flat = array.array(typecode)
    for s in sequences:
        if isinstance(s, list):
            flat.fromlist(s)
        else:
            flat.extend(s)
    if not flat:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=dtype), lengths
    return torch.frombuffer(flat, dtype=buffer_dtype).to(dtype), lengths


def _padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of is None:
        return longest
    if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


def _scatter_padded(flat: Tensor, lengths: list[int], length: int, pad_value) -> tuple[Tensor, Tensor]:
    """Place `flat` row by row into a [B, length] tensor filled with pad_value; also return the 0/1 mask."""
    positions = torch.arange(length, device=flat.device)
    keep = positions < torch.tensor(lengths, dtype=torch.long, device=flat.device)[:, None]
    padded = torch.full((len(lengths), length), pad_value, dtype=flat.dtype, device=flat.device)
    return padded.masked_scatter_(keep, flat), keep.long()


def pad_sequences(
    sequences: Sequence[Sequence[int]] | Sequence[Tensor],
    pad_value: int,
    *,
    pad_to_multiple_of: int | None = None,
    dtype=torch.long,
) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest sequence (rounded up to pad_to_multiple_of); return (padded, attention_mask)."""
    flat, lengths = _flatten(sequences, dtype)
    length = _padded_length(max(lengths, default=0), pad_to_multiple_of)
    return _scatter_padded(flat, lengths, length, pad_value)


def _pad_value(key: str, pad_id: int) -> int:
    if key == "input_ids":
        return pad_id
    if key == "labels":
        return IGNORE_INDEX
    return 0


def _is_float_column(key: str, values: list) -> bool:
    """Whether a column of numbers needs a float tensor; anything but numbers is an error."""
    bad = next((v for v in values if not isinstance(v, numbers.Real)), None)
    if bad is not None:
        raise ValueError(
            f"feature {key!r} holds {type(bad).__name__} values, which cannot be batched; "
            f"drop the column first (dataset.remove_columns([{key!r}]))"
        )
    return not all(isinstance(v, numbers.Integral) for v in values)


def _sequence_dtype(rows: list) -> torch.dtype:
    """float32 for float sequences (judged by the first item), long for token ids and tags."""
    first = next((row for row in rows if len(row)), None)
    if first is None:
        return torch.long
    if isinstance(first, Tensor):
        return torch.float32 if first.is_floating_point() else torch.long
    return torch.float32 if isinstance(first[0], float) else torch.long


MASK_SOURCES = ("input_ids", "input_values")  # the field whose real length makes attention_mask


def collate_padded(
    features: list[dict],
    *,
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    pad_to_length: int | Mapping[str, int] | None = None,
    pad_values: Mapping[str, int | float] | None = None,
    vectors: Collection[str] = (),
) -> dict[str, Tensor]:
    """Batch dataset rows of any modality: pad every sequence field to its own longest, add attention_mask.

    input_ids pad with pad_id, labels with -100, other sequences (audio input_values, word ids) with 0 unless
    `pad_values` names the field; numbers become 1-D tensors; `vectors` are fixed-size per row (multi-hot
    labels): stacked, not padded. attention_mask is rebuilt from input_ids, else input_values. Fields of one
    row with equal lengths (ids, tags) stay aligned; a seq2seq target pads to its own longest.
    `pad_to_length` gives every sequence field that length (static shapes, e.g. XLA); a mapping gives the
    fields it names their own lengths (audio and its transcript) and leaves the others at their longest.
    """
    if not features:
        raise ValueError("collate_padded got an empty batch")
    keys = [k for k in features[0] if k not in _RECOMPUTED_KEYS]
    columns = {}
    for key in keys:
        try:
            columns[key] = [f[key] for f in features]
        except KeyError:
            missing = next(i for i, f in enumerate(features) if key not in f)
            raise ValueError(f"row {missing} of the batch has no {key!r} feature, but row 0 has") from None
    mask_source = next((k for k in MASK_SOURCES if k in columns), None)
    pad_values = pad_values or {}

    batch = {}
    for key in keys:
        rows = columns[key]
        if key in vectors:
            batch[key] = torch.stack([torch.as_tensor(r) for r in rows]).to(_sequence_dtype(rows))
        elif isinstance(rows[0], list | tuple | Tensor):
            flat, lengths = _flatten(rows, _sequence_dtype(rows))
            length = _padded_length(max(lengths, default=0), pad_to_multiple_of)
            fixed = pad_to_length.get(key) if isinstance(pad_to_length, Mapping) else pad_to_length
            if fixed is not None:
                if max(lengths, default=0) > fixed:
                    raise ValueError(
                        f"a row's {key!r} has {max(lengths)} items, more than pad_to_length={fixed}"
                    )
                length = fixed
            batch[key], mask = _scatter_padded(
                flat, lengths, length, pad_values.get(key, _pad_value(key, pad_id))
            )
            if key == mask_source:
                batch["attention_mask"] = mask
        else:
            dtype = torch.float32 if _is_float_column(key, rows) else torch.long
            batch[key] = torch.tensor(rows, dtype=dtype)
    return batch


class MLMCollator:
    """collate_padded followed by mask_tokens on the host, with its own generator.

    pad_id is always treated as special, so padding is never masked. The batch's "labels" come from
    masking, so rows must not carry a "labels" feature of their own. Each rank (`rank`) and each DataLoader
    worker process draws its own stream from `seed` (workers start with copies of the generator: the same
    state would mask their batches alike; the workers of each epoch anew); rank 0 in the main process
    draws from `seed` itself.
    """

    def __init__(
        self,
        *,
        pad_id: int,
        mask_token_id: int,
        vocab_size: int,
        special_ids: Tensor | Sequence[int],
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        rank: int = 0,
    ):
        _check_args(mask_token_id, vocab_size, mlm_probability, mask_replace_prob, random_replace_prob)
        _padded_length(0, pad_to_multiple_of)
        if isinstance(special_ids, Tensor):
            special_ids = special_ids.flatten().tolist()
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_kwargs = dict(
            mask_token_id=mask_token_id,
            vocab_size=vocab_size,
            special_ids=sorted({int(s) for s in special_ids} | {pad_id}),
            mlm_probability=mlm_probability,
            mask_replace_prob=mask_replace_prob,
            random_replace_prob=random_replace_prob,
        )
        self.seed, self.rank, self._worker = seed, rank, None
        self.generator = torch.Generator().manual_seed(self._stream_seed(None))

    def _stream_seed(self, worker: int | None) -> int:
        return self.seed + 1_000_003 * self.rank + (0 if worker is None else 7_919 * (worker + 1))

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.id != self._worker:  # first batch in this worker process
            self._worker = info.id  # info.seed: new per epoch's workers, drawn from torch's seeded generator
            self.generator.manual_seed((self._stream_seed(info.id) + info.seed) % 2**63)
        if features and "labels" in features[0]:
            raise ValueError(
                "MLMCollator makes 'labels' by masking, but the rows already have a 'labels' feature; "
                "remove that column (dataset.remove_columns(['labels']))"
            )
        batch = collate_padded(features, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], generator=self.generator, **self.mask_kwargs
        )
        return batch
