"""Causal language-model data: read a corpus as documents, tokenise it once, pack it into blocks.

Documents come from plain-text files (a blank line ends a document, or one document per line), JSON lines
(the text in one field) or a `datasets` name. Packing follows GPT-2: every document is followed by the
end-of-text token and the stream is cut into blocks of exactly block_size, so only the final remainder
is lost. Labels equal input_ids: the model shifts them itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from recipebox.data.text import DataError, check_text_file, content_key, map_args

DOCUMENTS = ("blank_line", "line")
PACKING = ("blocks", "none")
# A missing path with one of these suffixes is a missing text file; any other is a `datasets` name.
TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens", ".md")

if TYPE_CHECKING:
    import datasets


def read_corpus(
    paths: list[str],
    *,
    documents: str = "blank_line",
    text_key: str = "text",
    split: str = "train",
    dataset_config: str = "",
) -> list[str]:
    """Documents as strings, in file order, from text files, JSON lines (.jsonl/.json) or `datasets` names.

    A plain-text document's lines are joined with "\\n" as they are. A path that is not an existing file
    and has no text suffix (TEXT_SUFFIXES) is a `datasets` name (hub or local folder, dots allowed:
    `org/corpus-v1.2`), read with `split` and `dataset_config`.
    Empty documents (an empty text field, an empty row) are skipped; a source with none left is an error.
    """
    if documents not in DOCUMENTS:
        raise DataError(f"documents must be 'blank_line' or 'line', got {documents!r}")
    if not paths:
        raise DataError("no corpus given; pass one or more text or .jsonl files, or a `datasets` name")
    docs: list[str] = []
    for path in paths:
        p = Path(path)
        if p.suffix.lower() in (".jsonl", ".json"):
            docs.extend(
                _read_json_lines(check_text_file(p, f".jsonl file with a {text_key!r} key"), text_key)
            )
        elif p.is_file() or p.suffix.lower() in TEXT_SUFFIXES:
            docs.extend(_read_text(check_text_file(p), documents))
        else:
            docs.extend(_read_dataset(str(path), dataset_config, split, text_key))
    return docs


def _lines(path: Path) -> list[str]:
    # Universal newlines, but not str.splitlines: a form feed or U+2028 inside a line is text, not a break.
    return path.read_text(encoding="utf-8-sig").split("\n")


def _read_text(path: Path, documents: str) -> list[str]:
    docs: list[str] = []
    current: list[str] = []
    for line in _lines(path):
        if line.strip():
            current.append(line)
        if current and (documents == "line" or not line.strip()):
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _read_json_lines(path: Path, text_key: str) -> list[str]:
    from recipebox.data.classification import (
        _read_json_lines as read_rows,  # one JSON object per line, checked
    )

    docs: list[str] = []
    table = read_rows(path)
    for row, where in zip(table.rows, table.where):
        if text_key not in row:
            raise DataError(
                f"{where}: no {text_key!r} field (it has {', '.join(row) or 'none'}); "
                f"set --text-key to the field that holds the text"
            )
        text = row[text_key]
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field {text_key!r} is {type(text).__name__}, not text; "
                f"make it a string or set --text-key to the field that holds the text"
            )
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"{path}: no documents (every {text_key!r} is empty); give a file with text in it")
    return docs


def _read_dataset(name: str, config: str, split: str, text_key: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # the hub, a missing split or a missing folder: all the user's to fix
        raise DataError(
            f"{name}: not an existing file and not a loadable `datasets` name or split {split!r} ({err})"
        ) from None
    source = f"{name}[{split}]"
    if text_key not in ds.column_names:
        raise DataError(
            f"{source}: no column {text_key!r} (it has {', '.join(ds.column_names)}); "
            f"set --text-key to the column that holds the text"
        )
    docs: list[str] = []
    for i, text in enumerate(ds[text_key]):
        if not isinstance(text, str):
            raise DataError(f"{source} row {i}: column {text_key!r} is {type(text).__name__}, not text")
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"{source}: no documents (every {text_key!r} is empty)")
    return docs


def pack_blocks(token_docs: list[list[int]], block_size: int, eos_id: int) -> tuple[list[list[int]], int]:
    """(blocks, dropped): the documents' tokens, eos after each, cut into blocks of exactly block_size.

    dropped is the length of the final remainder, shorter than a block; no other token is lost.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    stream: list[int] = []
    for ids in token_docs:
        stream.extend(ids)
        stream.append(eos_id)
    full = len(stream) - len(stream) % block_size
    return [stream[i : i + block_size] for i in range(0, full, block_size)], len(stream) - full


