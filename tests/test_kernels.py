"""kernels/: fast MLM masking against its per-token reference and against transformers' collator, and padding."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from recipebox.kernels.collate import MLMCollator, collate_padded, pad_sequences
from recipebox.kernels.masking import mask_tokens, mask_tokens_reference

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
VOCAB = 30_522


def make_rows(n_rows: int, max_len: int, seed: int) -> list[list[int]]:
    """[CLS] ids... [SEP] rows with lengths uniform in [max_len/4, max_len]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        n = rng.randint(max_len // 4, max_len) - 2
        rows.append([CLS, *(rng.randrange(len(SPECIALS), VOCAB) for _ in range(n)), SEP])
    return rows


def make_batch(batch_size: int, max_len: int, seed: int) -> torch.Tensor:
    return pad_sequences(make_rows(batch_size, max_len, seed), PAD)[0]


def mask(input_ids, seed=0, device="cpu", fn=mask_tokens, **kwargs):
    kwargs = {"mask_token_id": MASK, "vocab_size": VOCAB, "special_ids": SPECIALS, **kwargs}
    return fn(input_ids, generator=torch.Generator(device=device).manual_seed(seed), **kwargs)


def fates(original, masked, labels):
    """Fractions of selectable tokens that were selected, and of those: [MASK], random, kept."""
    eligible = ~torch.isin(original, torch.tensor(SPECIALS))
    selected = labels != -100
    n = selected.sum().item()
    as_mask = (selected & (masked == MASK)).sum().item() / n
    kept = (selected & (masked == original)).sum().item() / n
    return selected.sum().item() / eligible.sum().item(), as_mask, 1 - as_mask - kept, kept


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


# ---- mask_tokens: exact agreement with the reference loop ----


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (16, 64)])
@pytest.mark.parametrize(
    "probs", [(0.15, 0.8, 0.1), (0.5, 0.6, 0.3), (1.0, 0, 0), (0, 0.8, 0.1), (0.3, 0, 1.0), (0.7, 0.5, 0.5)]
)
def test_fast_path_equals_reference(seed, shape, probs):
    input_ids = make_batch(shape[0], max(shape[1], 4), seed=seed)[:, : shape[1]]
    p, m, r = probs
    kwargs = {"mlm_probability": p, "mask_replace_prob": m, "random_replace_prob": r, "seed": seed}
    fast = mask(input_ids, **kwargs)
    ref = mask(input_ids, fn=mask_tokens_reference, **kwargs)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


def test_fast_path_equals_reference_int32_and_tensor_specials():
    input_ids = make_batch(8, 40, seed=3).int()
    kwargs = {"special_ids": torch.tensor(SPECIALS), "mlm_probability": 0.4}
    fast, ref = mask(input_ids, **kwargs), mask(input_ids, fn=mask_tokens_reference, **kwargs)
    assert fast[0].dtype == torch.int32 and torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


def test_many_special_ids_take_the_isin_path_and_agree():
    input_ids = make_batch(8, 64, seed=4)
    specials = SPECIALS + list(range(100, 140))
    fast = mask(input_ids, special_ids=specials, mlm_probability=0.9)
    ref = mask(input_ids, fn=mask_tokens_reference, special_ids=specials, mlm_probability=0.9)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    assert (fast[1][(input_ids >= 100) & (input_ids < 140)] == -100).all()


# ---- mask_tokens: invariants ----


def test_specials_and_padding_never_selected_and_unselected_untouched():
    input_ids = make_batch(32, 64, seed=5)
    before = input_ids.clone()
    masked, labels = mask(input_ids, mlm_probability=1.0, mask_replace_prob=0.5, random_replace_prob=0.5)
    assert torch.equal(input_ids, before), "input must not be modified"
    special = torch.isin(input_ids, torch.tensor(SPECIALS))
    assert (input_ids == PAD).any() and special.any()
    assert (labels[special] == -100).all() and torch.equal(masked[special], input_ids[special])
    # with p = 1 every other token is selected
    assert torch.equal(labels[~special], input_ids[~special])

    masked, labels = mask(input_ids, mlm_probability=0.3)
    unselected = labels == -100
    assert torch.equal(masked[unselected], input_ids[unselected])
    assert torch.equal(labels[~unselected], input_ids[~unselected])
    assert ((masked >= 0) & (masked < VOCAB)).all()


