"""Causal-LM data: reading corpora, packing blocks, tokenising with a cache, and the byte-level BPE."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from recipebox.data.lm import pack_blocks, read_corpus, tokenize_corpus
from recipebox.data.text import DataError
from recipebox.data.tokenizer import train_byte_bpe

EOS = 0


def write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def make_docs(n: int = 20) -> list[str]:
    return [
        f"Story {i}: the {'quick ' * (i % 5)}brown fox jumps over dog number {i}.\nThe end." for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_bpe(make_docs(), vocab_size=300)


# -- read_corpus ------------------------------------------------------------------------------------------


def test_read_corpus_blank_line_and_line_modes(tmp_path):
    path = write(tmp_path, "a.txt", "one a\none b\n\n\n  \ntwo a\r\n\nthree\n")
    assert read_corpus([path]) == ["one a\none b", "two a", "three"]
    assert read_corpus([path], documents="line") == ["one a", "one b", "two a", "three"]
    odd = write(tmp_path, "odd.txt", "page\x0cbreak\u2028same line\rold mac\n")
    assert read_corpus([odd]) == ["page\x0cbreak\u2028same line\nold mac"]
    other = write(tmp_path, "b.txt", "four")
    assert read_corpus([other, path]) == ["four", "one a\none b", "two a", "three"]  # file order
    with pytest.raises(DataError, match="documents must be"):
        read_corpus([path], documents="paragraph")


def test_a_byte_order_mark_is_not_part_of_the_first_document(tmp_path):
    from recipebox.data.text import read_documents

    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello there.\n\nsecond one.\n".encode())
    assert read_corpus([str(path)]) == ["hello there.", "second one."]
    assert read_documents([path]) == [["hello there."], ["second one."]]


def test_read_corpus_json_lines(tmp_path):
    rows = [{"text": "first\n\ndoc", "id": 1}, {"text": "  "}, {"body": "x", "text": "second"}]
    path = write(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_corpus([path]) == ["first\n\ndoc", "second"]  # the empty document is skipped
    path = write(tmp_path, "d.jsonl", json.dumps({"body": "third"}))
    assert read_corpus([path], text_key="body") == ["third"]


def test_read_corpus_from_a_datasets_folder(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder, "train.jsonl", '{"text": "alpha"}\n{"text": ""}\n{"text": "beta"}\n')
    assert read_corpus([str(folder)]) == ["alpha", "beta"]
    with pytest.raises(DataError, match="no column 'body'.*--text-key"):
        read_corpus([str(folder)], text_key="body")
    with pytest.raises(DataError, match="not an existing file and not a loadable"):
        read_corpus([str(tmp_path / "no_such_dataset")])
    with pytest.raises(DataError, match=r"^org/corpus-v1\.2: not an existing file and not a loadable"):
        read_corpus(["org/corpus-v1.2"])  # a dotted name is still a `datasets` name, not a missing file


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.txt", None, r"missing\.txt: no such file"),
        ("empty.txt", "\n  \n", r"empty\.txt: the file is empty"),
        ("latin.txt", "ok\ncaf\xe9\n".encode("latin-1"), r"latin\.txt, line 2: not UTF-8.*iconv"),
        ("latin.jsonl", b'{"text": "caf\xe9"}', r"latin\.jsonl, line 1: not UTF-8"),
        ("bad.jsonl", '{"text": "a"}\n\n{"text": b}\n', r"bad\.jsonl, line 3: not valid JSON"),
        ("list.jsonl", '["a"]\n', r"list\.jsonl, line 1: expected a JSON object"),
        (
            "nokey.jsonl",
            '{"text": "a"}\n{"body": "b"}\n',
            r"nokey\.jsonl, line 2: no 'text' field.*--text-key",
        ),
        ("number.jsonl", '{"text": 5}\n', r"number\.jsonl, line 1: field 'text' is int, not text"),
        ("blank.jsonl", '{"text": ""}\n', r"blank\.jsonl: no documents"),
    ],
)
def test_read_corpus_bad_input_names_the_file(tmp_path, name, content, match):
    path = tmp_path / name if content is None else write(tmp_path, name, content)
    with pytest.raises(DataError, match=match):
        read_corpus([str(path)])


# -- pack_blocks ------------------------------------------------------------------------------------------


def stream(token_docs):
    return [t for ids in token_docs for t in [*ids, EOS]]


@pytest.mark.parametrize(
    "token_docs, block_size",
    [
        ([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4),
        ([list(range(1, 24))], 5),  # one document longer than several blocks
        ([[7]] * 50 + [[]] * 3, 8),  # many tiny documents, some empty
        ([[1, 2, 3]], 4),  # exactly one block: nothing dropped
    ],
)
def test_pack_blocks_keeps_every_token_but_the_remainder(token_docs, block_size):
    blocks, dropped = pack_blocks(token_docs, block_size, EOS)
    full = stream(token_docs)
    assert all(len(b) == block_size for b in blocks)
    assert dropped == len(full) % block_size and 0 <= dropped < block_size
    assert [t for b in blocks for t in b] + full[len(full) - dropped :] == full
    assert full.count(EOS) == len(token_docs)  # exactly one eos after each document


def test_pack_blocks_puts_eos_between_documents():
    blocks, dropped = pack_blocks([[1, 2], [3], [4, 5, 6]], 3, EOS)
    assert blocks == [[1, 2, EOS], [3, EOS, 4], [5, 6, EOS]] and dropped == 0
    assert pack_blocks([[1, 2], [3]], 10, EOS) == ([], 5)


# -- tokenize_corpus --------------------------------------------------------------------------------------


def test_tokenize_corpus_blocks(tokenizer):
    docs = make_docs()
    ds, info = tokenize_corpus(docs, tokenizer, 16, source="toy")
    token_docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    blocks, dropped = pack_blocks(token_docs, 16, tokenizer.eos_token_id)
    assert ds.column_names == ["input_ids", "labels"]
    assert ds["input_ids"] == blocks and ds["labels"] == blocks  # labels are not shifted
    assert info == {
        "documents": len(docs),
        "tokens": sum(len(t) + 1 for t in token_docs),
        "blocks": len(blocks),
        "dropped": dropped,
    }
    assert info["tokens"] == info["blocks"] * 16 + info["dropped"]


def test_tokenize_corpus_without_packing_keeps_every_token(tokenizer):
    docs = make_docs(6) + ["word " * 40]  # the last one is longer than a block
    ds, info = tokenize_corpus(docs, tokenizer, 16, packing="none")
    token_docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert ds.column_names == ["input_ids", "labels", "length"]
    assert ds["labels"] == ds["input_ids"] and ds["length"] == [len(r) for r in ds["input_ids"]]
    assert max(ds["length"]) == 16 and len(ds) > len(docs)
    eos = tokenizer.eos_token_id
    assert [t for r in ds["input_ids"] for t in r] == [t for ids in token_docs for t in [*ids, eos]]
    assert info == {
        "documents": 7,
        "tokens": sum(len(t) + 1 for t in token_docs),
        "blocks": len(ds),
        "dropped": 0,
    }


def test_tokenize_corpus_cache_is_reused(tokenizer, tmp_path):
    docs = make_docs()
    first, info = tokenize_corpus(docs, tokenizer, 16, cache_dir=tmp_path)
    files = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert len(files) == 2  # the tokens and the blocks
    again, info_again = tokenize_corpus(docs, tokenizer, 16, cache_dir=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == files
    assert again.cache_files[0]["filename"] == first.cache_files[0]["filename"]
    assert again["input_ids"] == first["input_ids"] and info_again == info
    tokenize_corpus(docs, tokenizer, 8, cache_dir=tmp_path)  # other settings: the tokens are shared
    assert len(list(tmp_path.iterdir())) == 3
    tokenize_corpus(docs[:-1], tokenizer, 16, cache_dir=tmp_path)  # other documents: new files
    assert len(list(tmp_path.iterdir())) == 5


def test_tokenize_corpus_too_short_for_one_block(tokenizer):
    with pytest.raises(DataError, match=r"toy.txt: \d+ tokens, fewer than one block of 4096.*--block-size"):
        tokenize_corpus(["a short text"], tokenizer, 4096, source="toy.txt")
    ds, info = tokenize_corpus(["a short text"], tokenizer, 4096, packing="none")
    assert len(ds) == 1 and info["dropped"] == 0


# -- train_byte_bpe ---------------------------------------------------------------------------------------

ROUND_TRIP = "Héllo wörld — naïve café 中文 😀\n\n  two  spaces\tand a tab\r\nlast line <|endoftext|> ok\n"


def test_byte_bpe_round_trips_and_sets_its_special_token(tokenizer):
    ids = tokenizer(ROUND_TRIP, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == ROUND_TRIP
    assert tokenizer(ROUND_TRIP)["input_ids"] == ids  # no special tokens are ever added
    assert tokenizer.unk_token_id not in tokenizer("ünseen ☃ text", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert len(tokenizer) == 300 and tokenizer.model_max_length == 1024
    assert "Ġfox" in tokenizer.get_vocab()  # a frequent word with its leading space is one piece


TRAIN_AND_SAVE = """
import sys
from recipebox.data.tokenizer import train_byte_bpe
lines = [line for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
train_byte_bpe(lines, vocab_size=1000).save_pretrained(sys.argv[2])
"""


def test_byte_bpe_is_byte_identical_across_processes(tmp_path):
    # Other hash seeds and thread counts per process: neither may change an id.
    corpus = write(tmp_path, "corpus.txt", "\n".join(make_docs(200)) + "\n" + ROUND_TRIP * 20)
    saved = []
    for run, (seed, threads) in enumerate([("1", "1"), ("2", "2")]):
        out = tmp_path / f"run{run}"
        env = subprocess_env(PYTHONHASHSEED=seed, RAYON_NUM_THREADS=threads, PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, "-c", TRAIN_AND_SAVE, corpus, str(out)],
            capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        saved.append((out / "tokenizer.json").read_bytes())
    assert saved[0] == saved[1]