def cut_documents(token_docs: list[list[int]], block_size: int, eos_id: int) -> list[list[int]]:
    """Each document's tokens plus eos, cut into pieces of at most block_size; nothing is dropped."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    rows: list[list[int]] = []
    for ids in token_docs:
        ids = [*ids, eos_id]
        rows.extend(ids[i : i + block_size] for i in range(0, len(ids), block_size))
    return rows


def tokenize_corpus(
    docs: list[str],
    tokenizer,
    block_size: int,
    *,
    packing: str = "blocks",
    cache_dir: str | Path | None = None,
    source: str = "",
) -> tuple[datasets.Dataset, dict]:
    """(dataset, info): the documents tokenised once and packed for a causal LM; cached when asked.

    packing="blocks": rows of exactly block_size (`pack_blocks`), columns input_ids and labels.
    packing="none": one row per document (a document longer than block_size gives several), columns
    input_ids, labels and length; the collator pads, with -100 in the labels. labels == input_ids (the model
    shifts them). info: documents, tokens (eos included), blocks (rows) and dropped (tokens lost).
    The cache files are keyed by a hash of the documents, the settings and the tokenizer.
    """
    import datasets

    if packing not in PACKING:
        raise ValueError(f"packing must be one of {', '.join(PACKING)}; got {packing!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    source = source or "the corpus"
    if not docs:
        raise DataError(f"{source}: no documents; give text to train on")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"{tokenizer.name_or_path}: the tokenizer has no eos token; a causal LM needs one")

    tokens_key = content_key(docs, _tokenizer_key(tokenizer))
    packed_key = content_key(tokens_key, block_size, packing, eos_id)

    def tokenize(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {"ids": enc["input_ids"], "n": [len(ids) + 1 for ids in enc["input_ids"]]}  # + 1: eos

    def pack(batch):
        if packing == "blocks":
            blocks, _ = pack_blocks(batch["ids"], block_size, eos_id)
            return {"input_ids": blocks, "labels": blocks}
        rows = cut_documents(batch["ids"], block_size, eos_id)
        return {"input_ids": rows, "labels": rows, "length": [len(r) for r in rows]}

    tokenized = datasets.Dataset.from_dict({"text": docs}).map(
        tokenize,
        batched=True,
        remove_columns=["text"],
        **map_args(cache_dir, f"lm-tokens-{tokens_key}"),
        desc="tokenise documents",
    )
    total = sum(tokenized["n"])
    if packing == "blocks" and total < block_size:
        raise DataError(
            f"{source}: {total} tokens, fewer than one block of {block_size}; lower --block-size or add text"
        )
    packed = tokenized.map(
        pack,
        batched=True,
        batch_size=None,  # one batch: blocks run across document boundaries
        remove_columns=tokenized.column_names,
        **map_args(cache_dir, f"lm-{packing}-{block_size}-{packed_key}"),
        desc="pack into blocks" if packing == "blocks" else "split long documents",
    )
    dropped = total - len(packed) * block_size if packing == "blocks" else 0
    info = {"documents": len(docs), "tokens": total, "blocks": len(packed), "dropped": dropped}
    return packed, info


def _tokenizer_key(tokenizer) -> str:
    """What decides the ids: for a fast tokenizer its whole definition (a BPE's merges too), less the
    padding and truncation state that calls change; otherwise the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(tokenizer.get_vocab(), sort_keys=True)
    spec = json.loads(backend.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    return json.dumps(spec, sort_keys=True)
