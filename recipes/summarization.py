r"""Train or fine-tune a T5, BART or Pegasus to summarise documents; score it with ROUGE; compare models.

Features: CSV/TSV/JSON lines with --text-column and --summary-column, or a `datasets` name; any
`AutoModelForSeq2SeqLM` (--model), or a small T5, BART or Pegasus built from the size flags (--family) with a
byte-level BPE trained on the training texts under that family's special-token ids (pad, eos, bos, the
decoder start); T5's "summarize: " prefix by default; labels padded with -100 and the decoder inputs made
from them by the model; the loss is the mean over every summary token of the step, across micro-batches
and ranks. Evaluation generates (beams, --max-new-tokens, length penalty, no-repeat n-gram size; each
defaults to the model's generation config) on every rank in lockstep and scores ROUGE-1/2/L/Lsum with
`rouge-score` (stemming; sentences split by data.text; the mean of per-example F1 x100, summed exactly over
ranks) and the generated length; each evaluation writes RUN/predictions/<split>.jsonl and a W&B table of
samples. Under --backend xla evaluation is loss-only (generation needs dynamic shapes): generate from the
export. The export loads in AutoModelForSeq2SeqLM with its generation config and prefix; `predict`
summarises, `compare` scores several exports side by side.

Launch:
    python recipes/summarization.py                                        # toy set, small T5, 1 process
    torchrun --nproc_per_node=2 recipes/summarization.py --family bart     # a small BART, 2 ranks
    torchrun --nproc_per_node=8 recipes/summarization.py --model t5-base --train-file news_summary.csv \
        --validation-file "" --test-file "" --text-column ctext --summary-column text
    torchrun --nproc_per_node=8 recipes/summarization.py --model facebook/bart-large-cnn \
        --backend deepspeed --zero-stage 3 ...
    python recipes/summarization.py predict runs/summarization/export --file article.txt
    python recipes/summarization.py compare runs/t5/export runs/bart/export --test-file test.jsonl
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from recipebox.checkpoints.export import check_export, saved_inputs
from recipebox.data.summarization import (
    ROUGE_KEYS,
    clean_summary,
    lead_k,
    mean_rouge,
    read_pairs,
    rouge_scores,
    tokenize_pairs,
)
from recipebox.data.tokenizer import SEQ2SEQ_SPECIAL, train_seq2seq_bpe
from recipebox.kernels.collate import collate_padded
from recipebox.launch.backends import backend_class
from recipebox.launch.config import (
    ConfigError,
    TrainConfig,
    check_choice,
    number,
    parse_config,
    validate_train_config,
)
from recipebox.launch.flops import train_flops_per_token
from recipebox.launch.recipe import TRAINED_HERE, check_model_fits, run_main, run_recipe, saved_processor
from recipebox.launch.runtime import Runtime
from recipebox.launch.task import (
    head_on_rows,
    label_targets,
    model_inputs,
    padding_mask,
    text_prepare,
    text_sizes,
    token_loss_sum,
)

TOY = Path(__file__).resolve().parent.parent / "data" / "toy" / "summarization"
GENERATION = ("num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size")


@dataclass
class SummarizationConfig(TrainConfig):
    train_file: str = str(TOY / "train.jsonl")  # .csv/.tsv/.jsonl, or a `datasets` name
    validation_file: str = str(TOY / "validation.jsonl")  # empty: no validation
    test_file: str = str(TOY / "test.jsonl")  # empty: none; evaluated once after training as test/<metric>
    text_column: str = "text"  # the column (or field) holding the text to summarise
    summary_column: str = "summary"  # the column (or field) holding the reference summary
    dataset_config: str = ""  # the `datasets` configuration name, when the files are a `datasets` name
    train_split: str = "train"  # a `datasets` name: the split to train on
    validation_split: str = "validation"  # a `datasets` name: the split to validate on
    test_split: str = "test"  # a `datasets` name: the split to test on
    model: str = ""  # folder or hub name of a seq2seq LM; empty: a --family model built from the sizes below
    family: str = "t5"  # t5 | bart | pegasus: the architecture and tokenizer conventions built from scratch
    source_prefix: str | None = None  # prepended to every text; default: "summarize: " for T5, else none
    trust_remote_code: bool = False  # let a hub repository run its own model code
    vocab_size: int = 2000  # tokenizer pieces to train when there is no tokenizer (model from scratch)
    d_model: int = 128  # model built from scratch: width
    layers: int = 2  # encoder layers, and as many decoder layers
    heads: int = 4  # model built from scratch: attention heads
    ffn: int = 256  # model built from scratch: feed-forward width
    dropout: float = 0.0  # from scratch on the toy set: 0.1 costs about 12 ROUGE-L at the same steps
    max_source_length: int = 256  # tokens of prefix + text; longer texts are cut
    max_target_length: int = 64  # tokens of a reference summary; longer ones are cut
    num_beams: int | None = None  # generation settings: default the model's (from scratch: 2 beams)
    max_new_tokens: int | None = None  # default: the model's, else --max-target-length
    length_penalty: float | None = None  # beam search: > 1 favours longer summaries; default: the model's
    no_repeat_ngram_size: int | None = None  # no n-gram of this size twice in an output; default: the model's
    samples: int = 4  # evaluation summaries shown in metrics.jsonl and the W&B table
    epochs: float = 8.0
    batch_size: int = 16
    lr: float = 1e-3  # AdamW's peak learning rate (from scratch on the toy set; BART stalls at 2e-3)
    warmup_ratio: float = 0.05


def _validate(cfg: SummarizationConfig) -> None:
    validate_train_config(cfg)
    check_choice(cfg, "family", tuple(SEQ2SEQ_SPECIAL))
    for name in ("max_source_length", "max_target_length"):
        if getattr(cfg, name) < 4:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 4, got {getattr(cfg, name)}")
    if not cfg.model and cfg.d_model % cfg.heads:
        raise ConfigError(f"--d-model {cfg.d_model} must be divisible by --heads {cfg.heads}")
    for name in ("num_beams", "max_new_tokens"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.no_repeat_ngram_size is not None and cfg.no_repeat_ngram_size < 0:
        raise ConfigError(f"--no-repeat-ngram-size must be 0 (off) or more, got {cfg.no_repeat_ngram_size}")


def _read_splits(cfg: SummarizationConfig) -> dict:
    files = {"train": (cfg.train_file, cfg.train_split)}
    if cfg.validation_file:
        files["validation"] = (cfg.validation_file, cfg.validation_split)
    if cfg.test_file:
        files["test"] = (cfg.test_file, cfg.test_split)
    return {
        k: read_pairs(path, cfg.text_column, cfg.summary_column, dataset_config=cfg.dataset_config, split=s)
        for k, (path, s) in files.items()
    }


def _setup_tokenizer(cfg: SummarizationConfig, rt: Runtime, run_dir: Path, train):
    """The model's tokenizer, or a byte-level BPE with the family's special tokens trained on the training
    texts and summaries; saved with the run."""

    from transformers import AutoTokenizer

    def make():
        if cfg.model:
            try:
                return AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
            except (OSError, ValueError) as err:
                raise ConfigError(f"--model {cfg.model}: cannot load its tokenizer ({err})") from None
        return train_seq2seq_bpe(train.texts + train.summaries, cfg.family, vocab_size=cfg.vocab_size)

    tok = saved_processor(
        rt, run_dir, make, AutoTokenizer.from_pretrained, made_from=cfg.model or TRAINED_HERE
    )
    tok.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids: seq2seq models take none
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise ConfigError(
            f"--model {cfg.model}: its tokenizer has no pad or eos token; a seq2seq model needs both"
        )
    tok.model_max_length = cfg.max_source_length
    return tok


def _setup_model(cfg: SummarizationConfig, tok):
    """--model (safetensors only), or a --family model from the size flags, with its generation defaults."""
    import transformers
    from transformers import AutoModelForSeq2SeqLM, GenerationConfig

    if cfg.model:
        try:
            return AutoModelForSeq2SeqLM.from_pretrained(
                cfg.model, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
            )
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"--model {cfg.model}: cannot load a safetensors seq2seq model ({err})"
            ) from None
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, vocab_size=len(tok))
    if cfg.family == "t5":
        config = transformers.T5Config(
            d_model=cfg.d_model, d_kv=cfg.d_model // cfg.heads, d_ff=cfg.ffn, num_layers=cfg.layers,
            num_decoder_layers=cfg.layers, num_heads=cfg.heads, dropout_rate=cfg.dropout,
            decoder_start_token_id=tok.pad_token_id, **ids,
        )  # fmt: skip
        start, forced_bos = tok.pad_token_id, None
    else:  # BART and Pegasus share their config's names
        start = tok.eos_token_id if cfg.family == "bart" else tok.pad_token_id
        forced_bos = tok.bos_token_id if cfg.family == "bart" else None
        config_class = transformers.BartConfig if cfg.family == "bart" else transformers.PegasusConfig
        config = config_class(
            d_model=cfg.d_model, encoder_layers=cfg.layers, decoder_layers=cfg.layers,
            encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads, encoder_ffn_dim=cfg.ffn,
            decoder_ffn_dim=cfg.ffn, dropout=cfg.dropout,
            max_position_embeddings=max(cfg.max_source_length, cfg.max_target_length, 128),
            decoder_start_token_id=start, bos_token_id=tok.bos_token_id, forced_eos_token_id=tok.eos_token_id,
            **ids,
        )  # fmt: skip
    model = AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, forced_bos_token_id=forced_bos, num_beams=2,
        max_new_tokens=cfg.max_target_length,
    )  # fmt: skip
    return model


def generation_settings(cfg: SummarizationConfig, model):
    """The model's generation config with the flags that were given applied; always bounded."""
    gen = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    for name in GENERATION:
        if getattr(cfg, name) is not None:
            setattr(gen, name, getattr(cfg, name))
    if not gen.max_new_tokens:
        gen.max_new_tokens = cfg.max_target_length
    return gen


