#!/usr/bin/env bash
# The main job: install, pretrain BERT (MLM + NSP) on the bundled toy corpus with 2 ranks, show predictions.
# Extra arguments go to the recipe, e.g. scripts/quickstart.sh --max-steps 50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run=${RUN_DIR:-runs/quickstart}
.venv/bin/torchrun --nproc_per_node=2 recipes/mlm_nsp.py --output-dir "$run" "$@"
.venv/bin/python recipes/mlm_nsp.py predict "$run/export"
echo "try it in the browser: .venv/bin/python demos/app.py $run/export"
