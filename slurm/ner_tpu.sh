#!/usr/bin/env bash
# NER fine-tuning on a TPU host with torch_xla: one process drives every chip of the host through an SPMD
# mesh (FSDPv2, mesh axis `fsdp`), batches padded to a few bucket lengths. Preemption-safe like
# slurm/train.sh: USR1 before the time limit (or `scancel --batch --signal=USR1 JOB`) saves at the next
# step and requeues the job, which resumes from the same run folder.
#   sbatch slurm/ner_tpu.sh [recipe flags...]          e.g. --config recipes/configs/ner.yaml
#SBATCH --job-name=ner_tpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --time=02:00:00
#SBATCH --partition=tpu
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Once per TPU host, from the repository root: the XLA environment with libtpu (torch 2.9 + torch_xla[tpu] 2.9):
#   RECIPEBOX_XLA_EXTRA=tpu bash scripts/env_xla.sh
# Without a TPU, XLA runs on the CPU with N virtual devices (the local cluster of slurm/local_cluster.sh):
#   bash scripts/env_xla.sh && bash slurm/local_cluster.sh up
#   PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 sbatch --wait --partition=local --cpus-per-task=2 slurm/ner_tpu.sh \
#     --max-steps 20 --tracker none
#
# Environment knobs (read at run time):
#   RUN_DIR          run folder, kept across requeues        (default runs/ner_tpu-<job name>[-<array task>])
#   PYTHON           interpreter with torch_xla and recipebox (default .venv-xla/bin/python)
#   PJRT_DEVICE      TPU (default) or CPU; CPU_NUM_DEVICES sets the virtual device count on CPU
#   XLA_FLAGS etc.   passed on unchanged
set -euo pipefail

# sbatch runs a copy of this file from Slurm's spool; the repository is the submit folder.
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
RUN_DIR=${RUN_DIR:-runs/ner_tpu-${SLURM_JOB_NAME:-local}${SLURM_ARRAY_TASK_ID:+-$SLURM_ARRAY_TASK_ID}}
PYTHON=${PYTHON:-.venv-xla/bin/python}
export PJRT_DEVICE=${PJRT_DEVICE:-TPU}
if ! "$PYTHON" -c "import torch_xla" 2>/dev/null; then
  echo "error: $PYTHON cannot import torch_xla; run 'RECIPEBOX_XLA_EXTRA=tpu bash scripts/env_xla.sh'" \
    "on the TPU host (plain 'bash scripts/env_xla.sh' for XLA on CPU), or set PYTHON" >&2
  exit 2
fi
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: PJRT_DEVICE=$PJRT_DEVICE" \
  "${CPU_NUM_DEVICES:+CPU_NUM_DEVICES=$CPU_NUM_DEVICES }run folder $RUN_DIR"

source slurm/step.sh
run_job_step srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=0 --export=ALL \
  "$PYTHON" recipes/ner.py --backend xla --output-dir "$RUN_DIR" --requeue true "$@"
