"""Pretrain BERT with masked-language modelling plus next-sentence prediction.

Features: a WordPiece tokenizer trained on the corpus when neither --tokenizer nor --model gives one; NSP
pairs (50 % true next, 50 % random from another document) tokenised with `datasets`; MLM masking fused into
one pass on the host batch, with the MLM head on the masked positions only; DDP across ranks; bf16 autocast
on GPUs; W&B and metrics.jsonl tracking; a Hugging Face export that `pipeline("fill-mask")` and
`BertForNextSentencePrediction` load.

Launch:
    python recipes/mlm_nsp.py                                   # one process, bundled toy corpus
    torchrun --nproc_per_node=2 recipes/mlm_nsp.py              # 2 ranks (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 recipes/mlm_nsp.py --config recipes/configs/mlm_nsp.yaml
    srun --ntasks=4 python recipes/mlm_nsp.py                   # ranks from Slurm's variables
    python recipes/mlm_nsp.py --train-files ../shared/data/meditations.txt --documents line
    python recipes/mlm_nsp.py predict runs/mlm_nsp/export       # fill-mask and is-next on held-out examples
    python recipes/mlm_nsp.py predict EXPORT --text "The bees made [MASK] all summer." --pair "A." "B."
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from recipebox.checkpoints.export import check_export, saved_examples, saved_inputs
from recipebox.data.nsp import build_nsp_pairs, split_documents, tokenize_pairs
from recipebox.data.text import read_documents
from recipebox.data.tokenizer import load_tokenizer, train_wordpiece
from recipebox.kernels.collate import collate_padded
from recipebox.kernels.masking import mask_tokens
from recipebox.launch.backends import backend_class
from recipebox.launch.config import (
    ConfigError,
    TrainConfig,
    check_choice,
    parse_config,
    validate_train_config,
)
from recipebox.launch.flops import flops_per_token_or_zero
from recipebox.launch.recipe import TRAINED_HERE, check_model_fits, run_main, run_recipe, saved_processor
from recipebox.launch.runtime import Runtime
from recipebox.launch.task import (
    label_targets,
    mask_decided_on_host,
    model_inputs,
    no_summary,
    nothing_to_export,
    row_targets,
    text_sizes,
    token_loss_sum,
)

TOY_CORPUS = Path(__file__).resolve().parent.parent / "data" / "toy" / "mlm_nsp" / "corpus.txt"


@dataclass
class MLMNSPConfig(TrainConfig):
    train_files: str = str(TOY_CORPUS)  # comma-separated text files (or a YAML list)
    documents: str = "blank_line"  # blank_line: a blank line ends a document; line: every line is one
    eval_fraction: float = 0.15  # share of documents held out for evaluation
    nsp_copies: int = 5  # pair sets drawn from the corpus, each with its own random partners (dupe factor)
    max_length: int = 128  # tokens per sentence pair, [CLS] A [SEP] B [SEP]
    tokenizer: str = ""  # folder or hub name; empty: --model's own, or a WordPiece trained on the documents
    vocab_size: int = 2000  # WordPiece pieces to train when neither --tokenizer nor --model gives a tokenizer
    lowercase: bool = True  # the trained WordPiece lowercases (and strips accents)
    model: str = ""  # folder or hub name of a BertForPreTraining; empty builds one from the sizes below
    hidden_size: int = 128  # model built from scratch: width
    num_layers: int = 2  # model built from scratch: transformer layers
    num_heads: int = 2  # model built from scratch: attention heads
    intermediate_size: int = 512  # model built from scratch: feed-forward width
    dropout: float = 0.1  # model built from scratch: hidden and attention dropout
    mlm_probability: float = 0.15  # share of tokens chosen for the MLM loss
    mask_replace_prob: float = 0.8  # of the selected tokens, the share replaced by [MASK]
    random_replace_prob: float = 0.1  # ... by a random token (the rest stay as they are)
    pad_to_multiple_of: int = 8  # pad each batch's length up to a multiple of this (tensor cores like 8)
    trust_remote_code: bool = False  # let a hub repository run its own model code
    epochs: float = 6.0
    batch_size: int = 32
    lr: float = 1e-3
    eval_every: int = 100


def _validate(cfg: MLMNSPConfig) -> None:
    validate_train_config(cfg)
    check_choice(cfg, "documents", ("blank_line", "line"))
    if cfg.max_length < 8:
        raise ConfigError(f"--max-length must be at least 8, got {cfg.max_length}")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"--hidden-size {cfg.hidden_size} must be divisible by --num-heads {cfg.num_heads}")
    if cfg.mask_replace_prob + cfg.random_replace_prob > 1:
        raise ConfigError(
            f"--mask-replace-prob {cfg.mask_replace_prob} and --random-replace-prob {cfg.random_replace_prob} "
            "share the chosen tokens: together at most 1 (the rest stay as they are)"
        )
    if cfg.nsp_copies < 1:
        raise ConfigError(f"--nsp-copies must be at least 1, got {cfg.nsp_copies}")


def _setup_tokenizer(cfg: MLMNSPConfig, rt: Runtime, run_dir: Path, documents: list[list[str]]):
    """--tokenizer, --model's own, or a WordPiece trained on the training documents; saved once as the run's
    processor."""
    source = cfg.tokenizer or cfg.model

    def make():
        if source:
            tok = load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)
        else:
            texts = (s for doc in documents for s in doc)
            tok = train_wordpiece(texts, vocab_size=cfg.vocab_size, lowercase=cfg.lowercase)
        tok.model_max_length = cfg.max_length
        return tok

    made_from = source or TRAINED_HERE
    tok = saved_processor(rt, run_dir, make, lambda folder: load_tokenizer(str(folder)), made_from=made_from)
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise ConfigError(f"tokenizer {source or run_dir} has no [MASK] or [PAD] token; MLM needs both")
    return tok


def _setup_data(cfg: MLMNSPConfig, rt: Runtime, run_dir: Path):
    files = [f.strip() for f in cfg.train_files.split(",") if f.strip()]
    documents = read_documents(files, documents=cfg.documents, cache_dir=str(run_dir / "cache" / "text"))
    train_docs, eval_docs = split_documents(documents, cfg.eval_fraction, cfg.seed)
    source = ", ".join(files)
    train_pairs = build_nsp_pairs(train_docs, cfg.seed, source=source, copies=cfg.nsp_copies)
    eval_pairs = None
    if eval_docs:
        eval_pairs = build_nsp_pairs(eval_docs, cfg.seed + 1, source=source + " (eval split)", both=True)
    tok = _setup_tokenizer(cfg, rt, run_dir, train_docs)
    with rt.main_process_first():
        cache = run_dir / "cache" / "tokenised"
        train = tokenize_pairs(train_pairs, tok, cfg.max_length, cache)
        evals = tokenize_pairs(eval_pairs, tok, cfg.max_length, cache) if eval_pairs else None
    rt.print(
        f"data: {len(train)} training pairs from {len(train_docs)} documents, {len(evals or [])} eval pairs"
    )
    splits = {"train": train} if evals is None else {"train": train, "validation": evals}
    examples = demo_examples(eval_docs or train_docs, tok.mask_token, cfg.seed)
    return tok, {k: d.remove_columns("length") for k, d in splits.items()}, list(train["length"]), examples


def demo_examples(docs: list[list[str]], mask_token: str, seed: int, n: int = 3) -> dict:
    """Demo inputs from held-out documents: first sentences with their longest word masked (it carries the
    most meaning, so the guess says the most), and each with its true next sentence and a random one."""
    rng = random.Random(seed)
    docs = [d for d in docs if len(d) >= 2]
    if len(docs) < 2:
        return {}
    chosen = rng.sample(docs, min(n, len(docs) - 1))
    others = [rng.choice([d for d in docs if d is not doc]) for doc in chosen]
    masked = []
    for doc in chosen:
        words = doc[0].split()
        i = max(range(len(words)), key=lambda j: len(words[j].strip(".,;:!?\"'")))
        words[i] = words[i].replace(words[i].strip(".,;:!?\"'"), mask_token)
        masked.append([" ".join(words)])
    pairs = [[d[0], d[1]] for d in chosen] + [[d[0], rng.choice(o)] for d, o in zip(chosen, others)]
    return {"fill_mask": masked, "next_sentence": pairs}


def _setup_model(cfg: MLMNSPConfig, tok):
    from transformers import BertConfig, BertForPreTraining

    if cfg.model:
        try:
            return BertForPreTraining.from_pretrained(
                cfg.model, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
            )
        except OSError as err:
            raise ConfigError(f"--model {cfg.model}: cannot load a safetensors checkpoint ({err})") from None
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=max(512, cfg.max_length),
        pad_token_id=tok.pad_token_id,
    )
    return BertForPreTraining(config)


class PretrainingObjective(nn.Module):
    """BertForPreTraining's two losses as sums, with the MLM head run on the masked positions only.

    The head (a d x d transform and a d x vocab projection) on every position is most of a small BERT's
    step; only the ~15 % masked positions have a label, so the loss is the same and the step far cheaper.
    `masked_positions` (flat long indices, from `MLMNSPTask.prepare`) picks them; without it (XLA: one
    compiled graph per shape, and their number changes with every batch) the head runs on every position and
    unlabelled ones are ignored.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, labels, next_sentence_label, attention_mask=None,
                masked_positions=None):  # fmt: skip
        hidden, pooled = self.model.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=False,
        )[:2]
        if masked_positions is None:  # static shapes: the head runs on every position
            mlm_labels, head_input = labels, hidden
        else:  # flat indices of the masked positions, found on the host (`prepare`): nothing to wait for
            mlm_labels = labels.flatten().index_select(0, masked_positions)
            head_input = hidden.flatten(0, 1).index_select(0, masked_positions)
        mlm_logits = self.model.cls.predictions(head_input)
        nsp_logits = self.model.cls.seq_relationship(pooled)
        # Sums: the loop divides each by its targets over the whole step (masked tokens, pairs).
        mlm_sum = token_loss_sum(mlm_logits, mlm_labels)
        nsp_sum = F.cross_entropy(nsp_logits.float(), next_sentence_label, reduction="sum")
        # The static path's labels are the batch's own (no copy of an input to fetch back from the device).
        # A dict, which DeepSpeed's ZeRO-3 hooks can look into (they warn about an object they cannot).
        return {
            "mlm_sum": mlm_sum,
            "nsp_sum": nsp_sum,
            "mlm_logits": mlm_logits,
            "mlm_labels": None if masked_positions is None else mlm_labels,
            "nsp_logits": nsp_logits,
        }


