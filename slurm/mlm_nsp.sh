#!/usr/bin/env bash
# BERT MLM + NSP pretraining on Slurm: slurm/train.sh with the mlm_nsp recipe (torchrun per node, c10d
# rendezvous, USR1 save-and-requeue, one run folder across requeues; its knobs RUN_DIR, NPROC_PER_NODE,
# PYTHON and BACKEND_FLAGS hold here too).
#   sbatch slurm/mlm_nsp.sh [recipe flags...]        e.g. --config recipes/configs/mlm_nsp.yaml
#SBATCH --job-name=mlm_nsp
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
#   sbatch --nodes=4 --time=1-00:00:00 --partition=a100 slurm/mlm_nsp.sh --max-steps 100000
# On a CPU-only cluster (such as slurm/local_cluster.sh), ask for no GPUs and set the workers per node:
#   NPROC_PER_NODE=2 sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 --partition=local slurm/mlm_nsp.sh
# The run folder defaults to runs/mlm_nsp-<job name>[-<array task>].
set -euo pipefail

# sbatch runs a copy of this file from Slurm's spool; the shared script is found from the submit folder.
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
exec bash slurm/train.sh mlm_nsp "$@"
