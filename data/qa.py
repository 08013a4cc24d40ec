"""Extractive question answering data (SQuAD v1.1 / v2.0): questions -> windows of question + context with
the answer's token span, and the model's best spans back to answer text, scored as the official script does.

Reads the official nested SQuAD JSON, the flattened form (one record per question) as a JSON list or JSON
lines, or a `datasets` name with the same columns. Every question is checked before training (a missing field,
a duplicate id, an answer that is not where answer_start says); the message names the file, the question and
the fix. Contexts longer than a window are cut into overlapping windows (doc_stride tokens of overlap); a
window that does not hold the whole answer is labelled with its CLS token, as a window of an unanswerable
question is.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from recipebox.data.text import DataError, content_key, map_args

NO_OFFSET = [-1, -1]  # `offsets` of a token that is not part of the context (question, specials)


@dataclass
class QAExamples:
    source: str  # the file or dataset name, for messages
    ids: list[str]
    titles: list[str]
    contexts: list[str]
    questions: list[str]
    answers: list[dict]  # {"text": [str...], "answer_start": [int...]}; both empty when unanswerable

    def __len__(self) -> int:
        return len(self.ids)


# -- reading ---------------------------------------------------------------------------------------------
def read_qa(
    path: str, *, split: str = "train", dataset_config: str = "", version_2: bool = False
) -> QAExamples:
    """SQuAD JSON, a JSON list or JSON lines of flat questions, or else a `datasets` name; checked in full.

    Unanswerable questions (empty answers, or is_impossible true) are accepted only with `version_2`.
    """
    file = Path(path)
    if file.is_file() or file.suffix.lower() in (".json", ".jsonl"):
        source, rows = str(file), _read_file(file)
    else:
        source, rows = f"{path}[{split}]", _read_dataset(path, dataset_config, split)
    return _check(rows, source, version_2)


def _read_file(path: Path) -> list[tuple[str, object]]:
    """(where, record) per question, records in the flat form; `where` names the question by position."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8; re-encode the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: no questions (the file is empty); give SQuAD JSON or one question per line")
    if path.suffix.lower() == ".jsonl":
        return _json_lines(path, text)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if err.lineno > 1 and _is_object(text.lstrip().partition("\n")[0]):
            return _json_lines(path, text)  # JSON lines in a .json file
        raise DataError(
            f"{path}, line {err.lineno}: not valid JSON ({err.msg}); fix the file, or give JSON lines "
            f"(one question per line) a .jsonl name"
        ) from None
    if isinstance(doc, dict) and "data" in doc:
        return _flatten_squad(path, doc["data"])
    if isinstance(doc, list):
        return [(f"{path}: item {i + 1} of the list", row) for i, row in enumerate(doc)]
    if isinstance(doc, dict) and "question" in doc:
        return [(f"{path}, line 1", doc)]  # JSON lines holding one question
    raise DataError(
        f"{path}: neither SQuAD JSON ({{'data': [...]}}) nor a list of questions; give the official layout, "
        f"a JSON list or JSON lines of {{'id', 'context', 'question', 'answers'}}"
    )


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _json_lines(path: Path, text: str) -> list[tuple[str, object]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: strings may hold U+2028 or U+0085
        if not line.strip():
            continue
        try:
            rows.append((f"{path}, line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({err.msg}); one question per line"
            ) from None
    return rows


def _flatten_squad(path: Path, data) -> list[tuple[str, object]]:
    """The official layout, data[].paragraphs[].qas[], as flat records (title and context copied to each)."""
    if not isinstance(data, list):
        raise DataError(f"{path}: 'data' must be a list of articles, each with 'title' and 'paragraphs'")
    rows = []
    for a, article in enumerate(data):
        here = f"{path}: data[{a}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(
                f"{here}: no 'paragraphs' list; every article needs one (each with context and qas)"
            )
        for p, paragraph in enumerate(article["paragraphs"]):
            here = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict):
                raise DataError(f"{here}: expected an object with 'context' and 'qas'")
            for field in ("context", "qas"):
                if field not in paragraph:
                    raise DataError(f"{here}: no {field!r} field; every paragraph needs 'context' and 'qas'")
            if not isinstance(paragraph["qas"], list):
                raise DataError(f"{here}: 'qas' must be a list of questions")
            for q, qa in enumerate(paragraph["qas"]):
                row = dict(qa) if isinstance(qa, dict) else qa
                if isinstance(row, dict):
                    row.update(title=article.get("title", ""), context=paragraph["context"])
                rows.append((f"{here}.qas[{q}]", row))
    return rows


