#!/usr/bin/env bash
# Any recipe on Slurm: one torchrun per node (c10d rendezvous on the first node), one worker per GPU. The
# first argument names the recipe (a file in recipes/), the rest go to it. Preemption-safe: USR1 before the
# time limit (or `scancel --batch --signal=USR1 JOB`) makes every rank save at the next step and the job
# requeue itself; the requeued job resumes from the same run folder.
#   sbatch -J qa slurm/train.sh qa --config recipes/configs/qa.yaml
#   sbatch -J t5 slurm/train.sh summarization --family t5 --epochs 3
# slurm/mlm_nsp.sh and slurm/mlm_nsp_deepspeed.sh are this script for the MLM + NSP recipe.
#SBATCH --job-name=train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --partition=gpu
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Override any of the above on the command line (command-line options win over #SBATCH lines):
#   sbatch --nodes=4 --time=1-00:00:00 --partition=a100 slurm/train.sh qa --max-steps 100000
# On a CPU-only cluster (such as slurm/local_cluster.sh), ask for no GPUs and set the workers per node:
#   NPROC_PER_NODE=2 sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 --partition=local slurm/train.sh ner
#
# Environment knobs (read at run time):
#   RUN_DIR          run folder, kept across requeues      (default runs/<recipe>-<job name>[-<array task>];
#                    a job of the same name resumes it: give concurrent jobs their own name or RUN_DIR)
#   NPROC_PER_NODE   workers per node                      (default: GPUs on the node, else 1)
#   PYTHON           interpreter with recipebox installed  (default .venv/bin/python, else python3)
#   BACKEND_FLAGS    recipe flags placed before yours (slurm/mlm_nsp_deepspeed.sh sets the backend here)
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
recipe=${1:-}
if [[ -z $recipe || $recipe == */* || ! -f recipes/$recipe.py ]]; then
  known=$(cd recipes && ls -- *.py | sed 's/\.py$//' | grep -v '^__' | paste -sd ' ')
  echo "error: slurm/train.sh: the first argument names the recipe to run, one of: $known (got '$recipe');" \
    "e.g. sbatch slurm/train.sh qa --config recipes/configs/qa.yaml" >&2
  exit 2
fi
shift
RUN_DIR=${RUN_DIR:-runs/$recipe-${SLURM_JOB_NAME:-local}${SLURM_ARRAY_TASK_ID:+-$SLURM_ARRAY_TASK_ID}}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
read -r -a backend_flags <<<"${BACKEND_FLAGS:-}"

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 12000)) # under the ephemeral ports (32768 up), as launch/runtime.py
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES node(s) x $NPROC_PER_NODE worker(s)," \
  "rendezvous $MASTER_ADDR:$MASTER_PORT, run folder $RUN_DIR"

# Slurm signals every process of the step, torchrun included; torchrun must ignore USR1 (its default action
# is to die, which would end the step mid-save), while the workers install their own handler over the
# inherited ignore. srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05+); without it torchrun
# and all its workers would share one CPU wherever tasks are bound to their CPUs.
source slurm/step.sh
run_job_step srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=0 --export=ALL \
  bash -c 'trap "" USR1; exec "$@"' torchrun \
  "$PYTHON" -m torch.distributed.run \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
  --max_restarts=0 \
  "recipes/$recipe.py" --output-dir "$RUN_DIR" --requeue true ${backend_flags[@]+"${backend_flags[@]}"} "$@"
