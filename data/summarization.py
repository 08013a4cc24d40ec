"""Abstractive summarization data: (text, summary) pairs from CSV, JSON lines or a `datasets` name ->
tokenised sources and labels; ROUGE as the summarization papers report it, and the lead-k baseline.

Every pair is checked before training: a missing column or an empty text or summary is a DataError naming
the file and line. ROUGE is `rouge_score`'s (F1 x 100, Porter stemming), with each text cleaned (Pegasus'
"<n>" newlines) and put one sentence per line first, as rougeLsum needs; the recipe, its tests and its
predictor share this one implementation.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from recipebox.data.classification import check_columns, read_table
from recipebox.data.text import DataError, content_key, map_args, split_sentences

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class Pairs:
    texts: list[str]
    summaries: list[str]
    source: str  # the file or dataset name, for messages


def read_pairs(
    path: str,
    text_column: str = "text",
    summary_column: str = "summary",
    *,
    dataset_config: str = "",
    split: str = "train",
) -> Pairs:
    """A CSV/TSV, JSON lines file or a `datasets` name; every text and summary a non-empty string."""
    if text_column == summary_column:
        raise DataError(
            f"--text-column and --summary-column both name {text_column!r}; the summary needs its own column"
        )
    table = read_table(path, dataset_config=dataset_config, split=split)
    check_columns(table, [text_column], "--text-column")
    check_columns(table, [summary_column], "--summary-column")
    pairs = Pairs([], [], table.source)
    for row, where in zip(table.rows, table.where):
        for column, out in ((text_column, pairs.texts), (summary_column, pairs.summaries)):
            value = row[column]
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"{where}: column {column!r} is empty or not text ({value!r}); fill it or drop the row"
                )
            out.append(value)
    return pairs


def tokenize_pairs(
    texts: list[str],
    summaries: list[str],
    tokenizer,
    *,
    prefix: str,
    max_source_length: int,
    max_target_length: int,
    cache_dir: str | Path | None = None,
):
    """A `datasets.Dataset` of input_ids (prefix + text), labels (the summary's ids) and length, each with
    the tokenizer's own special tokens (T5's trailing </s>, BART's <s> ... </s>) and truncated to its
    maximum length. No attention masks: the collate makes them. Cached under cache_dir when given."""
    import datasets

    if len(texts) != len(summaries):
        raise ValueError(f"{len(texts)} texts but {len(summaries)} summaries")
    data = {"text": texts, "summary": summaries}

    def encode(batch):
        sources = tokenizer(
            [prefix + t for t in batch["text"]],
            truncation=True,
            max_length=max_source_length,
            return_attention_mask=False,
        )["input_ids"]
        labels = tokenizer(
            text_target=batch["summary"],
            truncation=True,
            max_length=max_target_length,
            return_attention_mask=False,
        )["input_ids"]
        return {"input_ids": sources, "labels": labels, "length": [len(x) for x in sources]}

    settings = [prefix, max_source_length, max_target_length]
    # _post_processor: which special tokens are added
    key = content_key(data, settings, tokenizer.get_vocab(), _post_processor(tokenizer))
    return datasets.Dataset.from_dict(data).map(
        encode,
        batched=True,
        remove_columns=list(data),
        **map_args(cache_dir, f"sum-{key}"),
        desc="tokenise texts and summaries",
    )


def _post_processor(tokenizer) -> str:
    processor = getattr(getattr(tokenizer, "backend_tokenizer", None), "post_processor", None)
    if processor is None:
        return type(tokenizer).__name__
    return json.dumps(json.loads(processor.__getstate__()), sort_keys=True)


# -- text and ROUGE --------------------------------------------------------------------------------------
def clean_summary(text: str) -> str:
    """A summary as scored and shown: Pegasus' "<n>" is a newline, lines stripped, empty lines dropped."""
    lines = (line.strip() for line in text.replace("<n>", "\n").splitlines())
    return "\n".join(line for line in lines if line)


def sentences_per_line(text: str) -> str:
    """One sentence per line (each existing line split into sentences), as rougeLsum reads a summary."""
    return "\n".join(s for line in text.splitlines() for s in split_sentences(line))


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """F1 x 100 of rouge1, rouge2, rougeL and rougeLsum for one prediction against its reference."""
    scores = _scorer().score(
        sentences_per_line(clean_summary(reference)), sentences_per_line(clean_summary(prediction))
    )
    return {k: 100 * scores[k].fmeasure for k in ROUGE_KEYS}


def mean_rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """The mean of rouge_scores over the pairs (no bootstrap resampling, so the same inputs give the same
    numbers)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        for k, v in rouge_scores(prediction, reference).items():
            totals[k] += v
    return {k: v / len(predictions) for k, v in totals.items()}


def lead_k(text: str, k: int = 1) -> str:
    """The lead-k baseline: the text's first k sentences, joined by a space. A line break ends a sentence
    too (a headline or list item without a full stop is not run into the next sentence)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return " ".join(sentences_per_line(text).splitlines()[:k])
