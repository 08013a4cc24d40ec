"""The NSP+MLM builder: reading and validating text, pairs, tokenisation; and the stateful sampler."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import REPO, subprocess_env

from recipebox.data.nsp import IS_NEXT, NOT_NEXT, build_nsp_pairs, split_documents, tokenize_pairs
from recipebox.data.sampler import ShardedSampler
from recipebox.data.text import DataError, read_documents, split_sentences
from recipebox.data.tokenizer import _count_words, train_wordpiece

TOPICS = ["bees", "ships", "bread", "trains", "stars", "clocks"]


def make_documents(n_docs: int = 12, n_sent: int = 5) -> list[list[str]]:
    return [
        [f"Sentence {i} of the {TOPICS[d % len(TOPICS)]} story number {d} goes here." for i in range(n_sent)]
        for d in range(n_docs)
    ]


def write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_split_sentences():
    assert split_sentences("One here. Two there! Three? Four") == [
        "One here.",
        "Two there!",
        "Three?",
        "Four",
    ]
    assert split_sentences('He said "stop." Then left.') == ['He said "stop."', "Then left."]


def test_read_documents_blank_line_and_line_modes(tmp_path):
    path = write(tmp_path, "c.txt", "A one. A two.\nA three.\n\n\nB one.\nB two.\n")
    assert read_documents([path]) == [["A one.", "A two.", "A three."], ["B one.", "B two."]]
    assert read_documents([path], documents="line") == [
        ["A one.", "A two."],
        ["A three."],
        ["B one."],
        ["B two."],
    ]


def test_each_file_ends_its_documents(tmp_path):
    a = write(tmp_path, "a.txt", "A one.\nA two.")
    b = write(tmp_path, "b.txt", "B one.\nB two.\n")
    assert read_documents([a, b]) == [["A one.", "A two."], ["B one.", "B two."]]


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"  \n\n", "empty"),
        (b"fine line.\nbad \xe9 byte.\n", "line 2: not UTF-8"),
    ],
)
def test_bad_files_are_named(tmp_path, content, expected):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as err:
        read_documents([path])
    assert str(path) in str(err.value)


def test_corpus_without_pairs_is_rejected():
    with pytest.raises(DataError, match="no document has two or more sentences"):
        build_nsp_pairs([["Only one."], ["Another one."]], seed=0)
    with pytest.raises(DataError, match="only one document.*--documents line"):
        build_nsp_pairs([["One.", "Two.", "Three."]], seed=0)


def test_pairs_are_balanced_and_random_b_is_never_the_true_next():
    docs = make_documents()
    pairs = build_nsp_pairs(docs, seed=3)
    slots = [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - 1)]
    labels = pairs["next_sentence_label"]
    assert len(labels) == len(slots)
    assert abs(labels.count(IS_NEXT) - labels.count(NOT_NEXT)) <= 1
    owner = {s: d for d, doc in enumerate(docs) for s in doc}
    for (d, i), a, b, label in zip(slots, pairs["a"], pairs["b"], labels):
        assert a == docs[d][i]
        if label == IS_NEXT:
            assert b == docs[d][i + 1]
        else:
            assert b != docs[d][i + 1]
            assert owner[b] != d  # from another document


def test_both_gives_each_sentence_a_true_and_a_random_partner():
    pairs = build_nsp_pairs(make_documents(), seed=0, both=True)
    assert pairs["next_sentence_label"][:4] == [IS_NEXT, NOT_NEXT, IS_NEXT, NOT_NEXT]
    assert pairs["a"][0] == pairs["a"][1] and pairs["b"][0] != pairs["b"][1]


def test_pairs_are_deterministic_per_seed():
    docs = make_documents()
    assert build_nsp_pairs(docs, seed=1) == build_nsp_pairs(docs, seed=1)
    assert build_nsp_pairs(docs, seed=1) != build_nsp_pairs(docs, seed=2)


def test_split_documents_holds_out_whole_documents():
    docs = make_documents(20)
    train, held = split_documents(docs, 0.2, seed=0)
    assert len(held) == 4 and len(train) == 16
    assert not {tuple(d) for d in train} & {tuple(d) for d in held}
    assert split_documents(docs, 0.2, seed=0) == (train, held)
    assert split_documents(docs, 0.0, seed=0) == (docs, [])


@pytest.fixture(scope="module")
def tokenizer():
    texts = [s for doc in make_documents() for s in doc]
    return train_wordpiece(texts, vocab_size=200)


def test_tokenised_pairs_have_segments_and_are_truncated_longest_first(tokenizer, tmp_path):
    long_a = "bees " * 60 + "end."
    pairs = {"a": [long_a, "Short one."], "b": ["Short b.", "Tiny."], "next_sentence_label": [0, 1]}
    ds = tokenize_pairs(pairs, tokenizer, max_length=24, cache_dir=tmp_path)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for row in ds:
        ids, types = row["input_ids"], row["token_type_ids"]
        assert len(ids) <= 24 and row["length"] == len(ids)
        first_sep = ids.index(sep)
        assert ids[0] == cls and ids[-1] == sep
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    truncated = ds[0]["input_ids"]
    b_part = truncated[truncated.index(sep) + 1 : -1]
    assert len(truncated) == 24 and b_part == tokenizer("Short b.", add_special_tokens=False)["input_ids"]
    assert ds[1]["next_sentence_label"] == 1


def test_tokenised_pairs_are_cached(tokenizer, tmp_path):
    pairs = build_nsp_pairs(make_documents(), seed=0)
    tokenize_pairs(pairs, tokenizer, 32, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    again = tokenize_pairs(pairs, tokenizer, 32, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == files and len(files) == 1
    assert again.cache_files and again.cache_files[0]["filename"].endswith(files[0])


TOY_CORPUS = REPO / "data" / "toy" / "mlm_nsp" / "corpus.txt"
TRAIN_AND_SAVE = """
import sys
from recipebox.data.tokenizer import train_wordpiece
lines = [line.strip() for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
train_wordpiece(lines, vocab_size=2000).save_pretrained(sys.argv[2])
"""


def test_wordpiece_is_byte_identical_across_processes(tmp_path):
    # Other hash seeds and thread counts per process: the Rust trainer's ties differed run to run.
    saved = []
    for run, (seed, threads) in enumerate([("1", "1"), ("2", "2")]):
        out = tmp_path / f"run{run}"
        env = subprocess_env(PYTHONHASHSEED=seed, RAYON_NUM_THREADS=threads, PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, "-c", TRAIN_AND_SAVE, str(TOY_CORPUS), str(out)],
            capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        saved.append((out / "tokenizer.json").read_bytes())
    assert saved[0] == saved[1]


def test_wordpiece_vocabulary_is_sensible_and_independent_of_text_order():
    lines = [line.strip() for line in TOY_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, held_out = [t for i, t in enumerate(lines) if i % 10], lines[::10]
    tok = train_wordpiece(train, vocab_size=2000)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]] == [0, 1, 2, 3, 4]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert train_wordpiece(train[::-1], vocab_size=2000).get_vocab() == vocab

    words = Counter(w.lower().strip(".,!?") for t in train for w in t.split())
    assert all(w in vocab for w, _ in words.most_common(100))  # frequent words are one piece each
    assert 500 < len(vocab) < 2000  # the toy corpus runs out of merges before 2,000: every word is whole
    assert all(w in vocab for w in words)
    ids = [i for t in held_out for i in tok(t, add_special_tokens=False)["input_ids"]]
    assert ids.count(tok.unk_token_id) / len(ids) < 0.01

    small = train_wordpiece(train, vocab_size=300)
    assert len(small.get_vocab()) == 300
    assert set(small.get_vocab()) <= set(vocab)  # the same merges, fewer of them
    pieces = small.tokenize("Elif trimmed the spare logbook.")
    assert "[UNK]" not in pieces
    assert small.convert_tokens_to_string(pieces) == "elif trimmed the spare logbook."


def test_wordpiece_counts_words_exactly_as_its_normalizer_and_pre_tokenizer_split_them():
    from tokenizers import normalizers, pre_tokenizers

    texts = [
        "Héllo\u00a0wörld, naïve café!", "ab\x1fcd ef\x0bgh\x85ij", "中文字符 and 日本語", "e\u0301 \u0301a",
        "tab\there\r\nnew  double   spaces", "", "   ", "İstanbul ǅ ﬁne", "a\x00b\ufffdc", "$5 — “quotes” ¿qué?",
    ] * 3  # fmt: skip
    for lowercase in (True, False):
        norm, pre = normalizers.BertNormalizer(lowercase=lowercase), pre_tokenizers.BertPreTokenizer()
        one_by_one = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
        assert _count_words(texts, norm, pre) == one_by_one
        assert _count_words(texts, norm, pre, chunk_chars=20) == one_by_one


# -- sampler ----------------------------------------------------------------------------------------------


def test_each_side_of_the_split_has_a_true_next_sentence_and_labels_are_true():
    """Held-out documents were drawn at random, so with few multi-sentence documents a seed could leave the
    eval side without a true next sentence (a DataError before training); under 4 documents nothing is held
    out. A random partner that cannot differ from the true next sentence makes the pair IS_NEXT."""
    docs = [[f"Single {i}."] for i in range(8)] + [["Pair one.", "Pair two."], ["Other one.", "Other two."]]
    for seed in range(100):
        train, held = split_documents(docs, 0.2, seed)
        assert any(len(d) >= 2 for d in train) and any(len(d) >= 2 for d in held), seed
    assert [len(side) for side in split_documents(docs[:3], 0.2, 0)] == [3, 0]
    pairs = build_nsp_pairs([["A.", "Same."], ["Same."], ["Same."]], seed=0, copies=8)
    assert set(zip(pairs["b"], pairs["next_sentence_label"])) == {("Same.", IS_NEXT)}


def test_sampler_shards_are_disjoint_equal_and_cover():
    orders = [list(ShardedSampler(103, rank=r, world_size=4, batch_size=5, seed=1)) for r in range(4)]
    assert {len(o) for o in orders} == {25}
    flat = [i for o in orders for i in o]
    assert len(set(flat)) == 100 and set(flat) <= set(range(103))


def test_sampler_is_deterministic_and_changes_per_epoch():
    s = ShardedSampler(50, batch_size=4, seed=7)
    first = list(s)
    assert first == list(ShardedSampler(50, batch_size=4, seed=7))
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == sorted(first)


def test_sampler_resumes_mid_epoch_without_iterating_the_skipped_part():
    s = ShardedSampler(1000, rank=1, world_size=2, batch_size=8, seed=0)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=136)
    assert list(s) == full[136:] and len(s) == len(full) - 136


def test_the_same_global_batch_on_other_ranks_sees_the_same_samples_next():
    """A checkpoint resumed on another number of ranks with the same global batch (2 x 4 = 4 x 2 = 8):
    the rest of the epoch holds the same samples, length-grouped too (103 samples: the remainder each
    world size drops comes off the end of one order, not before grouping)."""
    lengths = torch.randint(5, 128, (103,), generator=torch.Generator().manual_seed(2)).tolist()

    def rest(world, steps, grouped):
        samplers = [ShardedSampler(103, rank=r, world_size=world, batch_size=8 // world, seed=3, lengths=grouped)
                    for r in range(world)]  # fmt: skip
        for s in samplers:
            s.set_epoch(0, start=steps * 8 // world)  # what a checkpoint after `steps` steps restores
        return {i for s in samplers for i in s}

    for grouped in (None, lengths):
        for steps in (1, 5, 11):
            two, four = rest(2, steps, grouped), rest(4, steps, grouped)
            assert four <= two and len(two - four) == 2, (
                grouped is not None,
                steps,
            )  # 2 ranks drop 1, 4 drop 3


def test_length_grouping_cuts_padding_and_keeps_ranks_in_step():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 128, (4096,), generator=gen).tolist()

    def padding(sampler, batch):
        order = list(sampler)
        return sum(
            max(lengths[i] for i in order[k : k + batch]) * len(order[k : k + batch])
            - sum(lengths[i] for i in order[k : k + batch])
            for k in range(0, len(order), batch)
        )

    plain = ShardedSampler(4096, batch_size=16, seed=0)
    grouped = ShardedSampler(4096, batch_size=16, seed=0, lengths=lengths)
    assert padding(grouped, 16) < padding(plain, 16) / 5
    assert sorted(grouped) == sorted(plain)
    # Two ranks: the k-th batch of each rank comes from the same global batch, so lengths are alike.
    ranks = [
        list(ShardedSampler(4096, rank=r, world_size=2, batch_size=16, seed=0, lengths=lengths))
        for r in (0, 1)
    ]
    for k in range(0, 2048, 16):
        a = [lengths[i] for i in ranks[0][k : k + 16]]
        b = [lengths[i] for i in ranks[1][k : k + 16]]
        assert abs(max(a) - max(b)) <= 16
