"""The DeepSpeed config of a run: generated from the recipe's flags, or a user's JSON file merged with them.

Pure Python, no deepspeed import: it runs while the config is validated, before any process group starts,
so a contradiction between the JSON and the flags, or malformed JSON, stops every rank with one message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipebox.launch.config import ConfigError
from recipebox.launch.runtime import bf16_native

# JSON key path -> the flag that owns it. "auto" in the JSON means "take the flag's value".
_OWNED = {
    ("train_micro_batch_size_per_gpu",): "batch_size",
    ("gradient_accumulation_steps",): "grad_accum",
    ("gradient_clipping",): "max_grad_norm",
    ("zero_optimization", "stage"): "zero_stage",
}


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def read_user_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--deepspeed-config {path}: no such file; pass an existing DeepSpeed JSON file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--deepspeed-config {path}: not valid JSON ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed-config {path}: must hold a JSON object, not {type(data).__name__}")
    return data


def build_deepspeed_config(cfg, world_size: int, device_type: str) -> dict[str, Any]:
    """The config handed to deepspeed.initialize. Raises ConfigError naming the file, the key and the fix."""
    if cfg.zero_stage not in (1, 2, 3):
        raise ConfigError(f"--zero-stage must be 1, 2 or 3, got {cfg.zero_stage}")
    source = f"--deepspeed-config {cfg.deepspeed_config}"
    user = read_user_config(cfg.deepspeed_config) if cfg.deepspeed_config else {}
    ds = json.loads(json.dumps(user))  # a deep copy
    for path, flag in _OWNED.items():
        mine, theirs = getattr(cfg, flag), _get(user, path)
        if theirs not in (None, "auto") and theirs != mine:
            raise ConfigError(
                f"{source}: {'.'.join(path)} is {theirs!r} but --{flag.replace('_', '-')} is {mine!r}; "
                f'make them agree, or set it to "auto" in the JSON to take the flag'
            )
        _set(ds, path, mine)
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    if user.get("train_batch_size") not in (None, "auto", global_batch):
        raise ConfigError(
            f"{source}: train_batch_size is {user['train_batch_size']} but batch size x accumulation x ranks "
            f"is {cfg.batch_size} x {cfg.grad_accum} x {world_size} = {global_batch}; drop it or make it agree"
        )
    ds["train_batch_size"] = global_batch
    for section in ("optimizer", "scheduler"):
        if section in user:
            raise ConfigError(
                f"{source}: remove the {section!r} section; the recipe's --lr, --weight-decay and warmup + "
                f"linear-decay schedule drive DeepSpeed, so a run reads the same under every backend"
            )
    _merge_precision(cfg, user, ds, source, device_type)
    _merge_offload(cfg, ds, source, device_type)
    ds.setdefault("steps_per_print", 10**9)  # the loop logs; DeepSpeed's own step printing stays quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _merge_precision(cfg, user: dict, ds: dict, source: str, device_type: str) -> None:
    """bf16.enabled / fp16.enabled in the JSON and --precision: one precision, or a ConfigError; under
    --precision auto the JSON's choice wins, then bf16 on GPUs that have it natively, else fp32."""
    said = {k: _get(user, (k, "enabled")) for k in ("fp16", "bf16")}  # "auto" (HF's template): the flag's
    said = {k: v if v in (True, False) else None for k, v in said.items()}
    on = [k for k, v in said.items() if v is True]
    if len(on) == 2:
        raise ConfigError(
            f"{source}: fp16.enabled and bf16.enabled are both true; DeepSpeed takes one, keep one"
        )
    if cfg.precision != "auto":  # DeepSpeed's bf16 is bf16-pure already: a bf16 model, fp32 masters
        wanted = "bf16" if cfg.precision == "bf16-pure" else cfg.precision
        for key, value in said.items():
            if value is not None and value != (key == wanted):  # an explicit true or false that disagrees
                raise ConfigError(
                    f"{source}: {key}.enabled is {str(value).lower()} but --precision is {cfg.precision}; "
                    f'pick one (or leave "enabled" out of the JSON)'
                )
    elif on:
        wanted = on[0]
    else:
        native = device_type == "cuda" and bf16_native()
        wanted = "bf16" if native and said["bf16"] is not False else "fp32"
    if wanted == "fp16" and device_type != "cuda":
        raise ConfigError(
            f"{source if said['fp16'] else '--precision fp16'}: fp16 needs a GPU (DeepSpeed refuses it on "
            f"CPU); use bf16 or fp32 here"
        )
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": wanted == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": wanted == "fp16"}


def _merge_offload(cfg, ds: dict, source: str, device_type: str) -> None:
    zero = ds.setdefault("zero_optimization", {})
    if cfg.offload_params and cfg.zero_stage != 3:
        raise ConfigError("--offload-params needs --zero-stage 3 (only ZeRO-3 partitions parameters)")
    for flag, key in (("offload_optimizer", "offload_optimizer"), ("offload_params", "offload_param")):
        if getattr(cfg, flag):  # the JSON's own block (nvme, buffer counts) is kept; only its device must fit
            block = zero.get(key) or {}
            if block.get("device", "cpu") not in ("cpu", "nvme"):
                raise ConfigError(
                    f"{source}: zero_optimization.{key}.device is {block['device']!r} but "
                    f"--{flag.replace('_', '-')} is true; make them agree"
                )
            zero[key] = {"device": "cpu", "pin_memory": True, **block}
    offloading = any(
        _get(zero, (k, "device")) not in (None, "none") for k in ("offload_optimizer", "offload_param")
    )
    if offloading and device_type != "cuda":
        raise ConfigError(
            f"{'--offload-optimizer/--offload-params' if cfg.offload_optimizer or cfg.offload_params else source}"
            f": offload moves state from GPU to CPU memory; on a CPU-only run everything already is there, so "
            f"drop it"
        )


def offloads(ds: dict) -> bool:
    """Whether the optimizer state lives in CPU memory or on NVMe: then DeepSpeed's CPU Adam, built from the
    config, must replace the client optimizer (parameter offload alone keeps the client optimizer, and
    so needs no fused op compiled)."""
    return _get(ds.get("zero_optimization", {}), ("offload_optimizer", "device")) in ("cpu", "nvme")
