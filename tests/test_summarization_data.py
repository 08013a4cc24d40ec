"""Summarization data: ROUGE checked against hand-worked counts, sentence lines and lead-k, the pair readers
and their errors, and tokenised sources and labels (special tokens, truncation, prefix, cache)."""

from __future__ import annotations

import json

import pytest

from recipebox.data.summarization import (
    ROUGE_KEYS,
    Pairs,
    clean_summary,
    lead_k,
    mean_rouge,
    read_pairs,
    rouge_scores,
    sentences_per_line,
    tokenize_pairs,
)
from recipebox.data.text import DataError


# -- ROUGE -----------------------------------------------------------------------------------------------
def test_rouge_of_one_changed_word():
    # prediction: the cat sat on the mat    reference: the cat lay on the mat
    # (no word is over 3 letters, so nothing is stemmed)
    # rouge1: shared unigrams the x2, cat, on, mat = 5 of 6 each side: P = R = 5/6 -> F1 83.33
    # rouge2: bigrams "the cat", "on the", "the mat" shared; "cat sat"/"sat on" vs "cat lay"/"lay on" are not:
    #         P = R = 3/5 -> F1 60.00
    # rougeL: LCS "the cat on the mat" = 5: P = R = 5/6 -> F1 83.33; rougeLsum: one sentence, the same
    scores = rouge_scores("the cat sat on the mat", "the cat lay on the mat")
    assert scores == pytest.approx(
        {"rouge1": 500 / 6, "rouge2": 60.0, "rougeL": 500 / 6, "rougeLsum": 500 / 6}
    )
    assert scores["rouge1"] == pytest.approx(83.33, abs=0.01)


def test_rouge_stems_words():
    # prediction: the dog is running    reference: the dog runs
    # Porter stems words over 3 letters: running -> run, runs -> run, so the tokens are
    # [the, dog, is, run] and [the, dog, run].
    # rouge1: 3 shared: P = 3/4, R = 3/3 -> F1 = 2 * 3/4 / (7/4) = 6/7 = 85.71
    #         (unstemmed, "running" != "runs": 2 shared, P = 2/4, R = 2/3 -> F1 = 4/7 = 57.14)
    # rouge2: only "the dog" is shared, of 3 and 2 bigrams: P = 1/3, R = 1/2 -> F1 = (1/3) / (5/6) = 40.00
    # rougeL: LCS "the dog run" = 3 -> 85.71, as rouge1
    scores = rouge_scores("the dog is running", "the dog runs")
    assert scores == pytest.approx(
        {"rouge1": 600 / 7, "rouge2": 40.0, "rougeL": 600 / 7, "rougeLsum": 600 / 7}
    )


def test_rouge_lsum_takes_the_union_of_lcs_over_sentences():
    # reference: one sentence  a b c d e.          prediction: two sentences  d e f g h. a b c i j.
    # rougeL sees one sequence each: [a b c d e] vs [d e f g h a b c i j]; the LCS is "a b c" (3; "d e" must
    #   come after "c" in the reference but comes first in the prediction): P = 3/10, R = 3/5
    #   -> F1 = 2 * 0.3 * 0.6 / 0.9 = 0.4 = 40.00
    # rougeLsum, summary level: for the reference sentence, LCS with "d e f g h" = {d, e}, with "a b c i j" =
    #   {a, b, c}; their union covers all 5 reference tokens: hits 5, P = 5/10, R = 5/5
    #   -> F1 = 2 * 0.5 / 1.5 = 2/3 = 66.67
    # rouge1: 5 shared of 10 and 5 -> 66.67; rouge2: "a b", "b c", "d e" shared of 9 and 4 bigrams:
    #   P = 3/9, R = 3/4 -> F1 = 2 * (1/3)(3/4) / (1/3 + 3/4) = 0.5 / (13/12) = 6/13 = 46.15
    scores = rouge_scores("d e f g h. a b c i j.", "a b c d e.")
    assert scores == pytest.approx(
        {"rouge1": 200 / 3, "rouge2": 600 / 13, "rougeL": 40.0, "rougeLsum": 200 / 3}
    )


