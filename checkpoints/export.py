"""Export: a Hugging Face folder (safetensors, config, tokenizer, model card) that `pipeline` loads.

The model card (README.md) embeds the run's training curves (curves.png, drawn from its metrics.jsonl) when
there are any, so a run that never reached Weights & Biases still shows how it went; examples.json holds the
demo apps' example inputs when the task gives some; inputs that are files (a `pathlib.Path`, e.g. an audio
clip) are copied into examples/ and named relative to the export, so the folder carries them.

The folder is written under a temporary name and renamed into place, so a crash mid-export never leaves a
half-written folder where a previous good export stood.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from recipebox.checkpoints.curves import plot_curves
from recipebox.checkpoints.sharded import CheckpointError

PROCESSOR = "processor"  # RUN/processor, and hf/processor in every checkpoint
CURVES = "curves.png"  # beside the model card, which embeds it


def processor_folder(parent: Path) -> Path:
    """parent/processor (parent/tokenizer in run folders and checkpoints written before it existed)."""
    folder, older = parent / PROCESSOR, parent / "tokenizer"
    return older if not folder.is_dir() and older.is_dir() else folder


def model_card(title: str, metrics: dict[str, float], config: dict, curves: bool = False) -> str:
    """README.md: the final metrics, the training curves (curves.png beside it) if drawn, the config."""
    lines = [f"# {title}", "", "Trained with recipebox.", "", "## Evaluation", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in sorted(metrics.items())] or ["- (no evaluation)"]
    if curves:
        lines += ["", "## Training curves", "", f"![Training curves]({CURVES})"]
    lines += [
        "",
        "## Training configuration",
        "",
        "```json",
        json.dumps(config, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def export_hf(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    title: str,
    metrics: dict,
    config: dict,
    metrics_file: Path | None = None,
    examples: dict | None = None,
) -> Path:
    """Writes out_dir: the model, its tokenizer (if any) with the list of the files it wrote
    (PROCESSOR_LIST, which check_export reads), the model card with the curves of metrics_file (a run's
    metrics.jsonl, if given and plottable), eval_results.json and examples.json (if given). An earlier export
    there is replaced; any other folder there is refused (check_export_target)."""
    out_dir = check_export_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Folders of names no one else has (this call makes them), so nothing beside OUT is ever removed.
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f"{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            before = set(os.listdir(tmp))
            tokenizer.save_pretrained(tmp)
            written = sorted(set(os.listdir(tmp)) - before)
            (tmp / PROCESSOR_LIST).write_text(json.dumps(written, indent=2), encoding="utf-8")
        curves = metrics_file is not None and plot_curves(metrics_file, tmp / CURVES)
        (tmp / "README.md").write_text(model_card(title, metrics, config, curves), encoding="utf-8")
        (tmp / "eval_results.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        if examples is not None:
            examples = _with_files(examples, tmp)
            (tmp / "examples.json").write_text(json.dumps(examples, indent=2), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():  # an earlier export (check_export_target) or an empty folder
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def is_export(folder: Path) -> bool:
    """A folder export_hf wrote: its model config and eval_results.json (a downloaded model has no such
    file, so it is never replaced)."""
    return (folder / "config.json").is_file() and (folder / "eval_results.json").is_file()


def check_export_target(out_dir: str | Path) -> Path:
    """out_dir, when an export may be written there: it does not exist, is empty, or holds an earlier export
    (which the new one replaces). Anything else (a run folder, a checkpoint, the user's files) would be
    deleted by the replacement, so it is a CheckpointError naming the folder."""
    given, out_dir = out_dir, Path(out_dir).resolve()  # "." and "runs/.." name no folder to write beside
    if out_dir == Path.cwd() or out_dir in Path.cwd().parents:
        raise CheckpointError(
            f"{given} is the current folder (or holds it); name a new folder for the export"
        )
    if out_dir.exists() and not (out_dir.is_dir() and (is_export(out_dir) or not any(out_dir.iterdir()))):
        raise CheckpointError(
            f"{out_dir} exists and is not an export (no config.json and eval_results.json at its top); "
            f"writing the export there would replace what it holds, so choose a new or empty folder"
        )
    existing = next(p for p in out_dir.parents if p.exists())  # the folder the export's folders go under
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if not existing.is_dir() else "is not writable"
        raise CheckpointError(f"{existing} {what}, so {given} cannot be written; choose another folder")
    return out_dir


# Model class suffixes of each recipe's task (config.json "architectures"); demos/common.py's APPS likewise
# (tests/test_demos.py holds the two alike).
TASK_HEADS = {
    "mlm_nsp": ("ForPreTraining",),
    "text_classification": ("ForSequenceClassification",),
    "ner": ("ForTokenClassification",),
    "qa": ("ForQuestionAnswering", "ForQuestionAnsweringSimple"),
    "causal_lm": ("ForCausalLM", "LMHeadModel"),
    "summarization": ("ForConditionalGeneration", "MTModel"),
    "asr_ctc": ("ForCTC",),
}


def check_export(export_dir: str | Path, task: str) -> str:
    """export_dir as given, unless it is not an export or holds another recipe's task (a model class that
    ends with another task's suffix in TASK_HEADS and with none of `task`'s): then a
    CheckpointError naming the folder, what it holds and the fix. Every recipe's `load` asks first:
    transformers loads another task's export with a new, random head (and says so only in a load report),
    so predict would print confident nonsense. A class no recipe trains (a hub model's) is let through."""
    path, heads = Path(export_dir), TASK_HEADS[task]
    fix = f"pass RUN/export of a run that trained a *{' or *'.join(heads)} model"
    if not (path / "config.json").is_file():
        inside = (path / "export" / "config.json").is_file()
        where = f"; {path / 'export'} is the run's export" if inside else f"; {fix}"
        raise CheckpointError(f"{export_dir} is not an export (no config.json){where}")
    if not any(path.glob("*.safetensors")):  # a hub folder may hold only pytorch_model.bin, a pickle
        raise CheckpointError(
            f"{export_dir} has a config.json but no safetensors weights, the only ones loaded; {fix}"
        )
    try:
        archs = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{path / 'config.json'} is not a readable model config ({err}); {fix}"
        ) from None
    others = {h for hs in TASK_HEADS.values() for h in hs} - set(heads)
    ours = any(arch.endswith(head) for arch in archs for head in heads)
    if not ours and any(arch.endswith(head) for arch in archs for head in others):
        raise CheckpointError(f"{export_dir} holds a {' / '.join(archs)}; {fix}")
    again = "export the run again (python -m recipebox.checkpoints export RUN/checkpoints/latest OUT)"
    check_weight_files(path, fix=again)
    if (path / PROCESSOR_LIST).is_file():  # every file (or folder) the processor's save_pretrained wrote
        try:
            listed = json.loads((path / PROCESSOR_LIST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path / PROCESSOR_LIST} does not read ({err}); {again}") from None
        if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
            raise CheckpointError(f"{path / PROCESSOR_LIST} is not a list of file names; {again}")
        missing = [name for name in listed if not (path / name).exists()]
        if missing:
            raise CheckpointError(
                f"{export_dir} lacks {', '.join(missing)} of its tokenizer or feature extractor (the export "
                f"wrote them; {PROCESSOR_LIST} lists them): the export is incomplete: {again}"
            )
    elif not any((path / name).is_file() for name in PROCESSOR_FILES):  # an older export, a hub folder
        raise CheckpointError(
            f"{export_dir} holds no tokenizer or feature extractor ({', '.join(PROCESSOR_FILES)}); the export "
            f"is incomplete: {again}"
        )
    return str(export_dir)


# The files (and folders: a second tokenizer, chat templates) a tokenizer's, feature extractor's or processor's
# save_pretrained wrote into an export.
PROCESSOR_LIST = "processor_files.json"
# What save_pretrained writes for any tokenizer or feature extractor: one of them is in every export.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "preprocessor_config.json", "processor_config.json")  # fmt: skip


def check_weight_files(folder: Path, fix: str) -> None:
    """Every *.safetensors in folder has a whole header and the bytes it announces (a truncated copy or an
    interrupted download does not), read from the header alone; else a CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{file} does not load ({err}): it is truncated or damaged; {fix}"
            ) from None


def _with_files(examples: dict, folder: Path) -> dict:
    """Example inputs that are paths: copied into folder/examples/ (numbered, suffix kept), the relative name
    in their place."""
    out, count = {}, 0
    for endpoint, rows in examples.items():
        out[endpoint] = []
        for row in rows:
            values = []
            for value in row:
                if isinstance(value, Path):
                    (folder / "examples").mkdir(exist_ok=True)
                    name = f"examples/{count:02d}-{value.name}"
                    shutil.copyfile(value, folder / name)
                    value, count = name, count + 1
                values.append(value)
            out[endpoint].append(values)
    return out


def saved_examples(export_dir: str | Path, endpoint: str, fix: str) -> list[list]:
    """The held-out inputs the recipe saved with an export for one endpoint (file names relative to the
    export, as written); what a `predict` without input runs on. `fix` is how to give input instead."""
    path = Path(export_dir) / "examples.json"
    if not Path(export_dir).is_dir():
        raise CheckpointError(f"{export_dir} is not a folder; give an export folder (RUN/export)")
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist (a recipe's export carries one, `python -m recipebox.checkpoints export` none); {fix}"
        )
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); {fix}") from None
    rows = saved.get(endpoint) if isinstance(saved, dict) else None
    if not isinstance(rows, list) or not rows:
        raise CheckpointError(f"{path} holds no {endpoint!r} examples; {fix}")
    if not all(example_row(r) for r in rows):
        raise CheckpointError(f"{path}: its {endpoint!r} examples are not rows of inputs; {fix}")
    return rows


def example_row(row) -> bool:
    """One example as the recipes save them: a text (or a file name) first, then texts or numbers (the
    other inputs of the endpoint, e.g. a causal LM's token count)."""
    return (
        isinstance(row, list)
        and bool(row)
        and isinstance(row[0], str)
        and all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in row)
    )


def saved_inputs(export_dir: str | Path, endpoint: str, fix: str) -> list:
    """The first value of each saved example: the whole input of a one-input endpoint (a text, a clip)."""
    return [row[0] for row in saved_examples(export_dir, endpoint, fix)]
