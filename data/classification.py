"""Text classification data: CSV, JSON lines or a `datasets` name -> tokenised rows, label maps, metrics.

Multi-class labels are one column of names or ids; multi-label labels are several 0/1 columns or one column
of name lists. Every row is checked before training: a missing column, an empty text, a label that training
never saw is a DataError naming the file and line. Metrics (macro/micro F1, thresholds) live here too, so
the recipe, its tests and its predictor share one implementation.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from recipebox.data.text import DataError, check_text_file, content_key, map_args

MULTI_CLASS, MULTI_LABEL = "multi_class", "multi_label"


@dataclass
class Table:
    """Rows of one split and, for each, where it came from ("train.csv, line 7") for error messages."""

    rows: list[dict]
    where: list[str]
    source: str
    unlabelled: int = 0  # rows left out: a `datasets` ClassLabel of -1 (no label)


TABLE = "table (.csv, .tsv or .jsonl) with a header or keys naming its columns"


def read_table(path: str, *, dataset_config: str = "", split: str = "train") -> Table:
    """A CSV/TSV, JSON lines (.jsonl/.json) file, or else a `datasets` name (hub or local folder)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(check_text_file(path, TABLE), "\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".json"):
        return _read_json_lines(check_text_file(path, TABLE))
    return _read_dataset(path, dataset_config, split)


def _read_csv(path: Path, delimiter: str) -> Table:
    rows, where = [], []
    # Documents to summarise run past the csv module's 128 KiB field limit; a field is bounded by memory only.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            if not reader.fieldnames:
                raise DataError(f"{path}: no header line; the first line must name the columns")
            start = reader.line_num + 1
            for row in reader:
                if None in row:  # more fields than the header has
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} fields but "
                        f"the header has {len(reader.fieldnames)}; quote fields that contain '{delimiter}'"
                    )
                values = row.values()
                if None in values and any("\n" in v for v in values if v):  # fields short, a line swallowed
                    raise DataError(
                        f"{path}, line {start}: a quote opened in this row is not closed where its field ends "
                        f"(the row takes in the lines after it, to line {reader.line_num}); close it, or write a "
                        f'quote inside a quoted field as two ("")'
                    )
                rows.append(row)
                where.append(f"{path}, line {reader.line_num}")
                start = reader.line_num + 1
        except csv.Error as err:  # what the csv module still refuses (a field past even that limit)
            raise DataError(f"{path}, line {reader.line_num}: not readable as CSV ({err})") from None
    if not rows:
        raise DataError(f"{path}: a header but no rows; give at least one example")
    return Table(rows, where, str(path))


def _read_json_lines(path: Path) -> Table:
    rows, where = [], []
    # Lines end at "\n" only: JSON strings may hold U+2028 or U+0085, which str.splitlines would cut at.
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({err.msg}); one object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"{path}, line {number}")
    return Table(rows, where, str(path))


def _read_dataset(name: str, config: str, split: str) -> Table:
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # the hub, a missing split or a missing folder: all the user's to fix
        raise DataError(
            f"{name}: not a .csv/.tsv/.jsonl file and not a loadable `datasets` name or split {split!r} ({err})"
        ) from None
    label_names = {k: f.names for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    rows, where = [], []
    for i, row in enumerate(ds):  # ClassLabel ids become their names, so the exported label map is readable
        if any(row[k] is not None and row[k] < 0 for k in label_names):  # -1: no label (GLUE's test splits,
            continue  # SNLI's rows without a gold label), not names[-1]
        rows.append(
            {k: label_names[k][v] if k in label_names and v is not None else v for k, v in row.items()}
        )
        where.append(f"{name}[{split}] row {i}")
    if len(ds) and not rows:
        raise DataError(
            f"{name}[{split}]: every row's label is -1 (unlabelled); pick a labelled split (--train-split, "
            f'--validation-split, --test-split) or leave the split out (e.g. --test-file "")'
        )
    return Table(rows, where, f"{name}[{split}]", unlabelled=len(ds) - len(rows))


def check_columns(table: Table, columns: list[str], flag: str) -> None:
    if not table.rows:
        raise DataError(f"{table.source}: no examples; give a file with at least one row")
    have = list(table.rows[0])
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(
            f"{table.source}: no column(s) {', '.join(missing)} (it has {', '.join(have)}); set {flag}"
        )
    for row, where in zip(table.rows, table.where):
        for c in columns:
            if c not in row:
                raise DataError(f"{where}: no {c!r} field; every row needs it")


def texts(table: Table, text_columns: list[str]) -> list[list[str]]:
    """One list of strings per text column (one column: single texts; two: sentence pairs)."""
    check_columns(table, text_columns, "--text-columns")
    out = [[] for _ in text_columns]
    for row, where in zip(table.rows, table.where):
        for i, c in enumerate(text_columns):
            value = row[c]
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"{where}: column {c!r} is empty or not text ({value!r}); fill it or drop the row"
                )
            out[i].append(value)
    return out


