"""Typed run configuration: dataclass defaults, then a YAML file (--config), then CLI flags.

Every recipe declares one dataclass that inherits `TrainConfig`; `parse_config` turns its fields into
`--kebab-case` flags, so `--help` lists everything and a misspelt key in YAML is an error, not a no-op.
The comment after a field (`lr: float = 1e-4  # peak learning rate`) is that flag's `--help` text.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import io
import math
import signal
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration the user must fix; the message says where and how."""


def number(kind: type = int, low: float = 1, high: float | None = None):
    """An argparse `type` for options outside the config dataclasses (predict, compare, launch.submit): a
    finite `kind` in [low, high], so `--num-beams 0` is a usage error (exit 2), not a failure deep inside
    generation."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


@dataclass
class TrainConfig:
    """Options every recipe shares: where the run lives, how long and how it trains, how it is tracked."""

    output_dir: str = ""  # run folder; empty means runs/<name>
    name: str = ""  # run name; empty means the recipe's name
    seed: int = 42  # seeds new weights (models from scratch, new heads), data order, masking, dropout
    max_steps: int = 0  # optimizer steps; 0 means run --epochs
    epochs: float = 1.0  # passes over the training data (fractions allowed) when --max-steps is 0
    batch_size: int = 32  # per rank, per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (global batch: batch size x this x ranks)
    lr: float = 5e-4  # AdamW's peak learning rate, reached after the warmup, then decayed linearly to 0
    weight_decay: float = 0.01  # AdamW's decoupled weight decay (none on biases and norm weights)
    warmup_ratio: float = 0.06  # share of the optimizer steps spent warming the learning rate up from 0
    max_grad_norm: float = 1.0  # clip the gradients' global norm to this; 0: no clipping
    peak_tflops: float = 0.0  # the device's dense peak for train/mfu; 0: from launch.flops' table (GPUs)
    precision: str = (
        "auto"  # auto (bf16 on GPUs, else fp32) | fp32 | bf16 | bf16-pure | fp16 (deepspeed, GPU)
    )
    compile: bool = False  # torch.compile each transformer block (ddp, fsdp); names in checkpoints unchanged
    backend: str = "ddp"  # ddp (one process: plain) | fsdp (FSDP2, 2+ ranks) | deepspeed | xla
    zero_stage: int = 2  # --backend deepspeed: ZeRO stage 1, 2 or 3
    deepspeed_config: str = ""  # --backend deepspeed: a JSON file merged with the flags (they must agree)
    offload_optimizer: bool = False  # --backend deepspeed on GPU: optimizer state in CPU memory
    offload_params: bool = False  # --backend deepspeed ZeRO-3 on GPU: parameters in CPU memory
    xla_mode: str = "spmd"  # --backend xla: spmd (one process drives all devices, FSDPv2) | replicas
    xla_buckets: str = ""  # --backend xla: padded lengths, e.g. 32,64,128; empty: powers of 2 to max_length
    eval_every: int = 0  # steps between evaluations; 0 means only at the end
    eval_batch_size: int = 0  # per rank; 0 means --batch-size
    log_every: int = 10  # steps between train/ metrics (loss, learning rate, throughput)
    num_workers: int = 0  # DataLoader worker processes per rank
    save_every: int = 0  # steps between checkpoints; 0: only at the end and on a stop signal
    save_every_minutes: float = 0.0  # also save when this much time has passed since the last save
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    checkpoint_checksums: bool = True  # hash every checkpoint file on save, check on load; false: sizes only
    async_save: bool = (
        False  # write checkpoints in the background; training waits for the copy to host memory
    )
    resume: str = "auto"  # auto: the newest complete checkpoint of this run | never | a checkpoint folder
    stop_signals: str = "SIGTERM,SIGUSR1"  # save at the next step boundary and exit 75
    requeue: bool = False  # under Slurm, requeue the job after a stop signal's save
    tracker: str = "wandb"  # wandb | none; wandb is offline unless WANDB_API_KEY or WANDB_MODE is set
    wandb_project: str = "recipebox"  # the W&B project the run is logged to
    export: bool = True  # the Hugging Face folder export/ at the end; false: checkpoints and metrics only
    check_replicas: bool = False  # tests: ranks built alike; per-rank fingerprints of the final weights


def _field_type(tp: Any) -> type:
    """The concrete scalar type of a field annotation (`int`, `float`, `str`, `bool`)."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})  # annotations are strings under `from __future__ import annotations`
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _coerce(name: str, value: Any, tp: type, source: str) -> Any:
    if value is None or isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, int | float):
        return str(value)
    if tp is str and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a YAML list of files is the same as a comma-separated flag
    raise ConfigError(
        f"{source}: option '{name}' must be {tp.__name__}, got {value!r} ({type(value).__name__}); fix the value"
    )


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (yaml would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            name, line = key.replace("-", "_"), key_node.start_mark.line + 1
            if name in seen:
                raise _DuplicateKey(f"{key} is given twice (lines {seen[name]} and {line}); keep one")
            seen[name] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except _DuplicateKey as err:
        raise ConfigError(f"config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err}); save it as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of option: value, not {type(data).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def field_help(cls: type) -> dict[str, str]:
    """Each field's comment in its class body, `name: type = default  # comment` (also a comment inside a
    default wrapped in parentheses); a subclass's comment wins, a field it redeclares without one keeps its
    base class's."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source file (a class made at run time): no help text
            continue
        helps.update(_body_comments(source))
    return helps


def _body_comments(source: str) -> dict[str, str]:
    comments: dict[str, str] = {}
    body_col, field, at_start, prev = None, None, False, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT and body_col is None:
            body_col = len(tok.string)
        if tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            field, at_start = None, True
            continue
        if tok.type == tokenize.COMMENT and field:
            text = tok.string.lstrip("#").strip()
            comments[field] = f"{comments[field]} {text}" if field in comments else text
        elif tok.type == tokenize.OP and tok.string == ":" and prev is not None and prev.start[1] == body_col:
            field = prev.string  # `name:` at the start of a statement in the class body
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok if at_start and tok.type == tokenize.NAME else None
            at_start = False
    return comments


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def parse_config(cls: type, argv: list[str] | None = None, description: str | None = None):
    """Build `cls` from defaults < YAML (--config) < CLI flags; unknown keys and bad values raise ConfigError."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    # Each option's help names its real default itself: argparse's default is None (meaning "not given").
    # The description keeps its line breaks (the recipes' docstrings list launch commands one per line).
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    helps = field_help(cls)
    parser.add_argument("--config", help="YAML file of options; CLI flags override it")
    # The deepspeed launcher appends --local_rank=N; the runtime reads LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for name, field in fields.items():
        tp = _field_type(hints[name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = "" if default is None else f"(default: {_shown(default)})"  # None: the comment says what
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": None,
            "help": f"{helps.get(name, '')} {shown}".strip().replace("%", "%%"),  # argparse formats with %
        }
        kwargs["type"] = _parse_bool if tp is bool else tp
        if tp is bool:
            kwargs["metavar"] = "{true,false}"
        if name == "backend":
            from recipebox.launch.backends import BACKENDS

            kwargs["choices"] = list(BACKENDS)
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    if args.config:
        loaded = load_yaml(args.config)
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise ConfigError(
                f"config file {args.config}: unknown option(s) {', '.join(unknown)}; "
                f"run with --help to see the valid ones"
            )
        for key, value in loaded.items():
            if value is None and fields[key].default is not None:
                raise ConfigError(
                    f"config file {args.config}: option '{key}' has no value; give it one or delete the line"
                )
            values[key] = _coerce(key, value, _field_type(hints[key]), f"config file {args.config}")
    for name in fields:
        cli_value = getattr(args, name)
        if cli_value is not None:
            values[name] = cli_value
    return cls(**values)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), encoding="utf-8")


def check_choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")


# Numbers with a range, in whichever recipe's config has them: (in range?, the range in words).
RANGES = {
    "lr": (lambda v: v > 0, "above 0"),
    "epochs": (lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more"),
    "num_workers": (lambda v: v >= 0, "0 (load in the training process) or more"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "max_grad_norm": (lambda v: v >= 0, "0 (no clipping) or more"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "from 0 to 1"),
    "save_every_minutes": (lambda v: v >= 0, "0 (off) or more"),
    "peak_tflops": (lambda v: v >= 0, "0 (the device's own) or more"),
    "temperature": (lambda v: v >= 0, "0 (greedy) or more"),
    "top_p": (lambda v: 0 < v <= 1, "above 0 and at most 1"),
    "max_new_tokens": (lambda v: v is None or v >= 1, "at least 1"),
    "num_beams": (lambda v: v is None or v >= 1, "at least 1"),
    "pad_to_multiple_of": (lambda v: v >= 1, "at least 1 (1: no rounding up)"),
    "pad_to_length": (lambda v: v >= 0, "0 (each batch's longest) or more"),
    # The sizes of a model built from scratch (a head count of 0 would divide by zero in the width check).
    **{
        name: (lambda v: v >= 1, "at least 1")
        for name in (
            "hidden_size",
            "d_model",
            "n_embd",
            "num_heads",
            "heads",
            "n_head",
            "num_layers",
            "layers",
            "n_layer",
            "intermediate_size",
            "ffn",
            "conv_channels",
            "vocab_size",
        )  # fmt: skip
    },
    **{
        name: (lambda v: 0 <= v <= 1, "a probability, from 0 to 1")
        for name in (
            "dropout",
            "layerdrop",
            "mlm_probability",
            "mask_replace_prob",
            "random_replace_prob",
            "mask_time_prob",
        )  # fmt: skip
    },
}


FSDP_NEEDS_RANKS = "--backend fsdp shards across ranks: launch with torchrun --nproc_per_node=2 or more"
FP16_NEEDS_DEEPSPEED = "--precision fp16 is available with --backend deepspeed on a GPU; use bf16 here"
XLA_PRECISIONS = ("auto", "fp32", "bf16")


def check_backend_precision(backend: str, precision: str) -> None:
    """A precision the backend cannot run, refused by validate_train_config before any data is read. The
    backends refuse it again when built without validation: XLABackend through this function, ddp and fsdp
    in resolve_precision (fp16, with the same message)."""
    if precision == "fp16" and backend != "deepspeed":
        raise ConfigError(FP16_NEEDS_DEEPSPEED)
    if backend == "xla" and precision not in XLA_PRECISIONS:
        raise ConfigError(
            f"--backend xla supports --precision {', '.join(XLA_PRECISIONS)}, not {precision!r}"
        )


def check_ranges(cfg) -> None:
    """Every number of RANGES that `cfg` has is in its range, or a ConfigError naming the flag: before any
    process group, data or model (torch would refuse some only at the first step, and take others)."""
    for name, (ok, words) in RANGES.items():
        if hasattr(cfg, name) and not ok(value := getattr(cfg, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {words}, got {value}")


def check_model_path(name: str) -> None:
    """--model as a path (/, ./, ../ or ~): the folder exists and its safetensors files are whole; a hub name
    is left to the hub. Before anything loads, for every recipe that takes --model."""
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.exists():
        raise ConfigError(
            f"--model {name}: no such folder; give a model folder (config.json, model.safetensors and the "
            "tokenizer files) or a hub name"
        )
    if path.is_dir():
        from recipebox.checkpoints.export import check_weight_files

        check_weight_files(path, fix=f"copy or export --model {name} again")


def validate_train_config(cfg: TrainConfig) -> None:
    check_ranges(cfg)
    if getattr(cfg, "model", ""):
        check_model_path(cfg.model)
    check_choice(cfg, "precision", ("auto", "fp32", "bf16", "bf16-pure", "fp16"))
    check_choice(cfg, "tracker", ("wandb", "none"))
    if cfg.tracker == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "--tracker wandb (the default) needs the wandb package: pip install wandb, or pass --tracker none"
            )
    from recipebox.launch.backends import BACKENDS

    check_choice(cfg, "backend", tuple(BACKENDS))
    check_choice(cfg, "xla_mode", ("spmd", "replicas"))
    check_backend_precision(cfg.backend, cfg.precision)
    from recipebox.launch.runtime import launched_world_size

    world = launched_world_size()
    if cfg.backend == "fsdp" and world < 2:
        raise ConfigError(FSDP_NEEDS_RANKS)
    if cfg.backend == "deepspeed":  # the JSON and the flags must agree before any process group starts
        import torch

        from recipebox.launch.deepspeed_config import build_deepspeed_config

        build_deepspeed_config(cfg, world, "cuda" if torch.cuda.is_available() else "cpu")
    if cfg.async_save and cfg.backend in ("deepspeed", "xla"):
        raise ConfigError(
            f"--async-save works with --backend ddp or fsdp (torch.distributed.checkpoint); {cfg.backend} "
            "writes its own checkpoint format synchronously: drop --async-save"
        )
    if cfg.compile and cfg.backend in ("deepspeed", "xla"):
        raise ConfigError(
            f"--compile works with --backend ddp or fsdp; {cfg.backend} runs the model its own way "
            "(XLA compiles whole graphs itself, DeepSpeed wraps the model): drop --compile"
        )
    if cfg.backend == "xla" and importlib.util.find_spec("torch_xla") is None:
        raise ConfigError(
            "--backend xla needs torch_xla, which this Python lacks: run the recipe with .venv-xla/bin/python "
            "(bash scripts/env_xla.sh makes it, or $RECIPEBOX_XLA_VENV; docs/xla.md)"
        )
    if cfg.eval_batch_size < 0:
        raise ConfigError(
            f"--eval-batch-size must be 0 (same as --batch-size) or more, got {cfg.eval_batch_size}"
        )
    for name in ("batch_size", "grad_accum", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_steps < 0 or cfg.epochs <= 0 and cfg.max_steps == 0:
        raise ConfigError("give a positive --max-steps or a positive --epochs")
    for name in filter(None, cfg.stop_signals.split(",")):
        if not hasattr(signal, name.strip()):
            raise ConfigError(f"--stop-signals: unknown signal {name!r}; use names such as SIGTERM,SIGUSR1")
    resume = Path(cfg.resume)
    pointer = resume.name == "latest" and resume.is_file()  # RUN/checkpoints/latest: the step it names
    if cfg.resume not in ("auto", "never") and not (resume.is_dir() or pointer):
        raise ConfigError(
            f"--resume {cfg.resume}: no such checkpoint folder; use auto, never, a step-* folder or its latest"
        )
    if pointer:  # caught here, before the data is read, rather than when the run resumes
        from recipebox.checkpoints.sharded import (  # the rule resume itself follows
            CheckpointError,
            checkpoint_folder,
        )

        try:
            found = checkpoint_folder(resume).is_dir()
        except (CheckpointError, ValueError):  # not a step-* name, or not text
            found = False
        if not found:
            named = resume.read_text(encoding="utf-8", errors="replace").strip()
            raise ConfigError(
                f"--resume {cfg.resume} names {named!r}, which is no step-* folder beside it; pass a step-* folder"
            )
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
