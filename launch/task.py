"""The task interface: what a recipe hands the shared loop. A new recipe's author reads this first.

A recipe builds one object with the members of `Task` below (a plain class of its own; no base class, no
registration) and passes a function that builds it to `launch.recipe.run_recipe`. Everything else is the
loop's: data order and sharding, accumulation, loss normalisation, clipping, the schedule, precision,
evaluation across ranks, checkpoints, preemption, logging and the export.

Losses are sums. `targets(batch)` counts the targets of each loss term in a batch (masked tokens, label
tokens, sentences), from the batch alone; `loss(model, batch)` sums each term over them. The loop adds the
counts of every micro-batch of a step on every rank before the first backward, so a step's loss is
sum / count over the whole step, whatever the lengths (torchtune normalises the same way), and the eval
loss is the split's total over its count. Several terms (MLM + NSP) each get their own mean, then add up.

Batches are dicts of tensors that the recipe's `collate` made from dataset rows. Keys that start with "_"
are metadata for metrics (example ids, word ids): `model_inputs(batch)` leaves them out of the model call.

Models that skip layers at random (wav2vec2's `layerdrop`) keep ranks in step under FSDP2 only; give them
`layerdrop=0` for DDP and ZeRO-3. Decoder-only generation in batches wants left padding (collate_padded pads
on the right).

`examples` travel with the export (examples.json) and fill the demo app's example list (demos/); {} is fine.

The processor (tokenizer, feature extractor, or a processor holding both) lives in RUN/processor: build it
with `launch.recipe.saved_processor`, so a resumed run reuses it; it travels with every checkpoint and
export.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

# Per batch: {name: tensor([numerator, denominator])}; summed over batches and ranks, logged as num / den.
Counts = dict[str, torch.Tensor]
# generate(**model_inputs) -> token ids: the backend's lockstep generate, or None where shapes are static.
Generate = Callable[..., torch.Tensor] | None


class Task(Protocol):
    """What one recipe provides: every member, none optional (the loop probes for none); `as_is`, `no_summary`
    and `nothing_to_export` below fill the ones a task has nothing to do in."""

    title: str  # the model card's title
    model: nn.Module  # the Hugging Face model that is exported (a PreTrainedModel)
    trained: nn.Module  # what the backend wraps and trains: `model`, or a module holding it (cheaper loss)
    processor: Any  # tokenizer / feature extractor / processor, loaded from RUN/processor
    splits: dict[str, Any]  # "train" (required), "validation", "test": map-style datasets of rows
    lengths: list[int] | None  # per training row, for length-grouped batches; None: plain shuffling
    max_length: int  # the longest sequence a batch can hold; static-shape backends bucket up to it
    examples: dict[str, list[list]]  # demo inputs from held-out data: {app endpoint: [[input, ...], ...]}
    flops_per_token: float  # training FLOPs per real token (launch.flops); 0.0: unknown, no train/tflops

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Rows -> one padded batch (see kernels.collate_padded); takes `pad_to_length=` on XLA."""

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        """The host batch with task randomness drawn from `generator` (MLM masking), or as is; the loop moves
        it to the device after, so what this decides is known on the host without asking the device. In
        evaluation the batch also holds `_row`, each row's index in its split: randomness drawn from
        (seed, row) gives the same numbers on any number of ranks and at every evaluation."""

    def sizes(self, batch: dict) -> tuple[int, int]:
        """(samples, real tokens or frames) of a host batch, for throughput."""

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        """{loss term: number of its targets in the batch}, from the batch alone (before any forward)."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], Any]:
        """({loss term: sum over its targets}, the forward's outputs for `evaluate`)."""

    def evaluate(
        self, model: nn.Module, batch: dict, outputs: Any, generate: Generate
    ) -> tuple[Counts, list]:
        """One eval batch: summable counts, and one picklable record per row (e.g. generated ids and gold)."""

    def summarize(self, records: list, means: dict[str, float], split: str) -> dict[str, float]:
        """Rank 0: every rank's records in split order, plus the summed means ("loss", counts) -> metrics."""

    def before_export(self, model: nn.Module) -> None:
        """Rank 0, on the whole model about to be saved: write what training learnt besides weights."""


# Members a task often has nothing to do in: assign them, e.g. `prepare = staticmethod(as_is)`.
def as_is(batch: dict, generator: torch.Generator) -> dict:
    """`prepare` of a task without randomness of its own."""
    return batch


def no_summary(records: list, means: dict[str, float], split: str) -> dict[str, float]:
    """`summarize` of a task whose metrics all sum (the loop's means are all there is)."""
    return {}


def nothing_to_export(model: nn.Module) -> None:
    """`before_export` of a task whose training learns weights only."""


# Model types that, under SDPA, take a 4D boolean padding mask (rows, 1, 1, length; True: attend) as is in every
# attention layer that reads the padding mask: BERT's encoder attention; the encoder-decoders' encoder and
# cross-attention. (Their decoders' own causal mask is another matter: T5's is built from no padding mask, no
# read; BART's and Pegasus' check a mask of ones unless given theirs, see recipes/summarization.py.) Each
# one's outputs and gradients with it equal those with its 2D mask (tests/test_host_sync.py).
BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})
ENCODER_DECODER = frozenset({"t5", "mt5", "bart", "mbart", "pegasus"})
TAKES_4D_PADDING_MASK = BERT_LIKE | ENCODER_DECODER


