"""Command line for checkpoints: `python -m recipebox.checkpoints export CHECKPOINT OUT` and `verify CHECKPOINT`.

Export turns any complete checkpoint into a Hugging Face folder without the recipe that made it: the model
config and the processor (tokenizer, feature extractor) travel inside the checkpoint, the weights are read with torch.distributed.checkpoint
or DeepSpeed's loaders, weights-only (a pickled object beyond weights and plain state is refused, not run), and
the folder loads with `transformers.pipeline`.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from recipebox.checkpoints.export import processor_folder
from recipebox.checkpoints.sharded import (
    CheckpointError,
    checkpoint_folder,
    loading_safely,
    tied_aliases,
    verify_checkpoint,
)

# A checkpoint whose tensors do not fit the model its own hf/config.json builds: not one a recipe saved whole.
EXPORT_FIX = "its weights were not saved from the model {hf} describes; export a checkpoint a recipe wrote"


def export_checkpoint(path: str | Path, out: str | Path, checksums: bool = True) -> Path:
    import torch.distributed.checkpoint as dcp
    import transformers

    from recipebox.checkpoints.export import check_export_target, export_hf
    from recipebox.checkpoints.storage import RawReader

    path = Path(path)
    check_export_target(out)  # before any reading: the answer does not depend on the checkpoint
    meta = verify_checkpoint(path, checksums=checksums, report=print)["meta"]
    hf = path / "hf"
    if not (hf / "config.json").is_file():
        raise CheckpointError(
            f"{path}: no hf/config.json, so the model cannot be rebuilt; it was not saved by a recipe"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(hf)
        processor = load_processor(hf)
    except Exception as err:  # noqa: BLE001 (tokenizers raises a plain Exception for a bad tokenizer.json)
        raise CheckpointError(
            f"{hf}: the model config or processor saved there does not load ({err})"
        ) from None
    arch = (config.architectures or [None])[0]
    model_class = getattr(transformers, arch or "", None)
    if model_class is None:
        raise CheckpointError(f"{hf / 'config.json'}: unknown architecture {arch!r}")
    model = model_class(config)
    prefix = meta.get("export", {}).get("model_prefix", "")
    if meta.get("state_format", "dcp") == "deepspeed":
        _load_deepspeed_weights(model, path, prefix)
    else:
        own = model.state_dict()
        aliases = tied_aliases(own)  # written once (older and XLA checkpoints hold them twice: not read)
        wanted = {"model": {prefix + k: v for k, v in own.items() if k not in aliases}}
        with loading_safely(path, misfit_fix=EXPORT_FIX):
            dcp.load(wanted, storage_reader=RawReader(path / "state"), no_dist=True)
        loaded = {k[len(prefix) :]: v for k, v in wanted["model"].items()}
        model.load_state_dict({**loaded, **{alias: loaded[key] for alias, key in aliases.items()}})
    metrics = path.parent.parent / "metrics.jsonl"  # RUN/checkpoints/step-N: the run's curves, if it is there
    return export_hf(
        model,
        processor,
        out,
        title=f"{arch} from {path.name}",
        metrics={},
        config={"checkpoint": str(path), **meta},
        metrics_file=metrics if metrics.is_file() else None,
    )


PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")  # a feature extractor is in it


def load_processor(hf: Path):
    """The run's processor saved with the checkpoint (hf/processor; hf/tokenizer in older checkpoints)."""
    import transformers

    folder = processor_folder(hf)
    if not folder.is_dir():
        return None
    if any((folder / config).is_file() for config in PROCESSOR_CONFIGS):
        return transformers.AutoProcessor.from_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def _load_deepspeed_weights(model, path: Path, prefix: str) -> None:
    """The fp32 weights of any ZeRO stage, consolidated from DeepSpeed's shards in this process.

    DeepSpeed stores one copy of tied weights (BERT's decoder is its word embeddings); the model ties them
    again, and any other missing weight is an error rather than a silently random layer."""
    import torch

    from recipebox.checkpoints.deepspeed import SAFE_CLASSES, TAG, import_deepspeed

    try:
        import_deepspeed()
    except ImportError:
        raise CheckpointError(
            f'{path} was saved by DeepSpeed, which is not installed here; pip install -e ".[deepspeed]"'
        ) from None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with torch.no_grad(), loading_safely(path, SAFE_CLASSES, misfit_fix=EXPORT_FIX):
        state = get_fp32_state_dict_from_zero_checkpoint(str(path / "state"), tag=TAG)
    ours = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(ours, strict=False)
    model.tie_weights()
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{path}: DeepSpeed weights do not fit {type(model).__name__} "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def _is_tied(model, key: str) -> bool:
    out = model.get_output_embeddings()
    return (
        out is not None
        and key.endswith("weight")
        and out.weight is model.get_input_embeddings().weight
        and (dict(model.named_parameters(remove_duplicate=False)).get(key) is out.weight)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipebox.checkpoints", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a Hugging Face folder from a checkpoint")
    exp.add_argument("checkpoint")
    exp.add_argument("out")
    ver = sub.add_parser(
        "verify", help="check that every file of a checkpoint is present, whole and unaltered"
    )
    ver.add_argument("checkpoint")
    for p in (exp, ver):
        p.add_argument("--sizes-only", action="store_true", help="skip the content hashes (reads no file)")
    args = parser.parse_args(argv)
    try:
        args.checkpoint = checkpoint_folder(args.checkpoint)
        if args.command == "export":
            print(f"exported to {export_checkpoint(args.checkpoint, args.out, not args.sizes_only)}")
        else:
            manifest = verify_checkpoint(args.checkpoint, checksums=not args.sizes_only, report=print)
            checked = (
                "sizes" if args.sizes_only or "hashes" not in manifest else f"sizes and {manifest['hash']}"
            )
            print(
                f"{args.checkpoint}: complete, step {manifest['step']}, {len(manifest['files'])} files ({checked})"
            )
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # writing the export: a full disk, a quota, a folder made read-only meanwhile
        print(f"error: {args.out if args.command == 'export' else args.checkpoint}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    gc.freeze()  # spares the exit's garbage collections a walk over torch's objects (about a second)
    sys.exit(code)
