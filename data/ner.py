"""Named-entity data: word/tag files -> overlapping windows of word pieces with aligned labels, and back.

Reads CoNLL-style files (token ... tag per line, blank line between sentences) or JSON lines with tokens and
tags. Tag schemes: IOB2, IOB1 (the original CoNLL-2003 release) and BIOES, detected per file or named with
`tag_scheme`; tags are checked up front (file and line in the message) and always come back as IOB2.
Sentences longer than the model's window are split with overlap (stride); predictions are merged back to
one tag per word for metrics and output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from recipebox.data.text import DataError, check_text_file, content_key, map_args

IGNORE = -100
NO_WORD = -1  # `_word_ids` of positions that are not a word's first piece (specials, padding, later pieces)


@dataclass
class TaggedSentences:
    tokens: list[list[str]]
    tags: list[list[str]]
    where: list[str]  # "train.conll, line 12" of each sentence's first word
    source: str
    scheme: str = "iob2"  # the scheme the file was read in ("iob1", "iob2" or "bioes"); tags are IOB2

    def __len__(self) -> int:
        return len(self.tokens)


TAG_SCHEMES = ("auto", "iob1", "iob2", "bioes")


def read_tagged(
    path: str, *, tokens_key: str = "tokens", tags_key: str = "tags", names=None, tag_scheme: str = "auto"
) -> TaggedSentences:
    """A CoNLL file (.conll/.txt/.iob/...) or JSON lines (.jsonl/.json); integer tags need `names`.

    `tag_scheme` is "auto" (detect per file), "iob1", "iob2" or "bioes"; the tags come back as IOB2 with the
    same entity spans, and `.scheme` says which scheme the file was read in.
    """
    if tag_scheme not in TAG_SCHEMES:
        raise ValueError(f"tag_scheme must be one of {', '.join(TAG_SCHEMES)}; got {tag_scheme!r}")
    file = check_text_file(path, "CoNLL file (a token and its tag per line) or .jsonl of tokens and tags")
    if file.suffix.lower() in (".jsonl", ".json"):
        sents = _read_json_lines(file, tokens_key, tags_key, names)
    else:
        sents = _read_conll(file)
    if not sents.tokens:
        raise DataError(
            f"{path}: no sentences found; give token/tag lines with a blank line between sentences"
        )
    sents.scheme = detect_scheme(sents.tags) if tag_scheme == "auto" else tag_scheme
    sents.tags = [to_iob2(tags, sents.scheme, where) for tags, where in zip(sents.tags, sents.where)]
    return sents


def _read_conll(path: Path) -> TaggedSentences:
    out = TaggedSentences([], [], [], str(path))
    words: list[str] = []
    tags: list[str] = []
    start = 0
    # Lines end at "\n" and fields at spaces and tabs only: a token may hold U+0085, U+2028 or a no-break
    # space, which str.splitlines and str.split would cut at.
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
        fields = re.findall(r"[^ \t\r\f\v]+", line) if line.strip() else []  # a blank line ends a sentence
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                out.tokens.append(words)
                out.tags.append(tags)
                out.where.append(f"{path}, line {start}")
            words, tags = [], []
            continue
        if len(fields) < 2:
            raise DataError(
                f"{path}, line {number}: {line.strip()!r} has one field; each line needs a token and its tag "
                f"separated by whitespace (e.g. 'Paris B-LOC'), and a blank line between sentences"
            )
        if not words:
            start = number
        words.append(fields[0])
        tags.append(fields[-1])  # CoNLL-2003 puts POS and chunk tags between: the entity tag comes last
    if words:
        out.tokens.append(words)
        out.tags.append(tags)
        out.where.append(f"{path}, line {start}")
    return out


def _read_json_lines(path: Path, tokens_key: str, tags_key: str, names) -> TaggedSentences:
    out = TaggedSentences([], [], [], str(path))
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):  # as in _read_conll
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}); one object per line") from None
        if not isinstance(row, dict) or tokens_key not in row or tags_key not in row:
            raise DataError(
                f"{where}: needs {tokens_key!r} and {tags_key!r} lists (set --tokens-key/--tags-key)"
            )
        words, tags = row[tokens_key], row[tags_key]
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise DataError(f"{where}: {tokens_key!r} and {tags_key!r} must be lists of the same length")
        if not words:
            continue
        for i, w in enumerate(words, 1):  # an empty word takes no piece: its tag (an entity's B-) is lost
            if isinstance(w, bool) or not isinstance(w, str | int | float) or not str(w).strip():
                raise DataError(
                    f"{where}: word {i} of {tokens_key!r} is {json.dumps(w)}; every word needs text"
                )
        if any(isinstance(t, int) for t in tags):
            if not names:
                raise DataError(f"{where}: tags are ids; give the tag names in id order with --labels")
            if any(not 0 <= t < len(names) for t in tags if isinstance(t, int)):
                raise DataError(
                    f"{where}: a tag id is outside 0..{len(names) - 1} (--labels has {len(names)})"
                )
            tags = [names[t] if isinstance(t, int) else t for t in tags]
        out.tokens.append([str(w) for w in words])
        out.tags.append([str(t) for t in tags])
        out.where.append(where)
    return out


def _opens_with_i(tag: str, prev: str) -> bool:
    """An I-X after O, the sentence start or another type: it opens an entity, which IOB1 allows, IOB2 not."""
    return tag.startswith("I-") and prev[2:] != tag[2:]


def detect_scheme(sentences: list[list[str]]) -> str:
    """BIOES if any tag has an S- or E- prefix; IOB1 if some entity opens with I-; else IOB2."""
    if any(t[:2] in ("S-", "E-") for tags in sentences for t in tags):
        return "bioes"
    for tags in sentences:
        if any(_opens_with_i(t, p) for p, t in zip(["O", *tags], tags)):
            return "iob1"
    return "iob2"


def to_iob2(tags: list[str], scheme: str, where: str) -> list[str]:
    """One sentence's tags read in `scheme`, as IOB2 with the same entity spans; DataError if they do not fit."""
    _check_prefixes(tags, scheme, where)
    if scheme == "bioes":
        _check_bioes(tags, where)
        return [{"S-": "B-", "E-": "I-"}.get(t[:2], t[:2]) + t[2:] for t in tags]
    # IOB1 keeps B- for an entity right after one of the same type; a B- elsewhere still opens an entity,
    # which is what it means in IOB2 as well, so it is accepted as is.
    out = []
    prev = "O"
    for i, tag in enumerate(tags):
        if _opens_with_i(tag, prev):
            if scheme == "iob2":
                raise DataError(
                    f"{where} (word {i + 1}): {tag!r} follows {prev!r}; in IOB2 an entity starts with B-. "
                    f"This looks like IOB1 (an I- that starts an entity): use --tag-scheme auto or iob1"
                )
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def _check_prefixes(tags: list[str], scheme: str, where: str) -> None:
    prefixes = ("B-", "I-", "E-", "S-") if scheme == "bioes" else ("B-", "I-")
    for i, tag in enumerate(tags):
        if tag == "O" or (tag[:2] in prefixes and len(tag) > 2):
            continue
        if tag[:2] in ("S-", "E-") and len(tag) > 2:
            raise DataError(
                f"{where} (word {i + 1}): tag {tag!r} is BIOES, but the file is read as {scheme.upper()}; "
                f"use --tag-scheme auto or bioes"
            )
        if scheme == "bioes":
            raise DataError(f"{where} (word {i + 1}): tag {tag!r} is not O, B-, I-, E- or S-TYPE (BIOES)")
        raise DataError(f"{where} (word {i + 1}): tag {tag!r} is not O, B-TYPE or I-TYPE ({scheme.upper()})")