def _read_dataset(name: str, config: str, split: str) -> list[tuple[str, object]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # the hub, a missing split or a missing folder: all the user's to fix
        raise DataError(
            f"{name}: not a .json/.jsonl file and not a loadable `datasets` name or split {split!r} ({err}); "
            f"check the path"
        ) from None
    missing = [c for c in ("id", "context", "question", "answers") if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{name}[{split}]: no column(s) {', '.join(missing)} (it has {', '.join(ds.column_names)}); "
            f"give SQuAD columns id, title, context, question, answers"
        )
    return [(f"{name}[{split}] row {i}", row) for i, row in enumerate(ds.to_list())]


def _check(rows: list[tuple[str, object]], source: str, version_2: bool) -> QAExamples:
    out = QAExamples(source, [], [], [], [], [])
    first_seen: dict[str, str] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a question object, got {type(row).__name__}")
        if "id" not in row:
            raise DataError(f"{where}: no 'id' field; give every question a unique id")
        qid = str(row["id"])
        label = f"{source}: question {qid}"
        if qid in first_seen:
            places = " and ".join(w.removeprefix(source).lstrip(":, ") for w in (first_seen[qid], where))
            raise DataError(f"{label}: the id is used twice ({places}); give each question its own id")
        first_seen[qid] = where
        for field in ("context", "question"):
            if field not in row:
                raise DataError(f"{label}: no {field!r} field; every question needs one")
            if not isinstance(row[field], str) or not row[field].strip():
                raise DataError(
                    f"{label}: {field!r} is empty or not text ({row[field]!r}); fill it or drop the question"
                )
        title = row.get("title") or ""
        if not isinstance(title, str):
            raise DataError(f"{label}: 'title' must be text, got {title!r}")
        if row.get("is_impossible") in (True, "true", "True"):
            answers = {"text": [], "answer_start": []}  # SQuAD 2.0 keeps plausible answers, not answers
        elif "answers" not in row:
            raise DataError(
                f"{label}: no 'answers' field; give {{'text': [...], 'answer_start': [...]}} "
                f"(empty lists for an unanswerable question)"
            )
        else:
            answers = _answers(row["answers"], row["context"], label)
        if not answers["text"] and not version_2:
            raise DataError(
                f"{label}: the question has no answer (unanswerable, as in SQuAD 2.0); pass "
                f"--version-2-with-negative true (or auto) for SQuAD 2.0 data"
            )
        out.ids.append(qid)
        out.titles.append(title)
        out.contexts.append(row["context"])
        out.questions.append(row["question"])
        out.answers.append(answers)
    if not out.ids:
        raise DataError(f"{source}: no questions; give at least one (SQuAD JSON: data[].paragraphs[].qas[])")
    return out


def _answers(value, context: str, label: str) -> dict:
    """{"text", "answer_start"} lists from either form (SQuAD's list of objects or the flat dict of lists),
    each answer checked against the context."""
    if isinstance(value, list):  # the official layout: [{"text": ..., "answer_start": ...}, ...]
        if not all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in value):
            raise DataError(f"{label}: each answer needs 'text' and 'answer_start'; fix the answers list")
        value = {"text": [a["text"] for a in value], "answer_start": [a["answer_start"] for a in value]}
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise DataError(
            f"{label}: 'answers' needs 'text' and 'answer_start' lists, got {value!r}; "
            f"fix it as {{'text': [...], 'answer_start': [...]}}"
        )
    texts, starts = value["text"], value["answer_start"]
    if not isinstance(texts, list) or not isinstance(starts, list):
        raise DataError(
            f"{label}: answers' text and answer_start must be lists, got {texts!r} and {starts!r}; "
            f"wrap them in [...]"
        )
    if len(texts) != len(starts):
        raise DataError(
            f"{label}: answers has {len(texts)} text(s) and {len(starts)} answer_start(s); "
            f"give one answer_start per text"
        )
    for k, (text, start) in enumerate(zip(texts, starts)):
        if not isinstance(text, str) or not text:
            raise DataError(
                f"{label}: answer {k} is empty or not text ({text!r}); give the answer's text, or empty "
                f"answers for an unanswerable question"
            )
        if isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"{label}: answer {k} has answer_start {start!r}; it must be a character offset")
        found = context[start : start + len(text)] if start >= 0 else ""
        if found != text:
            at = context.find(text)
            hint = f" (the text first occurs at {at})" if at >= 0 else " (the text is not in the context)"
            raise DataError(
                f"{label}: answer {k} expected {text!r} at answer_start {start}, found {found!r}; "
                f"fix answer_start{hint}"
            )
    return {"text": list(texts), "answer_start": list(starts)}