def source_prefix(cfg: SummarizationConfig, model) -> str:
    """--source-prefix; else the model's own (T5 configs carry task_specific_params.summarization.prefix);
    else "summarize: " for T5 models, which were trained with task prefixes, and none for the others."""
    if cfg.source_prefix is not None:
        return cfg.source_prefix
    own = (getattr(model.config, "task_specific_params", None) or {}).get("summarization", {}).get("prefix")
    if own is not None:
        return own
    return "summarize: " if model.config.model_type in ("t5", "mt5", "umt5", "longt5") else ""


def generated_tokens(ids: torch.Tensor, tok) -> torch.Tensor:
    """Per row of `generate`'s output: the summary's tokens up to and including its first eos, the decoder
    start left out (what follows an eos is filler that depends on the batch's other rows)."""
    body = ids[:, 1:]
    eos = body == tok.eos_token_id
    return torch.where(eos.any(1), eos.int().argmax(1) + 1, (body != tok.pad_token_id).sum(1))


# Seq2seq families whose forward ends with the LM head (plus at most a logits bias), so it can run on the
# labelled positions alone; other models get logits on every position.
HEAD_LAST = frozenset({"t5", "mt5", "bart", "mbart", "pegasus", "marian"})
# Decoders that, given no mask, build one of ones and check it on the device (`prepare` gives them theirs).
DECODER_MASK_OF_ONES = frozenset({"bart", "mbart", "pegasus"})


