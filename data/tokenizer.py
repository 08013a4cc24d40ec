"""Tokenizers: load one from a folder or hub name, or train a BERT-style WordPiece on the corpus itself.

Training is deterministic: the same texts and settings give a byte-identical tokenizer.json in every
process on every machine, so a fresh clone needs nothing from the hub and two runs of one command share ids.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from recipebox.data.text import DataError

BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PREFIX = "##"  # marks a piece that continues a word


def train_wordpiece(
    texts: Iterable[str], *, vocab_size: int = 8000, lowercase: bool = True, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """A BERT WordPiece tokenizer whose pairs carry token_type_ids (0 for A, 1 for B), as NSP needs.

    The vocabulary is learned the way `tokenizers`' WordPieceTrainer learns it (BPE merges over the words
    that the BERT normalizer and pre-tokenizer give, "##" on pieces inside a word), but here in Python with
    every tie broken by a fixed key, so the same texts and settings give a byte-identical tokenizer.json in
    any process on any machine (for one `tokenizers` version, whose normalizer defines the words); the Rust
    trainer breaks ties between equally frequent pairs in per-process hash order, so its vocabulary changes
    from run to run. Ids: the special tokens in BERT_SPECIAL order, every character sorted, the "##"
    characters sorted, then merged pieces in the order they were learned. Training stops at vocab_size
    pieces (more only if the characters alone need more) or when every word is one piece, so a small corpus
    can give fewer (the toy corpus: 1,035 of 2,000 asked). Counting scales with the corpus, merging with the
    distinct words and vocab_size (timings in the README's Benchmarks section).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = _learn_vocab(_count_words(texts, normalizer, pre_tokenizer), vocab_size, BERT_SPECIAL)

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix=PREFIX))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(BERT_SPECIAL)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


EOT = "<|endoftext|>"  # GPT-2's one special token: bos, eos, unk and (here) pad


