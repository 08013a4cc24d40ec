"""Next-sentence-prediction pairs for BERT pretraining, tokenised with `datasets.map`.

Half the pairs are a sentence and its true successor (label 0), half a sentence and a random sentence from
another document (label 1, never the true successor): the balance is exact and the draw seeded, so every
rank builds the same pairs.
"""

from __future__ import annotations

import random
from pathlib import Path

from recipebox.data.text import DataError, content_key, map_args

IS_NEXT, NOT_NEXT = 0, 1  # BertForPreTraining's convention


def split_documents(documents: list[list[str]], eval_fraction: float, seed: int):
    """Hold out whole documents (not pairs), so eval sentences were never seen in training. Each side gets
    two documents at least (random next sentences come from another document; under 4 documents nothing is
    held out) and, where the corpus allows, one with two sentences (a true next sentence)."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(documents) * eval_fraction)
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 2), len(documents) - 2)  # each side needs two documents for random pairs
        n_eval = n_eval if n_eval >= 2 else 0
    multi = [p for p, k in enumerate(order) if len(documents[k]) >= 2]  # positions of 2+ sentence documents
    if n_eval and len(multi) >= 2:  # trade one document where a side has no true next sentence
        if multi[0] >= n_eval:
            order[0], order[multi[0]] = order[multi[0]], order[0]
        elif multi[-1] < n_eval:
            order[n_eval], order[multi[-1]] = order[multi[-1]], order[n_eval]
    eval_ids = set(order[:n_eval])
    train = [d for i, d in enumerate(documents) if i not in eval_ids]
    held = [d for i, d in enumerate(documents) if i in eval_ids]
    return train, held


def build_nsp_pairs(
    documents: list[list[str]], seed: int, source: str = "corpus", *, copies: int = 1, both: bool = False
) -> dict[str, list]:
    """Columns a, b, next_sentence_label: one pair per adjacent sentence pair of each document, per copy.

    Each of the `copies` (BERT's dupe factor) draws its own labels and random partners, so a small corpus
    yields many distinct pairs instead of the same ones every epoch. With `both`, every sentence appears
    once with its true next and once with a random one: an exact balance from few documents, for eval.
    """
    if not any(len(doc) >= 2 for doc in documents):
        raise DataError(
            f"{source}: no document has two or more sentences, so there is no true next sentence; "
            f"put several sentences per document (a blank line ends a document)"
        )
    if len(documents) < 2:
        raise DataError(
            f"{source}: only one document, so there is no other document to draw a random sentence from; "
            f"separate documents with blank lines, or use --documents line if each line is one document"
        )
    if copies < 1:
        raise DataError(f"copies must be at least 1, got {copies}")
    rng = random.Random(seed)
    cols: dict[str, list] = {"a": [], "b": [], "next_sentence_label": []}
    for _ in range(copies):
        slots = [(d, i) for d, doc in enumerate(documents) for i in range(len(doc) - 1)]
        if both:
            slots, labels = [s for s in slots for _ in range(2)], [IS_NEXT, NOT_NEXT] * len(slots)
        else:
            labels = [IS_NEXT] * ((len(slots) + 1) // 2) + [NOT_NEXT] * (len(slots) // 2)
            rng.shuffle(labels)
        for (d, i), label in zip(slots, labels):
            b, label = _partner(documents, d, i, label, rng)
            cols["a"].append(documents[d][i])
            cols["b"].append(b)
            cols["next_sentence_label"].append(label)
    return cols


def _partner(documents: list[list[str]], d: int, i: int, label: int, rng: random.Random) -> tuple[str, int]:
    """The second sentence for `label`, and the label it really has: a random sentence equal to the true
    next one (boilerplate repeated across documents) is redrawn, and where every other sentence is that
    same one, the pair is labelled IS_NEXT rather than wrongly NOT_NEXT."""
    true_next = documents[d][i + 1]
    if label == IS_NEXT:
        return true_next, IS_NEXT
    for _ in range(100):
        other = rng.randrange(len(documents) - 1)
        other += other >= d  # any document but this one
        b = rng.choice(documents[other])
        if b != true_next:
            return b, NOT_NEXT
    rest = [s for k, doc in enumerate(documents) if k != d for s in doc if s != true_next]
    return (rng.choice(rest), NOT_NEXT) if rest else (true_next, IS_NEXT)


def tokenize_pairs(pairs: dict[str, list], tokenizer, max_length: int, cache_dir: str | Path | None = None):
    """A `datasets.Dataset` of input_ids, token_type_ids, next_sentence_label and length.

    Pairs are truncated longest-first, so both sentences keep as much as fits. With `cache_dir`, the
    tokenised table is written there once and reused by later runs and by the other ranks.
    """
    import datasets

    def encode(batch):
        enc = tokenizer(
            batch["a"],
            batch["b"],
            truncation="longest_first",
            max_length=max_length,
            return_token_type_ids=True,
            return_attention_mask=False,
        )
        return {
            "input_ids": enc["input_ids"],
            "token_type_ids": enc["token_type_ids"],
            "length": [len(x) for x in enc["input_ids"]],
        }

    key = content_key(pairs, tokenizer.get_vocab(), f"{type(tokenizer).__name__}:{max_length}")
    return datasets.Dataset.from_dict(pairs).map(
        encode,
        batched=True,
        remove_columns=["a", "b"],
        **map_args(cache_dir, f"nsp-{key}"),
        desc="tokenise NSP pairs",
    )