def test_rouge_lsum_ignores_sentence_order():
    # reference: the cat sat. the dog ran.    prediction: the dog ran. the cat sat.
    # rougeL: the LCS of [the cat sat the dog ran] and [the dog ran the cat sat] is 3 ("the dog ran"):
    #   P = R = 3/6 -> 50.00
    # rougeLsum: reference sentence 1 is all in prediction sentence 2, and sentence 2 in sentence 1:
    #   hits 3 + 3 = 6 of 6 each side -> 100.00
    # rouge1: every unigram shared -> 100; rouge2: "sat the" / "ran the" differ, 4 of 5 shared -> 80.00
    scores = rouge_scores("the dog ran. the cat sat.", "the cat sat. the dog ran.")
    assert scores == pytest.approx({"rouge1": 100.0, "rouge2": 80.0, "rougeL": 50.0, "rougeLsum": 100.0})


def test_rouge_reads_pegasus_newlines():
    # "<n>" is Pegasus' newline. Read literally, the tokenizer would keep its "n" as a word (rouge1 P = 6/7).
    scores = rouge_scores("the cat sat.<n>the dog ran.", "the cat sat. the dog ran.")
    assert scores == pytest.approx(dict.fromkeys(ROUGE_KEYS, 100.0))
    assert rouge_scores("", "the cat sat.") == dict.fromkeys(ROUGE_KEYS, 0.0)


def test_mean_rouge_is_the_plain_mean():
    mean = mean_rouge(
        ["the cat sat on the mat", "the dog is running"], ["the cat lay on the mat", "the dog runs"]
    )
    # rouge1 (5/6 + 6/7) / 2 = 84.52, rouge2 (60 + 40) / 2 = 50
    assert mean["rouge1"] == pytest.approx((500 / 6 + 600 / 7) / 2)
    assert mean["rouge2"] == pytest.approx(50.0)
    assert list(mean) == list(ROUGE_KEYS)
    assert mean_rouge(["the cat sat"], ["the cat sat"]) == pytest.approx(dict.fromkeys(ROUGE_KEYS, 100.0))
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        mean_rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        mean_rouge([], [])


# -- sentences -------------------------------------------------------------------------------------------
def test_clean_summary_and_sentence_lines():
    assert clean_summary("  One. <n> Two!<n><n>  \nThree ") == "One.\nTwo!\nThree"
    assert (
        sentences_per_line("It rained. We stayed in!\nThe end? Yes.")
        == "It rained.\nWe stayed in!\nThe end?\nYes."
    )
    assert sentences_per_line('He said "go." Then left.') == 'He said "go."\nThen left.'
    assert sentences_per_line("") == ""


def test_lead_k():
    article = "Storms hit the coast. Thousands lost power. Schools closed on Monday."
    assert lead_k(article) == "Storms hit the coast."
    assert lead_k(article, 2) == "Storms hit the coast. Thousands lost power."
    assert lead_k(article, 5) == article
    assert (
        lead_k("Coast storms\nThousands lost power. Schools closed.", 2)
        == "Coast storms Thousands lost power."
    )
    with pytest.raises(ValueError):
        lead_k(article, 0)


