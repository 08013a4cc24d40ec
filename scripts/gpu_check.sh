#!/usr/bin/env bash
# Every check that needs a GPU, in one command sized for a short lease on one GPU: bench/gpu.sh's table first
# (the README's GPU figures), then a profile of one BERT-base MLM+NSP step (bench/profile_step.py: where the
# step's time goes, device busy or waiting for the host; the fastest configuration, --compile under
# --precision bf16-pure, whose graphs the benchmark's last MLM+NSP row has just compiled and cached; the
# README holds eager bf16's), then the `gpu`-marked tests (no host sync in any recipe's step; DeepSpeed fp16, optimizer offload
# and ZeRO-3 parameter offload, trained and resumed; the fused kernels on CUDA). Each part has its own time
# limit, so a hang in one still leaves the others' logs.
# Logs go to LOGDIR.
#   bash scripts/gpu_check.sh [LOGDIR]              # default runs/gpu-check; .venv, or $RECIPEBOX_PYTHON
#   bash scripts/gpu_check.sh [LOGDIR] --dry-run    # the same on CPU: dry runs, the gpu tests skip
# Limits in seconds: RECIPEBOX_BENCH_LIMIT (default 400; a stopped benchmark then has up to 50 s to end its
# runs and print the rows it finished), RECIPEBOX_PROFILE_LIMIT (default 90) and RECIPEBOX_TEST_LIMIT
# (default 110): 10 minutes together (the H200 run of 2026-12-04 took 7 minutes: the benchmark 297 s, the
# eager profile under a minute, the tests 106 s; since then the benchmark has three bf16-pure rows, each
# 25-40 s there).
# The tests share the GPU between RECIPEBOX_TEST_WORKERS processes (default 4, where pytest-xdist is
# installed): they check behaviour, not speed, and the benchmark has finished by then. On a GPU a skipped
# gpu test fails the check (the Python given sees no CUDA device, so nothing was tested).
set -uo pipefail
cd "$(dirname "$0")/.."
logdir=runs/gpu-check
if [[ $# -gt 0 && $1 != -* ]]; then
    logdir=$1
    shift
fi
mkdir -p -- "$logdir"
python=${RECIPEBOX_PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
dry_run=false
for arg in "$@"; do
    if [[ $arg == --dry-run ]]; then dry_run=true; fi
done

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    "$python" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__)"
} 2>&1 | tee "$logdir/machine.txt"

# DeepSpeed compiles its CPU Adam (the offload tests' optimizer) on first use, about a minute: on a GPU it
# is built beside the benchmark, which leaves the CPU cores mostly idle, not inside the tests' time limit.
if ! $dry_run; then
    timeout 300 "$python" -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
        >"$logdir/cpu-adam-build.log" 2>&1 &
    cpu_adam=$!
fi

# --foreground: the SIGTERM goes to the benchmark alone, which stops its torchrun (a session of its own)
# and prints the table; Ctrl-C here reaches it too.
timeout --foreground -k 50 "${RECIPEBOX_BENCH_LIMIT:-400}" bash bench/gpu.sh "$@" 2>&1 | tee "$logdir/bench.log"
bench=${PIPESTATUS[0]}

profile_args=(--compile --precision bf16-pure)
if $dry_run; then profile_args+=(--dry-run); fi
timeout -k 10 "${RECIPEBOX_PROFILE_LIMIT:-90}" "$python" bench/profile_step.py "${profile_args[@]}" 2>&1 \
    | tee "$logdir/profile.log"
profile=${PIPESTATUS[0]}

# Only the modules that hold gpu tests: collecting the others would import the CPU lanes' extras too.
mapfile -t modules < <(grep -l "pytest.mark.gpu" tests/test_*.py)
if [[ ${#modules[@]} -eq 0 ]]; then
    echo "error: no module in tests/ holds a pytest.mark.gpu test" | tee "$logdir/gpu-tests.log"
    tests=1
else
    if ! $dry_run && ! wait "$cpu_adam"; then
        echo "warning: DeepSpeed's CPU Adam did not build (see $logdir/cpu-adam-build.log); the offload tests will try again" >&2
    fi
    workers=()
    if "$python" -c "import xdist" 2>/dev/null; then workers=(-n "${RECIPEBOX_TEST_WORKERS:-4}"); fi
    timeout -k 10 "${RECIPEBOX_TEST_LIMIT:-110}" "$python" -m pytest -q -p no:logging -m gpu -rfEs \
        "${workers[@]}" --junitxml="$logdir/gpu-tests.xml" "${modules[@]}" 2>&1 | tee "$logdir/gpu-tests.log"
    tests=${PIPESTATUS[0]}
    # Every gpu test skips only where there is no CUDA device: on a GPU, a skip means this Python cannot
    # use it (a CPU build of torch), and nothing was checked.
    if ! $dry_run && [[ $tests == 0 ]] && grep -qE "[0-9]+ skipped" "$logdir/gpu-tests.log"; then
        echo "error: gpu tests skipped outside --dry-run: $python's torch sees no CUDA device, nothing was checked" \
            | tee -a "$logdir/gpu-tests.log"
        tests=1
    fi
fi

echo "bench/gpu.sh exit $bench, profile exit $profile, gpu tests exit $tests (124: over its time limit); logs in $logdir"
[[ $bench == 0 && $profile == 0 && $tests == 0 ]]
