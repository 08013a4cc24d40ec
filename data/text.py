"""Plain-text corpora: validate the files, read them through `datasets`, split documents into sentences.

A blank line ends a document (or, with `documents="line"`, every line is a document, as in a file of
paragraphs). Problems are reported before any training, naming the file, the line and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path


class DataError(ValueError):
    """Input data the user must fix; the message names the file and what to do."""


def content_key(*parts: object) -> str:
    """16 hex digits of SHA-256 over the parts as JSON: what names a tokenised table (settings, texts and
    the tokenizer's vocabulary or definition), in the cache folder and for `datasets`."""
    text = json.dumps(list(parts), ensure_ascii=False, sort_keys=True)  # one list: (128, 32) is not (1283, 2)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def map_args(cache_dir: str | Path | None, name: str) -> dict:
    """`Dataset.map` arguments for a table named by its content: with `cache_dir` it is written there once
    and reused by later runs and the other ranks. The name is also the fingerprint, so `datasets` never
    hashes the mapped function and the tokenizer it holds (seconds per split at start-up)."""
    args = {"new_fingerprint": name}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        args.update(cache_file_name=str(Path(cache_dir) / f"{name}.arrow"), load_from_cache_file=True)
    return args


# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) and then whitespace.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def check_text_file(path: str | Path, kind: str = "text file (one sentence or paragraph per line)") -> Path:
    """The file exists, is not empty, and decodes as UTF-8; otherwise a DataError naming the line. `kind`
    says what file the caller reads, for the message of a missing one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass an existing {kind}")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; give a file with text in it")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 (byte {raw[err.start]:#04x}); re-encode the file as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8"
        ) from None
    return path


def read_documents(
    paths: Sequence[str | Path], *, documents: str = "blank_line", cache_dir: str | None = None
) -> list[list[str]]:
    """Documents as lists of sentences, in file order, read with the `datasets` text loader (cached)."""
    import datasets

    if documents not in ("blank_line", "line"):
        raise DataError(f"documents must be 'blank_line' or 'line', got {documents!r}")
    if not paths:
        raise DataError("no text files given; pass one or more with --train-files")
    files = [str(check_text_file(p)) for p in paths]
    docs: list[list[str]] = []
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        for file in files:  # one file at a time: a file's end always ends its last document
            lines = datasets.load_dataset("text", data_files=[file], split="train", cache_dir=cache_dir)[
                "text"
            ]
            docs.extend(_group_documents(lines, documents))
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()
    return docs


def _group_documents(lines, documents: str) -> list[list[str]]:
    docs: list[list[str]] = []
    current: list[str] = []
    for number, line in enumerate(lines):
        line = line.removeprefix("\ufeff") if number == 0 else line  # a byte-order mark (Windows editors)
        if line.strip():
            current.extend(split_sentences(line))
        if current and (documents == "line" or not line.strip()):
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return docs
