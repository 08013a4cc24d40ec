#!/usr/bin/env bash
# One GPU, one command: BERT-base recipes vs transformers.Trainer, eager vs --compile, DDP vs ZeRO-2/3, as one
# markdown table (bench/bench_gpu.py). Uses .venv, or makes it with scripts/env.sh; stops when there is no GPU.
#   bash bench/gpu.sh              # under 8 minutes on one H100/H200, start-up included
#   bash bench/gpu.sh --dry-run    # the same pipeline on CPU: tiny BERT, bf16 autocast, a few steps
#   RECIPEBOX_PYTHON=python3 bash bench/gpu.sh   # a node's own CUDA PyTorch (scripts/wheelhouse.py adds the
#                                                # rest where the node has no package index)
# Other flags go to bench/bench_gpu.py (--steps, --batch-size, --peak-tflops).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=false
for arg in "$@"; do
    if [[ $arg == --dry-run ]]; then dry_run=true; fi
done

if [[ -n ${RECIPEBOX_PYTHON:-} ]]; then
    python=$(command -v "$RECIPEBOX_PYTHON") || { echo "error: RECIPEBOX_PYTHON=$RECIPEBOX_PYTHON not found" >&2; exit 2; }
    if ! "$python" -c "import accelerate, datasets, recipebox.launch, transformers" 2>/dev/null; then
        echo "error: $python lacks recipebox or its dependencies (datasets, transformers, accelerate for the Trainer rows, ...); see scripts/wheelhouse.py" >&2
        exit 2
    fi
else
    if [[ ! -x .venv/bin/python ]]; then
        echo "no .venv here: making it with scripts/env.sh" >&2
        bash scripts/env.sh
    fi
    python=.venv/bin/python
fi

if ! $dry_run; then
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
        echo "error: no GPU here (nvidia-smi is missing or finds no device); run 'bash bench/gpu.sh --dry-run' to check the pipeline on CPU" >&2
        exit 2
    fi
    if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "error: nvidia-smi sees a GPU but torch.cuda.is_available() is False: .venv has torch $("$python" -c 'import torch; print(torch.__version__)'), a CPU build or one for another CUDA driver; install a CUDA build of the same version" >&2
        exit 2
    fi
fi

exec "$python" bench/bench_gpu.py "$@"
