"""BERT-style masked-language-model corruption (80 % [MASK], 10 % random, 10 % kept) in one vectorised pass.

`mask_tokens` is the fast path, usable on any device; `mask_tokens_reference` is a per-token Python loop
that consumes the generator identically, so tests can demand exact equality between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100

# Past this many special ids one isin beats a chain of == comparisons.
_MAX_EQ_SPECIALS = 8


def _check_args(mask_token_id, vocab_size, mlm_probability, mask_replace_prob, random_replace_prob) -> None:
    for name, value in (
        ("mlm_probability", mlm_probability),
        ("mask_replace_prob", mask_replace_prob),
        ("random_replace_prob", random_replace_prob),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if mask_replace_prob + random_replace_prob > 1.0 + 1e-9:
        raise ValueError(
            f"mask_replace_prob + random_replace_prob must be <= 1, got {mask_replace_prob} + {random_replace_prob}"
        )
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size})")


def _thresholds(mlm_probability, mask_replace_prob, random_replace_prob) -> tuple[float, float, float]:
    """Cut points on u for [MASK], random and selected, rounded to float32.

    torch compares a float32 tensor with a Python float in float32; rounding the cut points here makes the
    reference loop (which compares Python floats) agree with it bit for bit.
    """
    p = float(mlm_probability)
    t_mask = p * mask_replace_prob
    t_random = min(p, t_mask + p * random_replace_prob)
    return tuple(torch.tensor([t_mask, t_random, p], dtype=torch.float32).tolist())


def _draw(input_ids: Tensor, vocab_size: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The two random tensors both paths consume, in this order: u ~ U[0, 1) and random token ids."""
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must be an integer tensor, got {type(input_ids).__name__}")
    if generator is not None and generator.device.type != input_ids.device.type:
        raise ValueError(
            f"generator is on {generator.device} but input_ids on {input_ids.device}: "
            f"create it with torch.Generator(device='{input_ids.device.type}')"
        )
    shape, device = input_ids.shape, input_ids.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=device, dtype=input_ids.dtype)
    return u, random_ids


def _special_mask(input_ids: Tensor, special_ids: Tensor | Sequence[int]) -> Tensor:
    if isinstance(special_ids, Tensor):
        special_ids = special_ids.flatten().tolist()
    special_ids = sorted({int(s) for s in special_ids})
    if len(special_ids) > _MAX_EQ_SPECIALS:
        return torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype).to(input_ids.device))
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for s in special_ids:
        special |= input_ids == s
    return special


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Tensor | Sequence[int],
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Return (masked_input_ids, labels); labels hold the original id where selected and -100 elsewhere.

    One draw u per token decides its fate: u < p*mask_replace_prob becomes [MASK], the next
    p*random_replace_prob becomes a uniform id from [0, vocab_size), the rest of [0, p) is kept but
    labelled. Tokens in special_ids are never selected. No host synchronisation, so it is cheap on GPU.
    """
    _check_args(mask_token_id, vocab_size, mlm_probability, mask_replace_prob, random_replace_prob)
    t_mask, t_random, p = _thresholds(mlm_probability, mask_replace_prob, random_replace_prob)
    u, random_ids = _draw(input_ids, vocab_size, generator)
    # u = 1 is never below any cut point, so special tokens drop out of all three outcomes at once.
    u.masked_fill_(_special_mask(input_ids, special_ids), 1.0)
    labels = torch.where(u < p, input_ids, IGNORE_INDEX)
    masked = torch.where(u < t_random, torch.where(u < t_mask, mask_token_id, random_ids), input_ids)
    return masked, labels


def mask_tokens_reference(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Tensor | Sequence[int],
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain per-token loop with the same semantics and the same generator use as `mask_tokens`."""
    _check_args(mask_token_id, vocab_size, mlm_probability, mask_replace_prob, random_replace_prob)
    t_mask, t_random, p = _thresholds(mlm_probability, mask_replace_prob, random_replace_prob)
    u, random_ids = _draw(input_ids, vocab_size, generator)
    if isinstance(special_ids, Tensor):
        special_ids = special_ids.flatten().tolist()
    specials = {int(s) for s in special_ids}

    masked, labels = [], []
    for token, draw, random_id in zip(
        input_ids.flatten().tolist(), u.flatten().tolist(), random_ids.flatten().tolist()
    ):
        if token in specials or draw >= p:
            masked.append(token)
            labels.append(IGNORE_INDEX)
            continue
        labels.append(token)
        if draw < t_mask:
            masked.append(mask_token_id)
        elif draw < t_random:
            masked.append(random_id)
        else:
            masked.append(token)

    def to_tensor(values):
        return torch.tensor(values, dtype=input_ids.dtype).view(input_ids.shape).to(input_ids.device)

    return to_tensor(masked), to_tensor(labels)