class MLMNSPTask:
    """Masked-language modelling plus next-sentence prediction: two loss terms, accuracies that sum."""

    def __init__(self, cfg: MLMNSPConfig, tok, splits: dict, lengths: list[int], examples: dict, model):
        self.title = f"BERT MLM+NSP ({cfg.name})"
        self.model, self.processor, self.splits, self.lengths = model, tok, splits, lengths
        self.examples = examples
        self.static_shapes = static = backend_class(cfg.backend).static_shapes
        self.trained = PretrainingObjective(model)
        # The MLM head runs on the masked positions only, or on every position where shapes are static.
        self.flops_per_token = flops_per_token_or_zero(
            model.config, seq_len=cfg.max_length, head_fraction=1.0 if static else cfg.mlm_probability
        )
        self.max_length, self.seed = cfg.max_length, cfg.seed
        self.collate = functools.partial(
            collate_padded, pad_id=tok.pad_token_id, pad_to_multiple_of=cfg.pad_to_multiple_of
        )
        self.special_ids = torch.tensor(tok.all_special_ids)
        self.mask_options = dict(mask_token_id=tok.mask_token_id, vocab_size=len(tok), mlm_probability=cfg.mlm_probability,
                                 mask_replace_prob=cfg.mask_replace_prob, random_replace_prob=cfg.random_replace_prob)  # fmt: skip

    sizes = staticmethod(text_sizes)
    summarize = staticmethod(no_summary)
    before_export = staticmethod(nothing_to_export)

    def prepare(self, batch, generator):
        """MLM masking of the host batch, fused into one pass (kernels.mask_tokens). Off the static-shape
        path it also finds the masked positions for the head, and settles the attention mask on the host
        (`mask_decided_on_host`: none for rows as long as the batch, else a 4D one transformers takes as is),
        so transformers never asks the device whether it hides anything.
        Evaluation rows (`_row`) are masked one by one from (seed, row): the same masks on 1 or 64 ranks."""
        if "_row" in batch:
            ids, labels = self._mask_rows(batch["input_ids"], batch["attention_mask"], batch["_row"])
        else:
            ids, labels = mask_tokens(
                batch["input_ids"], special_ids=self.special_ids, generator=generator, **self.mask_options
            )
        batch = {**batch, "input_ids": ids, "labels": labels}
        if not self.static_shapes:
            batch["masked_positions"] = (labels.flatten() != -100).nonzero().squeeze(1)
            batch = mask_decided_on_host(batch, self.model.config)
        return batch

    def _mask_rows(self, input_ids, attention_mask, rows):
        """Each row's real tokens masked from a generator seeded by (seed, row), padding left as is."""
        ids, labels = input_ids.clone(), torch.full_like(input_ids, -100)
        for i, (row, n) in enumerate(zip(rows.tolist(), attention_mask.sum(1).tolist())):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + row)
            ids[i, :n], labels[i, :n] = mask_tokens(
                input_ids[i, :n], special_ids=self.special_ids, generator=g, **self.mask_options
            )
        return ids, labels

    def targets(self, batch):
        pairs = batch["next_sentence_label"]
        return {"mlm": label_targets(batch["labels"]), "nsp": row_targets(pairs)}

    def loss(self, model, batch):
        out = model(**model_inputs(batch))
        return {"mlm": out["mlm_sum"], "nsp": out["nsp_sum"]}, out

    def evaluate(self, model, batch, out, generate):
        mlm_labels = batch["labels"] if out["mlm_labels"] is None else out["mlm_labels"]
        labelled = mlm_labels != -100  # all of them, except on the static-shape path
        mlm_hits = ((out["mlm_logits"].argmax(-1) == mlm_labels) & labelled).sum()
        nsp_hits = (out["nsp_logits"].argmax(-1) == batch["next_sentence_label"]).sum()
        nsp_total = torch.tensor(out["nsp_logits"].shape[0], device=nsp_hits.device)
        counts = {"mlm_accuracy": torch.stack([mlm_hits, labelled.sum()])}
        return {**counts, "nsp_accuracy": torch.stack([nsp_hits, nsp_total])}, []