def train_byte_bpe(
    texts: Iterable[str], *, vocab_size: int = 4000, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer with <|endoftext|> as its bos, eos, unk and pad token.

    Text is split as GPT-2 splits it (ByteLevel, no prefix space) and any text decodes back exactly. Ids:
    <|endoftext|> is 0, the 256 byte symbols follow in code point order, then merged pieces in the order
    they were learned. Training uses `tokenizers`' BpeTrainer, which is deterministic here: the same texts
    and settings give a byte-identical tokenizer.json in any process (for one `tokenizers` version). Its
    alphabet is sorted, ties between equally frequent pairs go to the smallest (left id, right id), and the
    byte-level alphabet already holds every symbol a word can contain, so no id is handed out in hash order
    (the WordPiece trainer gives its "##" characters ids in hash order, which is why train_wordpiece learns
    its vocabulary in Python). A ~1 MB corpus trains in well under a second.
    """
    tok = _byte_bpe(texts, [EOT], vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
        model_input_names=["input_ids", "attention_mask"],
    )


# Special tokens of the encoder-decoder families, in id order from 0, as their released tokenizers number them;
# with the template that wraps every sequence (source and target alike).
SEQ2SEQ_SPECIAL = {
    "t5": (["<pad>", "</s>", "<unk>"], "$A </s>"),
    "bart": (["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s> $A </s>"),
    "pegasus": (["<pad>", "</s>", "<mask_1>", "<mask_2>", "<unk>"], "$A </s>"),
}


def _byte_bpe(texts: Iterable[str], special: list[str], vocab_size: int):
    """A byte-level BPE (`tokenizers.Tokenizer`) with `special` as ids 0, 1, ...: see train_byte_bpe."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def train_seq2seq_bpe(
    texts: Iterable[str], family: str, *, vocab_size: int = 4000, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """A byte-level BPE for a T5, BART or Pegasus built from scratch, with that family's special tokens at
    the family's ids (T5: pad 0, eos 1, unk 2; BART: bos 0, pad 1, eos 2, unk 3, mask 4; Pegasus: pad 0,
    eos 1, unk 4) and its wrapping of every sequence (T5 and Pegasus append </s>; BART adds <s> ... </s>),
    so labels end in eos and the model's decoder start token is the family's. Deterministic, as
    train_byte_bpe."""
    from tokenizers import processors

    if family not in SEQ2SEQ_SPECIAL:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(SEQ2SEQ_SPECIAL)}")
    special, template = SEQ2SEQ_SPECIAL[family]
    tok = _byte_bpe(texts, special, vocab_size)
    used = [t for t in special if t in template.split()]
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, special.index(t)) for t in used]
    )
    named = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    if family == "bart":
        named.update(bos_token="<s>", mask_token="<mask>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        **named,
    )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """A saved tokenizer (a folder, or a model name in the local Hugging Face cache); one that does not load
    is a DataError naming it."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # no such folder or name, or a half-written tokenizer.json
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
            first = "no such folder"
        raise DataError(
            f"{name_or_path}: cannot load a tokenizer from it ({first}); give a folder holding tokenizer.json "
            f"(and its config), or a model name already in the local Hugging Face cache"
        ) from err
    if "token_type_ids" not in tok.model_input_names:
        # transformers 5 fast tokenizers drop token_type_ids unless asked; sentence pairs need them.
        tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    return tok


def _count_words(texts: Iterable[str], normalizer, pre_tokenizer, chunk_chars: int = 1 << 20) -> Counter:
    """How often each word occurs after the tokenizer's own normalizer and pre-tokenizer.

    Both only ever split at a space, tab, newline or carriage return, and the normalizer acts character by
    character, so the texts are first cut there (in joined chunks of about chunk_chars) and only each
    distinct piece goes through the normalizer and pre-tokenizer: the counts are exactly those of running
    them text by text, at a fraction of the cost on a large corpus, where most pieces repeat.
    """
    pieces: Counter = Counter()
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text) + 1
        if size >= chunk_chars:
            pieces.update(_cut("\n".join(chunk)))
            chunk.clear()
            size = 0
    pieces.update(_cut("\n".join(chunk)))
    pieces.pop("", None)
    words: Counter = Counter()
    for piece, n in pieces.items():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(piece)):
            words[word] += n
    return words


def _cut(text: str) -> list[str]:
    return text.replace("\n", " ").replace("\t", " ").replace("\r", " ").split(" ")


def _learn_vocab(word_counts: Counter, vocab_size: int, special: list[str]) -> dict[str, int]:
    """WordPiece vocabulary by BPE merges with deterministic ties; pair counts are updated incrementally.

    Pieces are numbered as they enter the vocabulary (ids are the final ones), and of the most frequent
    pairs the one with the smallest (left id, right id) is merged, as the Rust trainer does; only its ids
    for "##" characters come from hash order, here they are sorted. Per merge only the distinct words that
    hold the pair are touched, and a lazy max-heap keyed by (-count, left id, right id) picks the next pair:
    an entry whose count has fallen since it was queued goes back with its current count.
    """
    words = sorted(word_counts)
    vocab: dict[str, int] = {}
    for token in special:
        vocab.setdefault(token, len(vocab))
    for token in sorted({ch for w in words for ch in w}):
        vocab.setdefault(token, len(vocab))
    for token in sorted({PREFIX + ch for w in words for ch in w[1:]}):
        vocab.setdefault(token, len(vocab))
    tokens = list(vocab)  # id -> piece, so far without gaps

    freqs = [word_counts[w] for w in words]
    pieces = [[vocab[w[0]]] + [vocab[PREFIX + ch] for ch in w[1:]] for w in words]
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for i, (syms, n) in enumerate(zip(pieces, freqs)):
        for pair in zip(syms, syms[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + n
            where.setdefault(pair, set()).add(i)
    heap = [(-n, a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)

    while heap and len(vocab) < vocab_size:
        neg, a, b = heapq.heappop(heap)
        current = pair_counts.get((a, b), 0)
        if current != -neg:  # stale: the count fell since this entry was queued
            if current > 0:
                heapq.heappush(heap, (-current, a, b))
            continue
        if current < 1:
            break
        right = tokens[b]
        piece = tokens[a] + (right[len(PREFIX) :] if right.startswith(PREFIX) else right)
        new = vocab.setdefault(piece, len(vocab))
        if new == len(tokens):
            tokens.append(piece)
        touched: set[tuple[int, int]] = set()
        for i in where.pop((a, b)):  # any order: sums and the heap key decide alone
            syms, n = pieces[i], freqs[i]
            merged = _merge(syms, a, b, new)
            if len(merged) == len(syms):
                continue  # an earlier merge already used these pieces
            for pair in zip(syms, syms[1:]):
                pair_counts[pair] -= n
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + n
                if new in pair:
                    where.setdefault(pair, set()).add(i)
                    touched.add(pair)
            pieces[i] = merged
        for pair in touched:  # a count only rises when a merge makes the pair; re-queue it at its new count
            heapq.heappush(heap, (-pair_counts[pair], *pair))
    return vocab


def _merge(syms: list[int], a: int, b: int, new: int) -> list[int]:
    """syms with each (a, b) side by side, left to right and without overlap, replaced by new."""
    out: list[int] = []
    i, last = 0, len(syms) - 1
    while i <= last:
        if i < last and syms[i] == a and syms[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(syms[i])
            i += 1
    return out
