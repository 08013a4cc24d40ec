"""Running recipes as users do, for tests: the command line, the run, its per-step losses, and killing a
torchrun job's workers. Runs compared step by step share one tokenizer (the `tokenizer_dir` fixture of conftest.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import BIN, REPO, free_port, subprocess_env

RECIPE = str(REPO / "recipes" / "mlm_nsp.py")
TINY = [
    "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
    "--max-length", "64", "--log-every", "1", "--eval-every", "0", "--tracker", "none", "--check-replicas", "true",
]  # fmt: skip


def command(out, tokenizer_dir, *extra, nproc=2, batch_size=16, steps=24):
    args = ["--output-dir", str(out), "--tokenizer", str(tokenizer_dir), "--batch-size", str(batch_size)]
    args += ["--max-steps", str(steps), "--save-every", "4", *TINY, *extra]  # later flags win
    if nproc == 1:
        return [sys.executable, RECIPE, *args]
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master-port={free_port()}", RECIPE, *args]


def torchrun(recipe: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=N RECIPE ARGS` as a user types it, from the repository root."""
    cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master-port={free_port()}", recipe, *args]
    return run(cmd, timeout=timeout)


def python(recipe: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python RECIPE ARGS`: one process (help, predict, bad input)."""
    return run([sys.executable, recipe, *args], timeout=timeout)


def run(cmd, timeout=600, **env):
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env), cwd=REPO
    )
    return proc


def losses(out) -> dict[int, float]:
    """Per-step training loss; when a resumed run logs a step again, its record wins."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            found[record["step"]] = record["train/loss"]
    return found


def final_sums(out) -> list[float]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["replica_param_sums"] for r in records if "replica_param_sums" in r][-1]


_started: list[subprocess.Popen] = []


def popen(cmd, **kwargs) -> subprocess.Popen:
    """A background process the test owns: `kill_leftovers` ends it (and its workers) when the test is over,
    whether or not the test got as far as stopping it."""
    kwargs.setdefault("env", subprocess_env())
    kwargs.setdefault("cwd", REPO)
    proc = subprocess.Popen(cmd, **kwargs)
    _started.append(proc)
    return proc


def kill_tree(proc) -> None:
    """SIGKILL a launcher and its workers (torchrun puts each worker in a session of its own)."""
    for pid in [*workers_of(proc), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_leftovers() -> None:
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            kill_tree(proc)
            proc.wait(timeout=60)


def start_and_wait_for_step(cmd, out, step):
    proc = popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and step in losses(out):
            return proc
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} never came")


def stop_then_rerun(cmd, out, step: int = 2) -> dict[int, float]:
    """SIGTERM the run once it has logged `step`: it must save and exit 75. Then the same command again, to
    the end. Returns the losses logged before the stop."""
    running = start_and_wait_for_step(cmd, out, step)
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=120) == 75
    stopped = losses(out)
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-2000:]
    return stopped


def lose_last_checkpoint_then_rerun(cmd, out, steps: int = 3) -> list[dict]:
    """Run `cmd` (`--max-steps steps`, a checkpoint at steps - 1 and steps) to the end, delete its last
    checkpoint, as a crash after the save before it would leave the run, and run the same command again: it
    resumes from steps - 1 and logs the last step again with the same loss and grad norm, bit for bit.
    Returns the training log records of both runs."""
    import shutil

    from recipebox.launch.tracking import read_metrics

    def logged() -> list[dict]:
        return [r for r in read_metrics(out) if "train/loss" in r]

    first = run(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    straight = logged()
    assert [r["step"] for r in straight] == list(range(1, steps + 1)), straight
    shutil.rmtree(out / "checkpoints" / f"step-{steps:06d}")
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed_from = out / "checkpoints" / f"step-{steps - 1:06d}"
    assert f"resumed from {resumed_from}" in again.stdout, again.stdout[-2000:]
    resumed = logged()[steps:]
    assert [r["step"] for r in resumed] == [steps]
    for key in ("train/loss", "train/grad_norm"):
        assert resumed[0][key] == straight[-1][key], (key, resumed[0][key], straight[-1][key])
    return straight + resumed


def final_metrics(records) -> dict:
    """Every key's last logged value, over a run's metrics records."""
    return {k: v for r in records for k, v in r.items()}


def sigkill_one_rank_after(cmd, out, step) -> str:
    """Start a torchrun job and SIGKILL its rank 1 once `step` is logged; the checkpoint named in `latest`
    (the one before `step`, or a later one when a busy machine let the job run on before the kill landed)."""
    proc = start_and_wait_for_step(cmd, out, step)
    os.kill(workers_of(proc)[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    return (out / "checkpoints" / "latest").read_text()


def workers_of(proc) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def export_checkpoint(ckpt, dest):
    """`python -m recipebox.checkpoints export CKPT DEST`, as a user runs it with no process group; DEST."""
    proc = run([sys.executable, "-m", "recipebox.checkpoints", "export", str(ckpt), str(dest)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dest


def same_weights(a_dir, b_dir) -> bool:
    """Two exported folders hold the same tensor names and bit-identical values."""
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


SLURM_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def sbatch(args: list[str], env: dict[str, str]) -> str:
    """`sbatch --parsable ARGS` from the repository root; the job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().split(";")[0]


def slurm_job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    match = re.search(rf"\b{name}=(\S+)", out.stdout)
    return match.group(1) if match else ""


def wait_for_job(job_id: str, timeout: float) -> str:
    """The job's final JobState (COMPLETED when its script exited 0), looked up every 0.3 s. `sbatch --wait`
    polls at 2, 10 and 42 s: a 12-second job came back after 42."""
    deadline = time.monotonic() + timeout
    while (state := slurm_job_field(job_id, "JobState")) not in SLURM_DONE:
        if time.monotonic() > deadline:
            raise AssertionError(f"Slurm job {job_id} still {state or 'unknown'} after {timeout:.0f}s")
        time.sleep(0.3)
    return state


def job_completes(job_id: str, log, timeout: float) -> str:
    """Wait for the job, assert it COMPLETED (its script exited 0); the text of its --output log."""
    state = wait_for_job(job_id, timeout)
    text = log.read_text() if log.exists() else ""
    assert state == "COMPLETED", f"job {job_id} {state}\n{text[-3000:]}"
    return text


def wandb_tables(out, key: str) -> list[dict]:
    """The W&B tables an offline run logged under `key` (e.g. "eval/samples"), oldest first, each
    {"columns": [...], "data": [[...], ...]} as wandb wrote it under RUN/wandb/offline-run-*/files/media."""
    prefix, name = key.rsplit("/", 1)
    paths = list(out.glob(f"wandb/offline-run-*/files/media/table/{prefix}/{name}_*.table.json"))
    paths.sort(key=lambda p: int(p.name.split("_")[-2]))  # <name>_<W&B's history step>_<hash>.table.json
    return [json.loads(p.read_text()) for p in paths]
