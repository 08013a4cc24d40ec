"""Tokenizers: load one from a folder or hub name, or train a BERT-style WordPiece on the corpus itself.

Training takes well under a second on a small corpus, so a fresh clone needs nothing from the hub.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(
    texts: Iterable[str], *, vocab_size: int = 8000, lowercase: bool = True, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """A BERT WordPiece tokenizer whose pairs carry token_type_ids (0 for A, 1 for B), as NSP needs.

    The trainer breaks ties between equally frequent pieces in hash order, so two trainings on the same text
    can number pieces differently: recipes save the tokenizer with the run and reuse it from there.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL)
    )
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


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if "token_type_ids" not in tok.model_input_names:
        # transformers 5 fast tokenizers drop token_type_ids unless asked; sentence pairs need them.
        tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    return tok