def _label_values(table: Table, label_columns: list[str], task: str, separator: str) -> list:
    """Per row: the raw label (multi-class) or the set of label names that apply (multi-label)."""
    check_columns(table, label_columns, "--label-columns")
    values = []
    for row, where in zip(table.rows, table.where):
        if task == MULTI_CLASS:
            value = row[label_columns[0]]
            if value is None or isinstance(value, str) and not value.strip():
                raise DataError(f"{where}: no label in column {label_columns[0]!r}")
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise DataError(
                    f"{where}: the label in column {label_columns[0]!r} must be a name or an integer id, got "
                    f"{value!r}; fix the row (several labels per text: --task multi_label)"
                )
            values.append(value.strip() if isinstance(value, str) else value)
        elif len(label_columns) > 1:  # one 0/1 column per label
            on = set()
            for c in label_columns:
                flag = str(row[c]).strip().lower()
                if flag not in ("0", "1", "true", "false", "0.0", "1.0"):
                    raise DataError(f"{where}: column {c!r} must be 0 or 1, got {row[c]!r}")
                if flag in ("1", "true", "1.0"):
                    on.add(c)
            values.append(on)
        else:  # one column holding a list of names, as a JSON list or joined by `separator`
            value = row[label_columns[0]]
            joined = (
                re.search(r"\w\s*([,;|])\s*\w", value) if isinstance(value, str) and not separator else None
            )
            if joined:
                raise DataError(
                    f"{where}: {value!r} in column {label_columns[0]!r} looks like several labels joined by "
                    f"{joined.group(1)!r}; pass --label-separator {joined.group(1)!r}, or write the labels "
                    f"as a JSON list (names that hold {joined.group(1)!r} themselves)"
                )
            if isinstance(value, str):
                value = [v.strip() for v in value.split(separator)] if separator else [value.strip()]
            if not isinstance(value, list):
                raise DataError(
                    f"{where}: column {label_columns[0]!r} must list label names, got {value!r}; "
                    f"use a JSON list or --label-separator"
                )
            values.append({str(v) for v in value if str(v)})
    return values


def label_names(
    table: Table, label_columns: list[str], task: str, separator: str, fixed: list[str]
) -> list[str]:
    """The labels in id order: --labels if given, the 0/1 columns, integer ids in order, else sorted names.
    Integer ids are kept as ids (a class missing from training keeps its id) when they are small (under 256)
    or dense (the largest under twice their number); sparse codes (20010, 30020) are names, in numeric
    order, not 30,021 outputs."""
    if fixed:
        return fixed
    if task == MULTI_LABEL and len(label_columns) > 1:
        return list(label_columns)
    values = _label_values(table, label_columns, task, separator)
    seen = set().union(*values) if task == MULTI_LABEL else set(values)
    if all(isinstance(v, int) or isinstance(v, str) and v.isascii() and v.isdigit() for v in seen):
        ids = sorted({int(v) for v in seen})
        if ids[0] >= 0 and ids[-1] < max(2 * len(ids), 256):
            return [str(i) for i in range(ids[-1] + 1)]  # ids as given: label 3 stays id 3
        return [str(i) for i in ids]
    return sorted(str(v) for v in seen)


def encode_labels(
    table: Table, label_columns: list[str], task: str, separator: str, names: list[str], given: bool = False
) -> list:
    """Label ids (multi-class) or multi-hot float vectors (multi-label); an unknown label is a DataError.
    `given`: `names` is --labels, in id order, so a file of integer ids reads id i as names[i] (unless the
    names are numbers themselves: --labels 1,2,3,4,5 of star ratings never reads 0 as "1")."""
    index = {n: i for i, n in enumerate(names)}
    by_id = given and not any(re.fullmatch(r"\s*-?\d+\s*", n) for n in names)
    if by_id:
        index |= {str(i): i for i in range(len(names)) if str(i) not in index}
    out = []
    for value, where in zip(_label_values(table, label_columns, task, separator), table.where):
        unknown = [str(v) for v in (value if task == MULTI_LABEL else [value]) if str(v) not in index]
        if unknown:
            known = ", ".join(names) + (f"; or their ids 0 to {len(names) - 1}" if by_id else "")
            raise DataError(
                f"{where}: label {unknown[0]!r} is not one of the {'--labels' if given else 'training labels'} "
                f"({known}); fix the row, or list every label with --labels"
            )
        if task == MULTI_CLASS:
            out.append(index[str(value)])
        else:
            hot = [0.0] * len(names)
            for v in value:
                hot[index[str(v)]] = 1.0
            out.append(hot)
    return out