# -- windows ---------------------------------------------------------------------------------------------
def encode_features(
    questions: list[str],
    contexts: list[str],
    answers: list[dict] | None,
    tokenizer,
    max_length: int,
    doc_stride: int,
    where: list[str] | None = None,
) -> dict[str, list]:
    """Windows of question + context (context + question for left-padding tokenizers), `doc_stride` context
    tokens of overlap. Per window: input_ids, attention_mask, token_type_ids (if the tokenizer has them),
    _example (the question's index), _context (1 on context tokens), _cls (the CLS token's index), offsets
    (character span in the context, [-1, -1] off it), length and, with answers, start/end_positions (the
    first answer's tokens when the window holds all of it, else _cls). `where` names each question in
    messages ("train.json, id 5733be28")."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__}: extractive QA needs a fast tokenizer (offsets); load the model's "
            f"fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True)) or pick a model that has one"
        )
    # Some SQuAD questions open with spaces, which BPE tokenizers turn into tokens that take context room.
    questions = [q.lstrip() for q in questions]
    _check_room(questions, tokenizer, max_length, doc_stride, where)
    question_first = tokenizer.padding_side != "left"
    enc = tokenizer(
        questions if question_first else contexts,
        contexts if question_first else questions,
        truncation="only_second" if question_first else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_attention_mask=True,
        padding=False,
    )
    context_sequence = 1 if question_first else 0
    examples = list(enc["overflow_to_sample_mapping"])
    cols = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        cols["token_type_ids"] = enc["token_type_ids"]
    cols.update(_example=examples, _context=[], _cls=[], offsets=[])
    if answers is not None:
        cols.update(start_positions=[], end_positions=[])
    cls_id = tokenizer.cls_token_id
    for i, ex in enumerate(examples):
        ids = enc["input_ids"][i]
        in_context = [int(s == context_sequence) for s in enc.sequence_ids(i)]
        offsets = [
            [int(a), int(b)] if c else list(NO_OFFSET)
            for (a, b), c in zip(enc["offset_mapping"][i], in_context)
        ]
        cls = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
        cols["_context"].append(in_context)
        cols["_cls"].append(cls)
        cols["offsets"].append(offsets)
        if answers is not None:
            start, end = _answer_tokens(answers[ex], offsets, in_context, cls)
            cols["start_positions"].append(start)
            cols["end_positions"].append(end)
    cols["length"] = [len(x) for x in cols["input_ids"]]
    return cols


def _check_room(
    questions: list[str], tokenizer, max_length: int, doc_stride: int, where: list[str] | None
) -> None:
    """Every window must fit the question and more than doc_stride context tokens (the tokenizer would
    otherwise fail without saying which question)."""
    if not questions:
        return
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(questions)), key=lengths.__getitem__)
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - lengths[longest]
    if room <= doc_stride:
        named = f"{where[longest]}: " if where else ""
        raise DataError(
            f"{named}question {questions[longest][:80]!r} is {lengths[longest]} tokens: a window of {max_length} tokens "
            f"has room for {max(room, 0)} context tokens, and needs more than the doc stride ({doc_stride}); "
            f"raise the maximum length, lower the doc stride, or shorten the question"
        )


def _answer_tokens(
    answer: dict, offsets: list[list[int]], in_context: list[int], cls: int
) -> tuple[int, int]:
    if not answer["text"]:
        return cls, cls
    start_char = answer["answer_start"][0]
    end_char = start_char + len(answer["text"][0])
    tokens = [t for t, c in enumerate(in_context) if c]
    if not tokens or offsets[tokens[0]][0] > start_char or offsets[tokens[-1]][1] < end_char:
        return cls, cls  # the answer is cut by the window's edge, or lies outside it
    start = next(t for t in tokens if offsets[t][1] > start_char)
    end = next(t for t in reversed(tokens) if offsets[t][0] < end_char)
    return (start, end) if start <= end else (cls, cls)


def tokenize_features(
    examples: QAExamples,
    tokenizer,
    max_length: int,
    doc_stride: int,
    *,
    labels: bool,
    cache_dir: str | Path | None = None,
):
    """A `datasets.Dataset` of windows (see `encode_features`); with `labels`, start/end positions too.
    `_example` indexes the whole split. Cached under cache_dir when given."""
    import datasets

    data = {"question": examples.questions, "context": examples.contexts}
    if labels:  # only the first answer labels a window
        data["answer_text"] = [a["text"][0] if a["text"] else "" for a in examples.answers]
        data["answer_start"] = [a["answer_start"][0] if a["text"] else -1 for a in examples.answers]

    def encode(batch, ids):
        answers = None
        if labels:
            answers = [
                {"text": [t], "answer_start": [s]} if s >= 0 else {"text": [], "answer_start": []}
                for t, s in zip(batch["answer_text"], batch["answer_start"])
            ]
        where = [f"{examples.source}, id {examples.ids[i]}" for i in ids]
        cols = encode_features(
            batch["question"], batch["context"], answers, tokenizer, max_length, doc_stride, where
        )
        cols["_example"] = [ids[e] for e in cols["_example"]]  # question index in the whole split
        return cols

    settings = [max_length, doc_stride, labels, tokenizer.padding_side, type(tokenizer).__name__]
    key = content_key(data, settings, tokenizer.get_vocab())
    return datasets.Dataset.from_dict(data).map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=list(data),
        **map_args(cache_dir, f"qa-{key}"),
        desc="tokenise questions into windows",
    )


# -- answers from the model's logits ---------------------------------------------------------------------
def postprocess(
    contexts: list[str],
    window_example: list[int],
    window_offsets: list[list[list[int]]],
    records: list[tuple],
    *,
    n_best: int,
    max_answer_length: int,
    version_2: bool,
    null_threshold: float = 0.0,
) -> tuple[list[str], list[list[dict]]]:
    """Best answer text and n-best list per context from per-window records
    (window, start_idx, start_logits, end_idx, end_logits, null_score): each window's top start and end
    tokens with their logits, and its CLS start + end logit.

    A candidate is a (start, end) pair of one window's top tokens, both in the context, in order, at most
    max_answer_length tokens; its score is the sum of the two logits. The n_best best character spans over
    all windows of an example are kept (a span seen by several windows keeps its best score). With
    version_2, the example's null score is the smallest over its windows, the answer is "" when it beats
    the best span's score by more than null_threshold, and the n-best list holds a "" entry with that score
    (start = end = 0) wherever it ranks.
    Probabilities are a softmax over the n-best list's scores.
    """
    spans: list[dict[tuple[int, int], float]] = [{} for _ in contexts]
    null: list[float | None] = [None] * len(contexts)
    for window, start_idx, start_logits, end_idx, end_logits, null_score in records:
        ex, offsets = window_example[window], window_offsets[window]
        if null[ex] is None or null_score < null[ex]:
            null[ex] = float(null_score)
        best = spans[ex]
        ends = [(e, v) for e, v in zip(end_idx, end_logits) if e < len(offsets) and offsets[e][0] >= 0]
        for s, s_logit in zip(start_idx, start_logits):
            if s >= len(offsets) or offsets[s][0] < 0:
                continue
            for e, e_logit in ends:
                if s <= e < s + max_answer_length:
                    span = (int(offsets[s][0]), int(offsets[e][1]))
                    score = float(s_logit) + float(e_logit)
                    if score > best.get(span, -math.inf):
                        best[span] = score
        if len(best) > 4 * n_best:
            # Memory stays bounded per question: a span below the n_best-th now can never make the final
            # list (the spans above it only gain), so it goes.
            spans[ex] = dict(sorted(best.items(), key=lambda item: item[1], reverse=True)[:n_best])
    predictions, nbest = [], []
    for ex, context in enumerate(contexts):
        kept = sorted(spans[ex].items(), key=lambda item: item[1], reverse=True)[:n_best]
        entries = [{"text": context[a:b], "score": score, "start": a, "end": b} for (a, b), score in kept]
        prediction = entries[0]["text"] if entries else ""
        if version_2 and null[ex] is not None:
            if not entries or null[ex] - entries[0]["score"] > null_threshold:
                prediction = ""
            entries.append({"text": "", "score": null[ex], "start": 0, "end": 0})
            entries.sort(key=lambda entry: entry["score"], reverse=True)
        if entries:
            top = entries[0]["score"]
            weights = [math.exp(entry["score"] - top) for entry in entries]
            total = sum(weights)
            for entry, w in zip(entries, weights):
                entry["probability"] = w / total
        predictions.append(prediction)
        nbest.append(
            [{k: entry[k] for k in ("text", "probability", "score", "start", "end")} for entry in entries]
        )
    return predictions, nbest


# -- metrics (the official SQuAD v1.1 / v2.0 evaluation) ---------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, without punctuation, articles (a, an, the) and extra whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _exact(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def _f1(gold: str, pred: str) -> float:
    gold_tokens, pred_tokens = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)  # an unanswerable question: right only if both are empty
    same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], examples: QAExamples) -> dict[str, float]:
    """Exact match and token F1 (x100, best over the gold answers) for every question; with both answerable
    and unanswerable questions, also HasAns_* and NoAns_*. A question without a prediction counts as ""."""
    exact, f1, has_answer = [], [], []
    for qid, answers in zip(examples.ids, examples.answers):
        golds = [t for t in answers["text"] if normalize_answer(t)] or [""]
        pred = predictions.get(qid, "")
        exact.append(max(_exact(g, pred) for g in golds))
        f1.append(max(_f1(g, pred) for g in golds))
        has_answer.append(bool(answers["text"]))

    def scores(keep: list[bool], prefix: str = "") -> dict[str, float]:
        n = sum(keep)
        return {
            f"{prefix}exact": 100.0 * sum(v for v, k in zip(exact, keep) if k) / max(n, 1),
            f"{prefix}f1": 100.0 * sum(v for v, k in zip(f1, keep) if k) / max(n, 1),
            f"{prefix}total": float(n),
        }

    result = scores([True] * len(exact))
    if any(has_answer) and not all(has_answer):
        result.update(scores(has_answer, "HasAns_"))
        result.update(scores([not h for h in has_answer], "NoAns_"))
    return result


def fit_null_threshold(nbest: list[list[dict]], examples: QAExamples) -> tuple[float, float]:
    """SQuAD 2.0: the --null-score-diff-threshold with the best F1 on these questions, and that F1 (x100), as
    the official evaluation script's best_f1_thresh. `nbest` is `postprocess`'s (with its null entries): a
    question answers "" when its null score - its best span's score > the threshold."""
    diffs, gain = [], []  # per question: where it flips, and what answering the span instead of "" adds
    for entries, answers in zip(nbest, examples.answers):
        null = next((c["score"] for c in entries if c["text"] == ""), None)
        span = next((c for c in entries if c["text"] != ""), None)
        if null is None or span is None:
            continue
        golds = [t for t in answers["text"] if normalize_answer(t)] or [""]
        diffs.append(null - span["score"])
        gain.append(max(_f1(g, span["text"]) for g in golds) - max(_f1(g, "") for g in golds))
    base = sum(max(_f1(g, "") for g in ([t for t in a["text"] if normalize_answer(t)] or [""]))
               for a in examples.answers)  # fmt: skip
    # Threshold t answers every question with diff <= t: sweep the diffs in order, keep the best prefix.
    ordered = sorted(zip(diffs, gain))
    best, best_t, total = base, min(diffs, default=0.0) - 1e-6, base
    for i, (diff, g) in enumerate(ordered):
        total += g
        last_of_tie = i + 1 == len(ordered) or ordered[i + 1][0] != diff
        if last_of_tie and total > best:
            best, best_t = total, diff
    return best_t, 100.0 * best / max(len(examples), 1)
