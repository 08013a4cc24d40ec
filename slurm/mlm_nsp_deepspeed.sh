#!/usr/bin/env bash
# BERT MLM + NSP pretraining on Slurm with DeepSpeed ZeRO-2: the same job as slurm/mlm_nsp.sh (torchrun per
# node, c10d rendezvous, USR1 save-and-requeue, one run folder across requeues) with the deepspeed backend.
# Submit from the repository root:
#   sbatch slurm/mlm_nsp_deepspeed.sh [recipe flags...]      e.g. --offload-optimizer true
#SBATCH --job-name=mlm_nsp_deepspeed
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
# Command-line options win over the lines above; on the CPU-only local cluster:
#   NPROC_PER_NODE=2 sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 --partition=local \
#     slurm/mlm_nsp_deepspeed.sh
# ZERO_STAGE (default 2) picks the ZeRO stage; RUN_DIR, NPROC_PER_NODE and PYTHON as in slurm/train.sh.
set -euo pipefail

# sbatch runs a copy of this file from Slurm's spool; the shared script is found from the submit folder.
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
export BACKEND_FLAGS="--backend deepspeed --zero-stage ${ZERO_STAGE:-2}"
exec bash slurm/train.sh mlm_nsp "$@"