def test_same_seed_same_result_different_seed_different():
    input_ids = make_batch(16, 64, seed=6)
    a, b, c = mask(input_ids, seed=11), mask(input_ids, seed=11), mask(input_ids, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_selection_rate_and_split_match_probabilities():
    generator = torch.Generator().manual_seed(0)
    totals = torch.zeros(4)
    for i in range(200):
        input_ids = make_batch(64, 128, seed=i)
        masked, labels = mask_tokens(
            input_ids, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, generator=generator
        )
        totals += torch.tensor(fates(input_ids, masked, labels))
    rate, as_mask, as_random, kept = (totals / 200).tolist()
    assert rate == pytest.approx(0.15, abs=0.002)
    assert as_mask == pytest.approx(0.8, abs=0.005)
    assert as_random == pytest.approx(0.1, abs=0.005)
    assert kept == pytest.approx(0.1, abs=0.005)


def test_statistical_parity_with_transformers_collator(tokenizer):
    hf = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15, seed=0)
    ours = MLMCollator(pad_id=PAD, mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, seed=0)
    assert sorted(tokenizer.all_special_ids) == SPECIALS
    results = {"hf": torch.zeros(4), "ours": torch.zeros(4)}
    for i in range(100):
        features = [{"input_ids": row} for row in make_rows(64, 128, seed=i)]
        original = pad_sequences([f["input_ids"] for f in features], PAD)[0]
        for name, collator in (("hf", hf), ("ours", ours)):
            batch = collator(features)
            assert torch.equal(batch["attention_mask"], (original != PAD).long())
            results[name] += torch.tensor(fates(original, batch["input_ids"], batch["labels"]))
    hf_stats, our_stats = (results["hf"] / 100).tolist(), (results["ours"] / 100).tolist()
    assert hf_stats[0] == pytest.approx(our_stats[0], abs=0.003)
    assert hf_stats[1:] == pytest.approx(our_stats[1:], abs=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masking_is_exact_and_respects_specials():
    input_ids = make_batch(256, 128, seed=8).cuda()
    first, second = mask(input_ids, seed=3, device="cuda"), mask(input_ids, seed=3, device="cuda")
    assert first[0].device.type == "cuda" and first[1].device.type == "cuda"
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    ref = mask(input_ids, seed=3, device="cuda", fn=mask_tokens_reference)
    assert torch.equal(first[0], ref[0]) and torch.equal(first[1], ref[1])

    special = torch.isin(input_ids, torch.tensor(SPECIALS, device="cuda"))
    assert (first[1][special] == -100).all() and torch.equal(first[0][special], input_ids[special])
    rate, as_mask, as_random, kept = fates(input_ids.cpu(), first[0].cpu(), first[1].cpu())
    assert rate == pytest.approx(0.15, abs=0.01) and as_mask == pytest.approx(0.8, abs=0.02)
    assert as_random == pytest.approx(0.1, abs=0.02) and kept == pytest.approx(0.1, abs=0.02)
    with pytest.raises(ValueError, match="generator"):
        mask(input_ids, device="cpu")


# ---- pad_sequences / collate_padded / MLMCollator ----


def test_pad_sequences_values_and_mask():
    padded, attention = pad_sequences([[5, 6, 7], [8], [9, 10]], pad_value=-1)
    assert padded.tolist() == [[5, 6, 7], [8, -1, -1], [9, 10, -1]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert padded.dtype == torch.long and attention.dtype == torch.long


def test_pad_sequences_multiple_and_edge_cases():
    padded, attention = pad_sequences([[1, 2, 3, 4, 5], [6]], 0, pad_to_multiple_of=4)
    assert padded.shape == (2, 8) and attention.sum().item() == 6
    assert pad_sequences([[1, 2, 3, 4]], 0, pad_to_multiple_of=4)[0].tolist() == [[1, 2, 3, 4]]
    assert pad_sequences([[1, 2]], 0)[0].tolist() == [[1, 2]]
    padded, attention = pad_sequences([[], [3]], 7)
    assert padded.tolist() == [[7], [3]] and attention.tolist() == [[0], [1]]
    assert pad_sequences([[], []], 0)[0].shape == (2, 0)
    assert pad_sequences([], 0)[0].shape == (0, 0)
    assert pad_sequences([(1, 2), range(3)], 0)[0].tolist() == [[1, 2, 0], [0, 1, 2]]


def test_pad_sequences_tensor_inputs_and_dtype():
    padded, attention = pad_sequences([torch.tensor([1, 2]), torch.tensor([3, 4, 5])], 0, dtype=torch.int32)
    assert padded.dtype == torch.int32 and padded.tolist() == [[1, 2, 0], [3, 4, 5]]
    assert attention.tolist() == [[1, 1, 0], [1, 1, 1]]
    floats, _ = pad_sequences([[0.5], [1.5, 2.5]], -1, dtype=torch.float32)
    assert floats.tolist() == [[0.5, -1.0], [1.5, 2.5]]
    with pytest.raises(ValueError, match="1-D"):
        pad_sequences([torch.zeros(2, 2)], 0)


def test_collate_padded_keys_labels_and_scalars():
    features = [
        {"input_ids": [2, 10, 3], "token_type_ids": [0, 0, 1], "labels": [1, 2, 3], "next_sentence_label": 1,
         "weight": 0.5, "attention_mask": [9, 9, 9], "special_tokens_mask": [1, 0, 1]},
        {"input_ids": [2, 3], "token_type_ids": [0, 1], "labels": [4, 5], "next_sentence_label": 0,
         "weight": 1, "attention_mask": [9, 9], "special_tokens_mask": [1, 1]},
    ]  # fmt: skip
    batch = collate_padded(features, pad_id=0, pad_to_multiple_of=4)
    assert set(batch) == {*features[0]} - {"special_tokens_mask"}
    assert batch["input_ids"].tolist() == [[2, 10, 3, 0], [2, 3, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 0], [0, 1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, -100], [4, 5, -100, -100]]
    nsp, weight = batch["next_sentence_label"], batch["weight"]
    assert nsp.dtype == torch.long and nsp.tolist() == [1, 0]
    assert weight.dtype == torch.float32 and weight.tolist() == [0.5, 1.0]


def test_collate_padded_pads_each_field_to_its_own_longest():
    """A seq2seq target and its source, or audio values and their transcript, have lengths of their own."""
    rows = [{"input_ids": [5, 6], "labels": [1, 2, 3, 4, 5]}, {"input_ids": [7, 8, 9], "labels": [1]}]
    batch = collate_padded(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5], [1, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    fixed = collate_padded(rows, pad_id=0, pad_to_length=6)
    assert fixed["input_ids"].shape == fixed["labels"].shape == fixed["attention_mask"].shape == (2, 6)


def test_collate_padded_batches_audio_values_with_their_mask():
    rows = [{"input_values": [0.5, -0.25, 0.125], "labels": [3, 4]}, {"input_values": [1.0], "labels": [5]}]
    batch = collate_padded(rows, pad_id=0, pad_values={"labels": -100})
    assert batch["input_values"].dtype == torch.float32
    assert batch["input_values"].tolist() == [[0.5, -0.25, 0.125], [1.0, 0.0, 0.0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[3, 4], [5, -100]]


def test_collate_padded_rejects_bad_rows():
    with pytest.raises(ValueError, match="text"):
        collate_padded([{"input_ids": [1], "text": "hello"}], pad_id=0)
    assert "attention_mask" not in collate_padded([{"labels": [1]}], pad_id=0)  # nothing to mask
    with pytest.raises(ValueError, match="row 1"):
        collate_padded([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], pad_id=0)
    with pytest.raises(ValueError, match="empty"):
        collate_padded([], pad_id=0)


def test_mlm_collator_masks_deterministically_and_never_masks_padding():
    features = [{"input_ids": row, "token_type_ids": [0] * len(row)} for row in make_rows(32, 64, seed=9)]
    # pad_id left out of special_ids on purpose: the collator must add it
    kwargs = {"pad_id": PAD, "mask_token_id": MASK, "vocab_size": VOCAB, "special_ids": [CLS, SEP, MASK]}
    a = MLMCollator(mlm_probability=1.0, seed=1, **kwargs)(features)
    b = MLMCollator(mlm_probability=1.0, seed=1, **kwargs)(features)
    assert set(a) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    padding = a["attention_mask"] == 0
    assert padding.any() and (a["labels"][padding] == -100).all() and (a["input_ids"][padding] == PAD).all()

    collator = MLMCollator(seed=1, **kwargs)
    first, second = collator(features), collator(features)
    assert not torch.equal(first["labels"], second["labels"]), "the generator must advance between batches"
    with pytest.raises(ValueError, match="labels"):
        collator([{"input_ids": [2, 5, 3], "labels": [1, 1, 1]}])


def test_mlm_collator_masks_each_worker_and_rank_differently():
    """DataLoader workers start with copies of the collator: without a stream of their own, worker 0 and
    worker 1 masked the same positions of same-shaped batches; ranks likewise."""
    row = {"input_ids": make_rows(1, 48, seed=3)[0]}
    kwargs = {"pad_id": PAD, "mask_token_id": MASK, "vocab_size": VOCAB, "special_ids": SPECIALS, "seed": 1}
    loader = torch.utils.data.DataLoader(
        [row] * 16, batch_size=4, num_workers=2, collate_fn=MLMCollator(**kwargs)
    )
    batches = [b["labels"] for b in loader]  # batches 0 and 2 from worker 0, 1 and 3 from worker 1
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[2], batches[3])
    rank0, rank1 = (MLMCollator(rank=r, **kwargs)([row] * 4)["labels"] for r in (0, 1))
    assert not torch.equal(rank0, rank1)
    assert torch.equal(rank0, MLMCollator(**kwargs)([row] * 4)["labels"])  # rank 0, main process: `seed`


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mlm_probability": 1.5}, "mlm_probability"),
        ({"mlm_probability": -0.1}, "mlm_probability"),
        ({"mask_replace_prob": 1.2}, "mask_replace_prob"),
        ({"random_replace_prob": -0.5}, "random_replace_prob"),
        ({"mask_replace_prob": 0.8, "random_replace_prob": 0.3}, "<= 1"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"mask_token_id": VOCAB}, "mask_token_id"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    input_ids = make_batch(2, 8, seed=0)
    for fn in (mask_tokens, mask_tokens_reference):
        with pytest.raises(ValueError, match=match):
            mask(input_ids, fn=fn, **kwargs)
    with pytest.raises(ValueError, match=match):
        MLMCollator(
            **{"pad_id": PAD, "mask_token_id": MASK, "vocab_size": VOCAB, "special_ids": SPECIALS, **kwargs}
        )


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="integer tensor"):
        mask(torch.rand(2, 3))
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        pad_sequences([[1]], 0, pad_to_multiple_of=0)


def test_the_repository_root_first_on_the_path_leaves_the_name_kernels_to_transformers():
    """transformers (5.25 on) imports Hugging Face's `kernels` package with every model. A process that has
    the repository root first on sys.path (`python -c` here, as `python -m pytest` and the demos do) must
    still load a model next to recipebox's kernels, and `kernels` must not be the repository's folder."""
    code = (
        "import importlib.util\n"
        "from transformers import BertConfig, BertForPreTraining\n"
        "from recipebox.kernels.collate import collate_padded\n"
        "BertForPreTraining(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, intermediate_size=37))\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print('kernels:', spec and spec.origin)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    origin = proc.stdout.rsplit("kernels: ", 1)[1].strip()
    assert origin == "None" or not Path(origin).is_relative_to(REPO / "kernels"), origin
