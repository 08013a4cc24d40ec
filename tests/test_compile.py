"""--compile: blocks compiled in place keep every parameter name, the backends that cannot take it say so
before training, and a compiled FSDP2 run trains, saves, resumes exactly and exports as an eager one does."""

from __future__ import annotations

import pytest
import recipe_runs
from conftest import REPO

from recipebox.launch.backends import compile_blocks
from recipebox.launch.config import ConfigError, TrainConfig, validate_train_config

RECIPE = str(REPO / "recipes" / "mlm_nsp.py")


def tiny_bert():
    from transformers import BertConfig, BertForPreTraining

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    return BertForPreTraining(config)


def test_compiled_blocks_keep_their_names():
    model = tiny_bert()
    names = list(model.state_dict())
    compile_blocks(model)
    assert list(model.state_dict()) == names and not any("_orig_mod" in n for n in names)
    assert all(layer._compiled_call_impl is not None for layer in model.bert.encoder.layer)


@pytest.mark.parametrize("backend", ["deepspeed", "xla"])
def test_compile_is_refused_where_the_backend_runs_the_model_itself(backend):
    with pytest.raises(ConfigError, match=f"--compile works with --backend ddp or fsdp; {backend}"):
        validate_train_config(TrainConfig(compile=True, backend=backend))


@pytest.mark.slow
def test_a_compiled_run_resumes_exactly_and_exports_the_same_names(tmp_path, tokenizer_dir):
    """FSDP2 on 2 ranks, the way a cluster runs --compile: blocks compiled, then sharded (inductor builds C++
    kernels on CPU: about 100 s for the first steps here). The run's last checkpoint is then lost, as in a
    crash after step 2's save, and the same command continues from step 2: step 3 again has the same loss and
    gradient norm, bit for bit, with dropout on and a graph compiled afresh for step 3's shape. DDP with
    --compile, one process, is bench/gpu.sh's dry run (tests/test_bench_gpu.py)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    out = tmp_path / "run"
    flags = ["--backend", "fsdp", "--compile", "true", "--batch-size", "8", "--save-every", "1"]
    cmd = recipe_runs.command(out, tokenizer_dir, *flags, "--eval-every", "0", "--max-steps", "3", nproc=2)
    cmd[cmd.index("--check-replicas") + 1] = "false"
    logged = recipe_runs.lose_last_checkpoint_then_rerun(cmd, out)
    # Each process compiled its blocks before its first logged step: not an eager run under another name.
    assert logged and all(r["compile/graphs"] >= 1 and "compile/graph_breaks" in r for r in logged), logged
    exported = load_file(out / "export" / "model.safetensors")
    from transformers import BertConfig, BertForPreTraining

    eager = BertForPreTraining(BertConfig.from_pretrained(out / "export")).state_dict()
    assert set(exported) <= set(eager) and not any("_orig_mod" in k for k in exported)
    saved = FileSystemReader(out / "checkpoints" / "step-000003" / "state").read_metadata()
    model_keys = [k for k in saved.state_dict_metadata if k.startswith("model.")]
    assert model_keys and not any("_orig_mod" in k for k in saved.state_dict_metadata)