def _check_bioes(tags: list[str], where: str) -> None:
    """I-X and E-X continue a B-X or I-X; B-X and I-X are followed by I-X or E-X (S-X is a one-word entity)."""
    for i, (prev, tag, nxt) in enumerate(zip(["O", *tags], tags, [*tags[1:], "O"])):
        if tag[:2] in ("I-", "E-") and not (prev[:2] in ("B-", "I-") and prev[2:] == tag[2:]):
            raise DataError(
                f"{where} (word {i + 1}): {tag!r} follows {prev!r}; in BIOES an entity opens with B- "
                f"(or is a single S- word). Fix the tags, or use --tag-scheme auto if the file is IOB1 or IOB2"
            )
        if tag[:2] in ("B-", "I-") and not (nxt[:2] in ("I-", "E-") and nxt[2:] == tag[2:]):
            raise DataError(
                f"{where} (word {i + 1}): {tag!r} is followed by {nxt!r}; in BIOES an entity ends with E- "
                f"(a one-word entity is S-). Fix the tags, or use --tag-scheme auto if the file is IOB1 or IOB2"
            )


def tag_names(sents: TaggedSentences, fixed: list[str] | None = None) -> list[str]:
    """O first, then B-/I- for every entity type seen in training (both, even if one never occurs)."""
    if fixed:
        return fixed
    types = sorted({t[2:] for tags in sents.tags for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def check_known(sents: TaggedSentences, names: list[str]) -> None:
    known = set(names)
    for tags, where in zip(sents.tags, sents.where):
        for i, tag in enumerate(tags):
            if tag not in known:
                raise DataError(
                    f"{where} (word {i + 1}): tag {tag!r} does not occur in the training data "
                    f"(tags: {', '.join(names)}); fix it, or list every tag with --labels"
                )


def encode_windows(
    tokens: list[list[str]], tag_ids, tokenizer, max_length: int, stride: int, label_all_tokens: bool, b_to_i
):
    """Word pieces in windows of max_length (overlapping by `stride` pieces), with per-window columns:
    input_ids, labels (first piece of a word, or all pieces with label_all_tokens; -100 elsewhere),
    _example (the sentence) and _word_ids (the word whose first piece sits there, else -1)."""
    enc = tokenizer(
        tokens,
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    examples = enc["overflow_to_sample_mapping"]
    cols = {"input_ids": enc["input_ids"], "_example": examples, "_word_ids": [], "labels": []}
    if "token_type_ids" in enc:
        cols["token_type_ids"] = enc["token_type_ids"]
    for i, ex in enumerate(examples):
        continues = i > 0 and examples[i - 1] == ex  # a later window of the same sentence
        first_word, prev = True, None
        word_ids, labels = [], []
        for w, (start, _end) in zip(enc.word_ids(i), enc["offset_mapping"][i]):
            # A window may open in the middle of a word: that piece is not the word's first.
            first = w is not None and w != prev and (start == 0 or not (continues and first_word))
            if w is not None:
                first_word = False
            prev = w
            word_ids.append(w if first else NO_WORD)
            if tag_ids is None or w is None:
                labels.append(IGNORE)
            elif first:
                labels.append(tag_ids[ex][w])
            else:
                labels.append(b_to_i[tag_ids[ex][w]] if label_all_tokens else IGNORE)
        cols["_word_ids"].append(word_ids)
        cols["labels"].append(labels)
    cols["length"] = [len(x) for x in cols["input_ids"]]
    return cols


def b_to_i_map(names: list[str]) -> list[int]:
    """For --label-all-tokens: the later pieces of a B-X word are labelled I-X."""
    index = {n: i for i, n in enumerate(names)}
    return [index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]


def tokenize_windows(
    sents: TaggedSentences,
    names: list[str],
    tokenizer,
    max_length: int,
    stride: int,
    label_all_tokens: bool,
    cache_dir: str | Path | None = None,
):
    """A `datasets.Dataset` of windows (see `encode_windows`) plus length; cached when asked."""
    import datasets

    index = {n: i for i, n in enumerate(names)}
    data = {"tokens": sents.tokens, "tag_ids": [[index[t] for t in tags] for tags in sents.tags]}
    b_to_i = b_to_i_map(names)

    def encode(batch, ids):
        cols = encode_windows(
            batch["tokens"], batch["tag_ids"], tokenizer, max_length, stride, label_all_tokens, b_to_i
        )
        cols["_example"] = [ids[e] for e in cols["_example"]]  # sentence index in the whole split
        return cols

    key = content_key(data, names, max_length, stride, label_all_tokens, tokenizer.get_vocab())
    return datasets.Dataset.from_dict(data).map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=["tokens", "tag_ids"],
        **map_args(cache_dir, f"ner-{key}"),
        desc="tokenise sentences into windows",
    )


def merge_windows(records, word_counts: list[int], num_tags: int) -> list[list[int]]:
    """One tag id per word of every sentence from per-window records (example, word ids, probabilities).

    A word seen by several overlapping windows gets the mean of their probabilities; a word no window saw
    (a word the tokenizer turns into nothing) gets tag 0, which is O.
    """
    sums = [[[0.0] * num_tags for _ in range(n)] for n in word_counts]
    for example, words, probs in records:
        for w, p in zip(words, probs):
            row = sums[example][w]
            for j, v in enumerate(p):
                row[j] += v
    return [[max(range(num_tags), key=row.__getitem__) if any(row) else 0 for row in sent] for sent in sums]


_REPORT_KEYS = (("precision", ""), ("recall", ""), ("f1", "-score"))


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level precision/recall/F1 (seqeval, exact spans), word accuracy, and per-type scores."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    result = {
        "precision": precision_score(gold, pred, zero_division=0),
        "recall": recall_score(gold, pred, zero_division=0),
        "f1": f1_score(gold, pred, zero_division=0),
        "word_accuracy": accuracy_score(gold, pred),
        "sentences": float(len(gold)),
    }
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    for kind, scores in report.items():
        if " avg" not in kind:
            result.update({f"{m}/{kind}": float(scores[m + suffix]) for m, suffix in _REPORT_KEYS})
    return {k: float(v) for k, v in result.items()}