def _build(cfg: MLMNSPConfig, rt: Runtime, run_dir: Path) -> MLMNSPTask:
    tok, splits, lengths, examples = _setup_data(cfg, rt, run_dir)
    model = _setup_model(cfg, tok)
    check_model_fits(model, tok, cfg.max_length, "--max-length")
    return MLMNSPTask(cfg, tok, splits, lengths, examples, model)


@functools.lru_cache(maxsize=4)
def load(export_dir: str):
    """The export's fill-mask pipeline and next-sentence model, loaded once per folder (demo apps reuse them)."""
    check_export(export_dir, "mlm_nsp")
    import transformers
    from transformers import AutoTokenizer, BertForNextSentencePrediction, pipeline

    transformers.logging.set_verbosity_error()  # the NSP model skips the MLM head by design: no load report
    tok = AutoTokenizer.from_pretrained(export_dir)
    fill = pipeline("fill-mask", model=export_dir, tokenizer=tok, model_kwargs={"use_safetensors": True})
    return tok, fill, BertForNextSentencePrediction.from_pretrained(export_dir, use_safetensors=True).eval()


def fill_mask(export_dir: str, text: str, top_k: int = 5) -> list[tuple[str, float]]:
    """The top-k tokens for the one mask token in `text`, with their probabilities. Text longer than the
    model's window is cut to it; a mask that falls outside, or none or several, is a ValueError that says so."""
    tok, fill, _ = load(str(export_dir))
    ids = tok(text, truncation=True, max_length=tok.model_max_length)["input_ids"]
    if text.count(tok.mask_token) != 1 or ids.count(tok.mask_token_id) != 1:
        where = f"within the first {tok.model_max_length} tokens " if text.count(tok.mask_token) == 1 else ""
        raise ValueError(f"put exactly one {tok.mask_token} in the text {where}(the model fills one token)")
    options = {"truncation": True, "max_length": tok.model_max_length}
    return [(g["token_str"], g["score"]) for g in fill(text, top_k=top_k, tokenizer_kwargs=options)]