# -- reading ---------------------------------------------------------------------------------------------
def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_pairs_from_csv_tsv_and_json_lines(tmp_path):
    csv_file = write(tmp_path, "train.csv", 'text,summary\n"Rain fell, all day.",Rain.\nSun came out.,Sun.\n')
    assert read_pairs(csv_file) == Pairs(
        ["Rain fell, all day.", "Sun came out."], ["Rain.", "Sun."], csv_file
    )
    tsv_file = write(tmp_path, "train.tsv", "summary\ttext\nRain.\tRain fell, all day.\n")
    assert read_pairs(tsv_file).texts == ["Rain fell, all day."]
    lines = [
        {"document": "Rain fell.\nAll day.", "highlights": "Rain.", "id": 1},
        {"document": "Sun.", "highlights": "Sun."},
    ]
    jsonl = write(tmp_path, "train.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    pairs = read_pairs(jsonl, "document", "highlights")
    assert (pairs.texts, pairs.summaries) == (["Rain fell.\nAll day.", "Sun."], ["Rain.", "Sun."])


def test_read_pairs_errors_name_the_file_line_and_fix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_pairs(str(tmp_path / "absent.csv"))
    with pytest.raises(DataError, match="empty"):
        read_pairs(write(tmp_path, "empty.jsonl", "\n"))
    with pytest.raises(DataError, match="a header but no rows"):
        read_pairs(write(tmp_path, "header.csv", "text,summary\n"))
    two = write(tmp_path, "two.csv", "article,summary\nRain fell.,Rain.\n")
    with pytest.raises(
        DataError, match=r"no column\(s\) text \(it has article, summary\); set --text-column"
    ):
        read_pairs(two)
    with pytest.raises(DataError, match=r"no column\(s\) abstract .*; set --summary-column"):
        read_pairs(two, "article", "abstract")
    with pytest.raises(DataError, match="both name 'article'"):
        read_pairs(two, "article", "article")
    holes = write(tmp_path, "holes.csv", "text,summary\nRain fell.,Rain.\nSun came out.,  \n")
    with pytest.raises(
        DataError, match=r"holes\.csv, line 3: column 'summary' is empty .*fill it or drop the row"
    ):
        read_pairs(holes)
    bad = write(tmp_path, "bad.jsonl", '{"text": "Rain.", "summary": "R."}\n\n{"text": 7, "summary": "S."}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: column 'text' is empty or not text \(7\)"):
        read_pairs(bad)


# -- tokenising ------------------------------------------------------------------------------------------
WORDS = "summarize : rain fell all day the sun came out later on".split()


@pytest.fixture(scope="module")
def tokenizer():
    """Words as ids, with T5's habit of appending </s> to every sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


def test_tokenize_pairs_adds_prefix_and_eos_and_truncates(tokenizer):
    texts = ["rain fell", "the sun came out later on"]
    summaries = ["rain", "the sun came out later"]
    ds = tokenize_pairs(
        texts, summaries, tokenizer, prefix="summarize : ", max_source_length=6, max_target_length=4
    )
    assert ds.column_names == ["input_ids", "labels", "length"]
    eos = tokenizer.eos_token_id
    assert ds[0]["input_ids"] == ids(tokenizer, "summarize : rain fell") + [eos]
    assert ds[0]["labels"] == ids(tokenizer, "rain") + [eos]
    # the second source's 9 tokens are cut to 6, its summary's 6 to 4; the eos stays last in both
    assert ds[1]["input_ids"] == ids(tokenizer, "summarize : the sun came") + [eos]
    assert ds[1]["labels"] == ids(tokenizer, "the sun came") + [eos]
    assert ds["length"] == [5, 6]
    assert all(len(x) <= 6 for x in ds["input_ids"]) and all(len(x) <= 4 for x in ds["labels"])


def test_tokenize_pairs_keeps_short_sources_whole(tokenizer):
    ds = tokenize_pairs(
        ["rain fell"], ["rain"], tokenizer, prefix="", max_source_length=64, max_target_length=64
    )
    assert ds[0] == {
        "input_ids": ids(tokenizer, "rain fell") + [1],
        "labels": ids(tokenizer, "rain") + [1],
        "length": 3,
    }


def test_tokenize_pairs_reuses_its_cache(tokenizer, tmp_path, monkeypatch):
    texts, summaries = ["rain fell all day", "the sun came out"], ["rain", "sun"]
    settings = dict(prefix="summarize : ", max_source_length=16, max_target_length=8, cache_dir=tmp_path)
    first = tokenize_pairs(texts, summaries, tokenizer, **settings)
    files = sorted(p.name for p in tmp_path.glob("sum-*.arrow"))
    assert len(files) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(type(tokenizer), "__call__", no_tokenizing)
        again = tokenize_pairs(texts, summaries, tokenizer, **settings)
    assert again.to_dict() == first.to_dict()
    assert again.cache_files[0]["filename"].endswith(files[0])
    tokenize_pairs(texts, summaries, tokenizer, **{**settings, "prefix": ""})  # another key, another file
    assert len(list(tmp_path.glob("sum-*.arrow"))) == 2