def mask_decided_on_host(batch: dict, config) -> dict:
    """The batch with what transformers would ask the device at every forward decided here, from the host's
    2D `attention_mask` (its mask builder runs `padding_mask.all()`: on CUDA the step then waits for every
    kernel queued before it, so the host cannot run ahead):
    - a mask that hides nothing is dropped: a model without one attends to every position, the same thing,
      and SDPA may then pick its flash kernel;
    - one that hides padding becomes, for the model types in `TAKES_4D_PADDING_MASK` under SDPA, the 4D
      boolean mask (rows, 1, 1, length) that transformers takes as is. Other models and attention
      implementations keep their 2D mask, and their builder still checks it.
    `padding_mask(batch)` gives the 2D mask back (generation wants it).
    For dynamic shapes only: under XLA one compiled graph wants the same inputs at every batch."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    batch = dict(batch)
    if mask.all():
        del batch["attention_mask"]
    elif config.model_type in TAKES_4D_PADDING_MASK and config._attn_implementation == "sdpa":
        batch["attention_mask"] = mask.bool()[:, None, None, :]
    return batch


def padding_mask(batch: dict) -> torch.Tensor:
    """The batch's 2D padding mask (rows, length; 1: a token) whatever `mask_decided_on_host` made of it."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(batch["input_ids"])
    return mask[:, 0, 0, :].long() if mask.dim() == 4 else mask


def text_prepare(model: nn.Module, static_shapes: bool) -> Callable[[dict, torch.Generator], dict]:
    """`prepare` of a text task without randomness of its own: `mask_decided_on_host` where shapes are
    dynamic, the batch as is where they are static (XLA)."""
    if static_shapes:
        return as_is
    return lambda batch, generator: mask_decided_on_host(batch, model.config)


def no_padding_mask(batch: dict, generator: torch.Generator) -> dict:
    """`prepare` of a decoder-only LM trained on right-padded rows: the batch without its attention mask.
    Under the causal mask no token attends to a later position, so none sees the padding after it, and
    padded positions carry no label: the loss and its gradients are those with the mask. Without one,
    transformers' mask builder asks nothing of the device (it would check `padding_mask.all()` at every
    forward) and SDPA may use its flash kernel; GPT-2 then looks for its config's pad id in the ids instead,
    so causal_lm's forward runs without it (`without_pad_id`). Not for left padding (generation)."""
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """What the model sees: a batch's keys that start with "_" are metadata for metrics."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def text_sizes(batch: dict) -> tuple[int, int]:
    """(rows, non-pad tokens) of a batch with input_ids and attention_mask."""
    rows = batch["input_ids"].shape[0]
    mask = batch.get("attention_mask")
    return rows, int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def row_targets(t: torch.Tensor) -> torch.Tensor:
    """Targets of a per-row loss (one per row of `t`), made where `t` is: `t.new_tensor(n)` would copy a host
    number to the device, which waits for the device on CUDA."""
    return torch.full((), t.shape[0], dtype=torch.long, device=t.device)


def label_targets(labels: torch.Tensor, shift: bool = False) -> torch.Tensor:
    """Targets of a token-level loss: labels that are not -100 (with `shift`, a causal LM's: all but the
    first position, which nothing predicts)."""
    return ((labels[..., 1:] if shift else labels) != -100).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool = False) -> torch.Tensor:
    """Cross-entropy summed over every label that is not -100 (fp32 logits, as HF's mean does); with `shift`,
    position i's logits predict label i + 1 (a causal LM). The labels shift, not the logits: slicing off the
    last position's logits would copy all of them (batch x length x vocab) forward and again in backward; a
    -100 there instead leaves that position out."""
    if shift:
        labels = nn.functional.pad(labels[..., 1:], (0, 1), value=-100)
    return nn.functional.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100, reduction="sum"
    )


@contextlib.contextmanager
def head_on_rows(head: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Within the block, `head` (a model's output projection) sees only the positions `rows` (long indices into
    its input's batch x length positions): (batch, length, d) becomes (len(rows), d), so padding costs no
    vocabulary projection and no logits. The model's own code around its head (T5's rescaling before it,
    BART's logits bias after it) runs unchanged. Indices computed on the host keep the step free of device
    reads; a boolean mask here would make the host wait for the forward."""
    handle = head.register_forward_pre_hook(
        lambda _module, args: (args[0].flatten(0, -2).index_select(0, rows), *args[1:])
    )
    try:
        yield
    finally:
        handle.remove()


def module_prefix(outer: nn.Module, inner: nn.Module) -> str:
    """Where `inner` sits in `outer` ("" when they are the same module, "model." for a wrapper's field)."""
    name = next((n for n, m in outer.named_modules() if m is inner), None)
    if name is None:
        raise ValueError(f"the task's model is not inside its trained module {type(outer).__name__}")
    return name + "." if name else ""


def whole_model(task: Task, state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """A fresh copy of the task's model holding `state` (a backend's full state dict of `trained`), with a
    config of its own: what `before_export` writes there stays out of the model that trains."""
    whole = type(task.model)(copy.deepcopy(task.model.config))
    whole.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return whole