class SummarizationTask:
    """Token cross-entropy on the summaries; evaluation generates and scores ROUGE per row on its rank."""

    def __init__(self, cfg, tok, pairs: dict, model, run_dir: Path, rt: Runtime):
        self.title = f"Summarisation ({cfg.name})"
        self.model = self.trained = model
        self.processor, self.cfg, self.max_length = (
            tok,
            cfg,
            max(cfg.max_source_length, cfg.max_target_length),
        )
        self.prefix, self.generation = source_prefix(cfg, model), generation_settings(cfg, model)
        self.pairs, self.predictions_dir = pairs, run_dir / "predictions"
        # Rows carry _ref, an index into every split's texts: ROUGE is scored on the rank that generated.
        self.texts = [t for p in pairs.values() for t in p.texts]
        self.references = [s for p in pairs.values() for s in p.summaries]
        self.splits, offset = {}, 0
        with rt.main_process_first():
            for name, p in pairs.items():
                data = tokenize_pairs(
                    p.texts, p.summaries, tok, prefix=self.prefix, max_source_length=cfg.max_source_length,
                    max_target_length=cfg.max_target_length, cache_dir=run_dir / "cache" / "tokenised",
                )  # fmt: skip
                if name == "train":
                    self.lengths = list(data["length"])
                self.splits[name] = data.remove_columns("length").add_column(
                    "_ref", list(range(offset, offset + len(data)))
                )
                offset += len(data)
        rt.print("data: " + ", ".join(f"{len(p.texts)} {k} documents" for k, p in pairs.items())
                 + f"; source prefix {self.prefix!r}")  # fmt: skip
        held = pairs.get("test", pairs.get("validation", pairs["train"]))
        self.examples = {"summarize": [[t] for t in held.texts[:3]]}
        source = sum(self.lengths) / len(self.lengths)
        target = sum(map(len, self.splits["train"][:2000]["labels"])) / min(2000, len(self.lengths))
        try:  # per source token: sizes() counts source tokens
            self.flops_per_token = train_flops_per_token(
                model.config, seq_len=max(1, round(source)), target_len=max(1, round(target))
            )
        except ValueError:
            self.flops_per_token = 0.0
        # The LM head on summary tokens only, not on padding: for the families whose forward ends with it (then
        # at most a bias); static-shape backends (XLA) keep one shape and run it on every position.
        static_shapes = backend_class(cfg.backend).static_shapes
        self.head_on_labels = model.config.model_type in HEAD_LAST and not static_shapes
        self.settle_source_mask = text_prepare(model, static_shapes)
        self.causal_decoder_mask = (
            model.config.model_type in DECODER_MASK_OF_ONES
            and model.config._attn_implementation == "sdpa"
            and not static_shapes
        )

    def collate(self, rows: list[dict], pad_to_length=None) -> dict[str, torch.Tensor]:
        batch = collate_padded(
            rows, pad_id=self.processor.pad_token_id, pad_to_multiple_of=8, pad_to_length=pad_to_length
        )
        if self.head_on_labels:  # where the labels are, found here on the host, not by the step on the device
            batch["_labelled"] = (batch["labels"].flatten() != -100).nonzero().squeeze(1)
        return batch

    sizes = staticmethod(text_sizes)

    def prepare(self, batch, generator):
        """The source's padding mask settled on the host (`text_prepare`), and for BART and Pegasus under SDPA
        the decoder's causal mask made here: given none, their decoder builds one of ones and asks the device
        whether it hides anything, at every forward. Targets are padded on the right and padding carries no
        label, so the causal mask alone gives the loss of a mask with the targets' padding. The price: SDPA
        runs the decoder's self-attention with a mask, not with its causal flash kernel."""
        batch = self.settle_source_mask(batch, generator)
        if self.causal_decoder_mask:
            length = batch["labels"].shape[1]
            causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
            batch = {**batch, "decoder_attention_mask": causal}
        return batch

    def targets(self, batch):
        return {"loss": label_targets(batch["labels"])}

    def loss(self, model, batch):
        """Cross-entropy summed over every summary token; the decoder reads the labels shifted right by the
        model's own rule (its decoder start token first, -100 turned into pad)."""
        inputs = model_inputs(batch)
        labels = inputs.pop("labels")
        inputs["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        if not self.head_on_labels:
            return {"loss": token_loss_sum(model(**inputs).logits, labels)}, None
        rows = batch["_labelled"]
        with head_on_rows(self.model.get_output_embeddings(), rows):
            logits = model(**inputs).logits  # (labelled positions, vocabulary)
        return {"loss": token_loss_sum(logits, labels.flatten().index_select(0, rows))}, None

    def evaluate(self, model, batch, outputs, generate):
        """Generate this rank's rows (every rank in lockstep), score each against its reference text:
        counts of ROUGE F1 and generated length; records (row, summary) for the predictions file."""
        if generate is None:
            return {}, []
        ids = generate(input_ids=batch["input_ids"], attention_mask=padding_mask(batch),
                       generation_config=self.generation)  # fmt: skip
        summaries = [clean_summary(t) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        refs = batch["_ref"].tolist()
        scores = [rouge_scores(s, self.references[r]) for s, r in zip(summaries, refs)]
        n = float(len(refs))
        counts = {k: torch.tensor([sum(s[k] for s in scores), n], dtype=torch.float64) for k in ROUGE_KEYS}
        counts["gen_len"] = torch.tensor(
            [generated_tokens(ids, self.processor).sum().item(), n], dtype=torch.float64
        )
        return counts, list(zip(refs, summaries))

    def summarize(self, records, means, split):
        """The predictions to RUN/predictions/<split>.jsonl (text, reference, summary, ROUGE-L); the first
        --samples as a table (W&B) and rows (metrics.jsonl)."""
        if not records:
            return {}
        self.predictions_dir.mkdir(parents=True, exist_ok=True)
        with open(self.predictions_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for ref, summary in records:
                row = {"text": self.texts[ref], "reference": self.references[ref], "summary": summary,
                       "rougeL": rouge_scores(summary, self.references[ref])["rougeL"]}  # fmt: skip
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        shown = [
            {"text": self.texts[r], "reference": self.references[r], "summary": s}
            for r, s in records[: self.cfg.samples]
        ]
        return {"samples": shown} if shown else {}

    def before_export(self, model):
        """Generation settings (generation_config.json) and the source prefix travel with the export."""
        model.generation_config = self.generation
        params = dict(getattr(model.config, "task_specific_params", None) or {})
        params["summarization"] = {**params.get("summarization", {}), "prefix": self.prefix,
                                   "max_source_length": self.cfg.max_source_length}  # fmt: skip
        model.config.task_specific_params = params


def _build(cfg: SummarizationConfig, rt: Runtime, run_dir: Path) -> SummarizationTask:
    pairs = _read_splits(cfg)  # every split checked before anything is built
    tok = _setup_tokenizer(cfg, rt, run_dir, pairs["train"])
    model = _setup_model(cfg, tok)
    check_model_fits(model, tok, cfg.max_source_length, "--max-source-length")
    check_model_fits(model, tok, cfg.max_target_length, "--max-target-length")  # decoders have positions too
    return SummarizationTask(cfg, tok, pairs, model, run_dir, rt)


# -- inference: predict, compare and the demo ---------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def load(export_dir: str):
    """(tokenizer, model, prefix, max source tokens) of an export, loaded once per folder."""
    check_export(export_dir, "summarization")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(export_dir, use_safetensors=True).eval()
    params = (getattr(model.config, "task_specific_params", None) or {}).get("summarization", {})
    prefix = params.get("prefix", "summarize: " if model.config.model_type == "t5" else "")
    tok = AutoTokenizer.from_pretrained(export_dir)
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok, model, prefix, params.get("max_source_length", min(tok.model_max_length, 1024))


def summarize_texts(export_dir, texts: list[str], *, batch_size: int = 8, **generation) -> list[str]:
    """The export's summaries of `texts`: its prefix, source length and generation config (any of
    num_beams, max_new_tokens, ... given here override it), decoded as the evaluation decodes them."""
    tok, model, prefix, max_source = load(str(export_dir))
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok([prefix + t for t in texts[i : i + batch_size]], truncation=True, max_length=max_source,
                  padding=True, return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            ids = model.generate(**enc, **{k: v for k, v in generation.items() if v is not None})
        out += [clean_summary(t) for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return out


def model_label(export_dir) -> str:
    """A short name for an export: its run folder's name (runs/t5/export -> t5)."""
    path = Path(export_dir).resolve()
    return path.parent.name if path.name == "export" else path.name


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it as UTF-8 text ({err})") from None


def predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="summarization.py predict", description="Summarise a text.")
    parser.add_argument("export", help="an export folder (RUN/export)")
    parser.add_argument("text", nargs="?", help="the text; default: the export's held-out examples")
    parser.add_argument("--file", help="a UTF-8 text file to summarise")
    parser.add_argument("--num-beams", type=number())
    parser.add_argument("--max-new-tokens", type=number())
    args = parser.parse_args(argv)
    if args.text is not None and not args.text.strip():
        parser.error("the text is empty; give a text to summarise, or --file FILE")
    if args.file and args.text:
        parser.error("give a text or --file FILE, not both")
    if args.file:
        texts = [_read_text(args.file)]
        if not texts[0].strip():
            parser.error(f"--file {args.file} is empty; give a file with the text to summarise")
    elif args.text:
        texts = [args.text]
    else:
        texts = saved_inputs(args.export, "summarize", "give a text, or --file FILE")
    for text, summary in zip(texts, summarize_texts(args.export, texts, num_beams=args.num_beams,
                                                     max_new_tokens=args.max_new_tokens)):  # fmt: skip
        if len(texts) > 1:
            print(f"text: {text}\nsummary: ", end="")
        print(summary)
    return 0


def compare(argv: list[str]) -> int:
    """Several exports (and the lead-k baseline) on one test file: ROUGE, mean summary words and seconds per
    example side by side, as a markdown table (and a CSV with --output), then the first examples' summaries
    next to each other."""
    parser = argparse.ArgumentParser(prog="summarization.py compare", description=compare.__doc__)
    parser.add_argument("exports", nargs="+", help="export folders (RUN/export)")
    parser.add_argument("--test-file", required=True, help=".csv/.tsv/.jsonl, or a `datasets` name")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--summary-column", default="summary")
    parser.add_argument("--split", default="test", help="the split of a `datasets` name")
    parser.add_argument(
        "--limit", type=number(low=0), default=0, help="score the first N documents only (0: all)"
    )
    parser.add_argument(
        "--lead", type=number(low=0), default=1, help="the lead-k baseline's k (0: no baseline row)"
    )
    parser.add_argument("--show", type=number(low=0), default=3, help="examples printed side by side")
    parser.add_argument("--output", default="", help="also write the table as CSV to this file")
    parser.add_argument("--batch-size", type=number(), default=8)
    args = parser.parse_args(argv)
    # found now, not after every model has summarised the file
    if args.output and not Path(args.output).parent.is_dir():
        parser.error(f"--output {args.output}: the folder {Path(args.output).parent} does not exist")
    for export in args.exports:
        if not (Path(export) / "config.json").is_file():
            raise ConfigError(f"{export}: not an export folder (no config.json); pass RUN/export folders")
    pairs = read_pairs(args.test_file, args.text_column, args.summary_column, split=args.split)
    texts, refs = pairs.texts, pairs.summaries
    if args.limit:
        texts, refs = texts[: args.limit], refs[: args.limit]
    systems = {}
    if args.lead:
        start = time.perf_counter()
        systems[f"lead-{args.lead}"] = ([lead_k(t, args.lead) for t in texts], time.perf_counter() - start)
    for export in args.exports:
        load(str(export))  # loading is not summarising
        start = time.perf_counter()
        summaries = summarize_texts(export, texts, batch_size=args.batch_size)
        systems[model_label(export)] = (summaries, time.perf_counter() - start)
    header = ["model", *ROUGE_KEYS, "words", "s/example"]
    rows = []
    for name, (summaries, seconds) in systems.items():
        scores = mean_rouge(summaries, refs)
        words = sum(len(s.split()) for s in summaries) / len(summaries)
        rows.append([name, *(round(scores[k], 2) for k in ROUGE_KEYS), round(words, 1),
                     round(seconds / len(texts), 4)])  # fmt: skip
    print(f"{len(texts)} documents of {pairs.source}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    if args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *rows])
        print(f"\nwritten to {args.output}")
    for i in range(min(args.show, len(texts))):
        print(f"\n### Example {i + 1}\n\n{texts[i]}\n\n- reference: {refs[i]}")
        for name, (summaries, _) in systems.items():
            print(f"- {name}: {summaries[i]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        return predict(argv[1:])
    if argv[:1] == ["compare"]:
        return compare(argv[1:])
    cfg = parse_config(SummarizationConfig, argv, description=__doc__)
    _validate(cfg)
    return run_recipe(cfg, _build, "summarization")


if __name__ == "__main__":
    run_main(main)