def tokenize_texts(
    columns: list[list[str]], labels: list, tokenizer, max_length: int, cache_dir: str | Path | None = None
):
    """A `datasets.Dataset` of input_ids (token_type_ids for pairs), labels and length; cached when asked."""
    import datasets

    data = {"a": columns[0], "labels": labels}
    if len(columns) > 1:
        data["b"] = columns[1]

    def encode(batch):
        enc = tokenizer(
            batch["a"],
            batch.get("b"),
            truncation="longest_first" if "b" in batch else True,
            max_length=max_length,
            return_attention_mask=False,
        )
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "token_type_ids")}
        return {**enc, "length": [len(x) for x in enc["input_ids"]]}

    key = content_key(data, max_length, tokenizer.get_vocab())
    return datasets.Dataset.from_dict(data).map(
        encode,
        batched=True,
        remove_columns=[k for k in ("a", "b") if k in data],
        **map_args(cache_dir, f"cls-{key}"),
        desc="tokenise texts",
    )


# -- metrics ---------------------------------------------------------------------------------------------
DEFAULT_THRESHOLD = 0.5
MIN_FIT_POSITIVES = 5  # a label with fewer positive validation examples keeps DEFAULT_THRESHOLD


def f1_scores(hits, golds) -> tuple:
    """Per-column F1 of 0/1 arrays (rows x labels) and the micro F1 over all cells; a label with no gold and
    no predicted positive scores 0, as scikit-learn's `f1_score(..., zero_division=0)` does."""
    import numpy as np

    hits, golds = np.asarray(hits, dtype=bool), np.asarray(golds, dtype=bool)
    tp = (hits & golds).sum(axis=0)
    wrong = (hits ^ golds).sum(axis=0)  # false positives + false negatives
    per_label = np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(tp.shape), where=2 * tp + wrong > 0)
    total = 2 * tp.sum() + wrong.sum()
    return per_label, float(2 * tp.sum() / total) if total else 0.0


def multi_class_metrics(preds: list[int], golds: list[int], num_labels: int) -> dict[str, float]:
    """macro_f1 averages over the labels that occur in the split (gold or predicted), as scikit-learn and
    the Hugging Face examples do: a label absent from a small held-out split would add an F1 of 0."""
    import numpy as np

    p, g = np.asarray(preds), np.asarray(golds)
    labels = np.asarray(sorted(set(golds) | set(preds)))
    per_label, micro = f1_scores(p[:, None] == labels, g[:, None] == labels)
    return {
        "accuracy": float((p == g).mean()),
        "macro_f1": float(per_label.mean()),
        "micro_f1": micro,
        "examples": float(len(golds)),
    }


def multi_label_metrics(
    probs: list[list[float]], golds: list[list[float]], names: list[str], thresholds: list[float]
) -> dict[str, float]:
    """Subset accuracy, per-label accuracy, macro/micro F1 and F1 per label, at the given thresholds."""
    import numpy as np

    p, g = np.asarray(probs), np.asarray(golds).astype(int)
    hits = (p >= np.asarray(thresholds)).astype(int)
    per_label, micro = f1_scores(hits, g)
    result = {
        "subset_accuracy": float((hits == g).all(axis=1).mean()),
        "accuracy": float((hits == g).mean()),
        "macro_f1": float(per_label.mean()),
        "micro_f1": micro,
        "examples": float(len(g)),
    }
    result.update({f"f1/{n}": float(v) for n, v in zip(names, per_label)})
    return result


def fit_thresholds(
    probs: list[list[float]], golds: list[list[float]], min_positives: int = MIN_FIT_POSITIVES
) -> list[float]:
    """Per label, the decision threshold with the best F1 on these examples (ties go to the one nearest 0.5).

    A label with fewer than `min_positives` positive examples keeps 0.5: a threshold fitted on two or three
    examples fits those examples, not the label.
    """
    import numpy as np

    p, g = np.asarray(probs), np.asarray(golds).astype(bool)
    grid = sorted(set(np.round(np.arange(0.05, 0.96, 0.05), 2).tolist()) | {DEFAULT_THRESHOLD})
    out = []
    for j in range(p.shape[1]):
        if g[:, j].sum() < max(1, min_positives):
            out.append(DEFAULT_THRESHOLD)
            continue

        def f1(t, j=j):
            hit = p[:, j] >= t
            tp = (hit & g[:, j]).sum()
            return 2 * tp / max(1, hit.sum() + g[:, j].sum())

        out.append(max(grid, key=lambda t: (f1(t), -abs(t - DEFAULT_THRESHOLD))))
    return out


def prior_log_odds(golds: list[list[float]]) -> list[float]:
    """Per label, log(p / (1 - p)) of its frequency p in `golds` (add-one smoothed, so never infinite).

    As the initial bias of a multi-label head, every sigmoid starts at its label's base rate instead of 0.5:
    rare labels are not pushed down for the first hundred steps, and their examples drive the learning.
    """
    import numpy as np

    g = np.asarray(golds, dtype=np.float64)
    p = (g.sum(axis=0) + 1) / (len(g) + 2)
    return np.log(p / (1 - p)).tolist()