def next_sentence(export_dir: str, a: str, b: str) -> float:
    """The probability that B is the sentence after A (pairs longer than the window lose their longest ends)."""
    tok, _, nsp = load(str(export_dir))
    enc = tok(a, b, truncation="longest_first", max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return nsp(**enc).logits.softmax(-1)[0, 0].item()  # label 0: B follows A


def predict(argv: list[str]) -> int:
    """The terminal view: fill-mask and is-next for given inputs, or for the examples saved with the export."""
    parser = argparse.ArgumentParser(prog="mlm_nsp.py predict")
    parser.add_argument("export", help="an export folder (RUN/export)")
    parser.add_argument("--text", help="a sentence with the tokenizer's mask token, e.g. [MASK]")
    parser.add_argument(
        "--pair", nargs=2, metavar=("A", "B"), help="two sentences: is B the next one after A?"
    )
    args = parser.parse_args(argv)
    if args.text is not None and not args.text.strip():
        parser.error("--text is empty; give a sentence with one mask token")
    if args.pair and not all(sentence.strip() for sentence in args.pair):
        parser.error("--pair: a sentence is empty; give two sentences")
    texts, pairs = ([args.text] if args.text else []), ([args.pair] if args.pair else [])
    if not texts and not pairs:  # the held-out examples saved with the export
        texts = saved_inputs(args.export, "fill_mask", "give --text and/or --pair")
        pairs = saved_examples(args.export, "next_sentence", "give --text and/or --pair")
    load(str(args.export))  # a broken export is its own error, not the --text's
    for text in texts:
        try:
            filled = fill_mask(args.export, text)
        except ValueError as err:  # no mask, several, or one past the window
            parser.error(f"--text {text!r}: {err}")
        print(f"fill-mask: {text}")
        for token, score in filled:
            print(f"  {token:>15s}  {score:.3f}")
    for a, b in pairs:
        p_next = next_sentence(args.export, a, b)
        print(
            f"next sentence? p={p_next:.3f} -> {'is next' if p_next >= 0.5 else 'not next'}\n  A: {a}\n  B: {b}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        return predict(argv[1:])
    cfg = parse_config(MLMNSPConfig, argv, description=__doc__)
    _validate(cfg)
    return run_recipe(cfg, _build, "mlm_nsp")


if __name__ == "__main__":
    run_main(main)
