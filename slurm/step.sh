# Sourced by the sbatch scripts (train.sh, ner_tpu.sh): `run_job_step srun ...` starts the job step in the
# background, passes on a USR1 that reaches the batch shell (only it gets `--signal=B:USR1`), waits for the
# step and exits with its status. The recipe saves on USR1, exits 75 and, with --requeue, asks Slurm to
# requeue the job.

forward_usr1() {
  echo "batch shell: USR1 received, asking the training step to save and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID.0" 2>/dev/null || kill -USR1 "$srun_pid"
}

run_job_step() {
  trap forward_usr1 USR1
  "$@" &
  srun_pid=$!
  # `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
  local status=0
  while true; do
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  echo "training step ended with status $status"
  exit "$status"
}
