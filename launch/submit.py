"""Submit recipes to Slurm (or run them locally) with submitit: one run, or a job array over a grid.

Every task runs the recipe as a child process in its own run folder. On a timeout or preemption signal
the task asks the recipe to save (SIGUSR1), waits for it, and requeues; the requeued task resumes from
the newest checkpoint. When an array finishes, `results.csv` and `results.md` list every task's final
metrics, or its failure and log path. See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import submitit
except ImportError:  # the slurm extra
    NEEDS = 'recipebox.launch.submit needs submitit: pip install -e ".[slurm]" (or pip install submitit)'
    if __name__ == "__main__":
        print(f"error: {NEEDS}", file=sys.stderr)
        sys.exit(2)
    raise ImportError(NEEDS) from None

from recipebox.launch.config import number
from recipebox.launch.tracking import read_metrics

EXIT_PREEMPTED = 75  # the recipe saved after a stop signal (launch.loop.EXIT_PREEMPTED)
REPO = Path(__file__).resolve().parent.parent
_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")


class SubmitError(ValueError):
    """A submission the user must fix; the message names the input and the fix."""


class RecipeFailed(RuntimeError):
    """The recipe exited with an error inside a task."""


@dataclass
class SlurmOptions:
    """What each task asks the scheduler for. Ignored fields: `partition` and `account` on the local executor."""

    partition: str = ""
    account: str = ""
    timeout_min: int = 60
    gpus_per_node: int = 0  # one recipe process per GPU; 0: one process on CPUs
    cpus_per_task: int = 1
    mem_gb: float = 0  # 0: the partition's default
    signal_delay_s: int = 120  # the save-and-requeue signal comes this long before the time limit
    max_requeues: int = 3  # timeouts survived before a task gives up (preemptions do not count)
    array_parallelism: int = 64
    extra: dict[str, Any] = field(default_factory=dict)  # more submitit slurm_* parameters


TORCHRUN_VARIABLES = frozenset(
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}
)


def _ignore_scheduler_signals() -> None:
    # The scheduler signals every process of the job; SIGTERM and the submitit signal belong to the task
    # process, which turns them into exactly one SIGUSR1 for the recipe (a second one would mean "now").
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)


class RecipeRun(submitit.helpers.Checkpointable):
    """One recipe run as a submitit task: a child process in `run_dir`; resumable, so requeue-safe."""

    def __init__(self, recipe: str, args: list[str], run_dir: str, python: str = sys.executable):
        self.recipe, self.args, self.run_dir, self.python = recipe, list(args), run_dir, python
        self._child: subprocess.Popen | None = None

    def command(self) -> list[str]:
        # Ours come last so they win: the task owns the run folder, the stop signal and the requeue.
        extra = ["--output-dir", self.run_dir, "--stop-signals", "SIGUSR1", "--requeue", "false"]
        return [self.python, self.recipe, *self.args, *extra]

    @staticmethod
    def child_env() -> dict[str, str]:
        # The ranks of a task come from Slurm (launch.runtime reads SLURM_PROCID); torchrun's variables left
        # in the submitting shell would win over them and make the recipe wait for ranks that never come.
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def __call__(self) -> dict[str, Any]:
        env = self.child_env()
        # The working folder is the one the job was submitted from, so relative paths in the flags hold.
        self._child = subprocess.Popen(self.command(), env=env, preexec_fn=_ignore_scheduler_signals)
        # poll(), not wait(): the checkpoint handler interrupts this loop and must be able to reap the child.
        while self._child.poll() is None:
            time.sleep(0.5)
        code = self._child.returncode
        if code == 0:
            return final_metrics(self.run_dir)
        if code == EXIT_PREEMPTED:  # someone signalled the recipe directly: requeue the submitit way
            signal.raise_signal(submitit.JobEnvironment._usr_sig())
            time.sleep(60)  # on ranks > 0, the requeue by rank 0 ends this process
        raise RecipeFailed(f"{self.recipe} exited with status {code} (run folder {self.run_dir})")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGUSR1)
            while child.poll() is None:  # the recipe saves at its next step boundary, then exits 75
                time.sleep(0.2)
            print(f"recipe saved and stopped (status {child.returncode}); requeueing", flush=True)
        return super().checkpoint(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_child": None}


def final_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The newest value of every scalar metric in RUN/metrics.jsonl (a resumed run appends to it)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    latest: dict[str, Any] = {}
    for record in read_metrics(run_dir):
        for key, value in record.items():
            if key != "time" and isinstance(value, int | float) and not isinstance(value, bool):
                latest[key] = value
    return latest


def parse_grid(specs: list[str]) -> list[dict[str, str]]:
    """["lr=1e-3,5e-4", "seed=1,2"] -> the 4 combinations, in order; a malformed spec raises SubmitError."""
    axes: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        items = [v.strip() for v in values.split(",")]
        if not sep or not _KEY.match(key) or not all(items):
            raise SubmitError(
                f"grid entry {spec!r} is malformed; write OPTION=V1,V2,... (for example lr=1e-3,5e-4)"
            )
        if key in axes:
            raise SubmitError(f"grid option {key!r} is given twice; list all its values in one entry")
        if len(set(items)) < len(items):
            raise SubmitError(f"grid entry {spec!r} lists a value twice; two tasks would be one run")
        axes[key] = items
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def resolve_recipe(recipe: str | Path) -> Path:
    path = Path(recipe)
    if not path.is_absolute() and not path.exists():
        path = REPO / path
    if not path.is_file() or path.suffix != ".py":
        known = ", ".join(sorted(p.relative_to(REPO).as_posix() for p in (REPO / "recipes").glob("*.py")))
        raise SubmitError(f"recipe {recipe} is not a file; give a recipe script such as {known}")
    return path.resolve()


@functools.cache
def _recipe_options(recipe: Path, python: str) -> frozenset[str]:
    out = subprocess.run([python, str(recipe), "--help"], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SubmitError(f"{recipe} --help failed (status {out.returncode}):\n{out.stderr.strip()[-2000:]}")
    # The option list's own lines only: help texts and the description also mention flags (and torchrun's)
    return frozenset(re.findall(r"^  (?:-\w, )?--([a-z][a-z0-9-]*)", out.stdout, re.MULTILINE))


def check_options(recipe: Path, args: list[str], grid_keys: list[str], python: str = sys.executable) -> None:
    """Stop before anything is queued when a flag or grid option is not one the recipe knows."""
    known = _recipe_options(recipe, python)
    given = [a[2:].split("=")[0] for a in args if a.startswith("--")]
    given += [k.replace("_", "-") for k in grid_keys]
    unknown = sorted({g for g in given if g not in known})
    if unknown:
        raise SubmitError(
            f"{recipe.name} has no option {', '.join('--' + u for u in unknown)}; "
            f"see `python {recipe.relative_to(REPO) if recipe.is_relative_to(REPO) else recipe} --help`"
        )


def make_executor(cluster: str, folder: str | Path, options: SlurmOptions, name: str) -> submitit.Executor:
    if cluster == "slurm":
        try:  # asks slurmctld, so a stopped controller is caught here, not by a failed sbatch
            subprocess.run(
                ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", None) or str(err)
            raise SubmitError(
                f"no Slurm cluster answers (sinfo: {detail.strip()}); start the local one with "
                "`bash slurm/local_cluster.sh up`, or run with --cluster local"
            ) from None
        executor: submitit.Executor = submitit.SlurmExecutor(
            folder=folder, python=shlex.quote(sys.executable)
        )
        params: dict[str, Any] = {
            "job_name": name,
            "time": options.timeout_min,
            "ntasks_per_node": max(1, options.gpus_per_node),
            "cpus_per_task": options.cpus_per_task,
            "signal_delay_s": options.signal_delay_s,
            "array_parallelism": options.array_parallelism,
            "stderr_to_stdout": True,  # one log per task, the path the results table names
            "additional_parameters": {"requeue": True},
            **options.extra,
        }
        if options.gpus_per_node:
            params["gpus_per_node"] = options.gpus_per_node
        if options.partition:
            params["partition"] = options.partition
        if options.account:
            params["account"] = options.account
        if options.mem_gb:
            params["mem"] = f"{math.ceil(options.mem_gb * 1024)}M"
        executor.update_parameters(**params)
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=options.timeout_min,
            signal_delay_s=options.signal_delay_s,
            gpus_per_node=options.gpus_per_node,
            tasks_per_node=1,
            stderr_to_stdout=True,
        )
    else:
        raise SubmitError(f"--cluster must be slurm or local, got {cluster!r}")
    # A countdown of requeues on timeout (submitit's own), so a run that never finishes stops at last.
    executor.max_num_timeout = options.max_requeues
    return executor


@dataclass
class Task:
    params: dict[str, str]
    run_dir: Path
    job: submitit.Job


def grid_args(params: dict[str, str]) -> list[str]:
    return [a for k, v in params.items() for a in ("--" + k.replace("_", "-"), v)]


def task_name(params: dict[str, str]) -> str:
    text = "-".join(f"{k}={v}" for k, v in params.items()) or "run"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def submit(
    recipe: str | Path,
    args: list[str] | None = None,
    grid: list[dict[str, str]] | None = None,
    *,
    root: str | Path,
    cluster: str = "slurm",
    options: SlurmOptions | None = None,
    check: bool = True,
) -> list[Task]:
    """Queue one task per grid point (one task without a grid); run folders are ROOT/<option=value-...>."""
    path = resolve_recipe(recipe)
    args, grid = list(args or []), grid or [{}]
    root = Path(root).resolve()
    names = [task_name(p) for p in grid]
    if len(set(names)) < len(names):  # values that differ only in characters a folder name cannot hold
        twice = next(n for n in names if names.count(n) > 1)
        raise SubmitError(f"two grid points would share the run folder {root / twice}; give values that differ "
                          f"in letters, digits or . _ = + - (other characters become _)")  # fmt: skip
    executor = make_executor(cluster, root / "submitit", options or SlurmOptions(), path.stem)
    if check:
        check_options(path, args, list(grid[0]))
    root.mkdir(parents=True, exist_ok=True)
    runs = [RecipeRun(str(path), args + grid_args(p), str(root / n)) for p, n in zip(grid, names)]
    with executor.batch():  # one Slurm job array
        jobs = [executor.submit(run) for run in runs]
    return [Task(p, Path(run.run_dir), job) for p, run, job in zip(grid, runs, jobs)]


def wait(tasks: list[Task], poll_s: float = 1.0, timeout_s: float | None = None) -> None:
    """Until every task has finished (or failed); TimeoutError after `timeout_s`."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not all(t.job.done() for t in tasks):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"tasks still running after {timeout_s}s: see their logs under {tasks[0].job.paths.folder}"
            )
        time.sleep(poll_s)


def collect(tasks: list[Task]) -> list[dict[str, Any]]:
    """One row per task: its grid values, status, final metrics, or the error and its log path."""
    rows = []
    for t in tasks:
        row: dict[str, Any] = {"task": task_name(t.params), **t.params}
        try:
            metrics = t.job.results()[0]  # one per Slurm task (rank); every rank must have succeeded
            row.update(status="done", **metrics)
        except Exception as err:  # the job's own failure, whatever it was, becomes a row
            row.update(status="failed", error=_error_line(err))
        row.update(run_dir=str(t.run_dir), log=str(t.job.paths.stdout))
        rows.append(row)
    return rows


def _error_line(err: Exception) -> str:
    """The raised exception's line from a job's traceback, else the error's first line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Failed|Exit)\b", line)]
    return (raised[-1] if raised else lines[0] if lines else type(err).__name__)[:300]


def write_results(rows: list[dict[str, Any]], root: str | Path) -> tuple[Path, Path]:
    """ROOT/results.csv and ROOT/results.md, one row per task (failed ones included)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tail = [c for c in ("error", "run_dir", "log") if c in columns]
    columns = [c for c in columns if c not in tail] + tail
    root = Path(root)
    csv_path, md_path = root / "results.csv", root / "results.md"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        text = "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recipebox.launch.submit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m recipebox.launch.submit --grid lr=1e-3,5e-4 --grid seed=1,2 "
        "--root runs/sweep recipes/mlm_nsp.py --max-steps 200",
    )
    parser.add_argument("--cluster", default="slurm", choices=("slurm", "local"), help="default: slurm")
    parser.add_argument("--root", help="folder of the run folders and results (default runs/<recipe>-sweep)")
    parser.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument(
        "--time", type=number(), default=60, metavar="MINUTES", help="per task, per requeue (default: 60)"
    )
    parser.add_argument("--gpus-per-node", type=number(low=0), default=0)
    parser.add_argument("--cpus-per-task", type=number(), default=1, help="default: 1")
    parser.add_argument("--mem-gb", type=number(float, 0), default=0)
    parser.add_argument(
        "--signal-delay", type=number(low=0), default=120, metavar="SECONDS",
        help="Slurm signals each task this long before its time limit: it saves and is requeued (default: 120)",
    )  # fmt: skip
    parser.add_argument("--max-requeues", type=number(low=0), default=3, help="default: 3")
    parser.add_argument(
        "--array-parallelism", type=number(), default=64, help="tasks running at once (default: 64)"
    )
    parser.add_argument("--no-wait", action="store_true", help="queue and exit; no results table")
    parser.add_argument("recipe", help="a recipe script, e.g. recipes/mlm_nsp.py")
    parser.add_argument("recipe_args", nargs=argparse.REMAINDER, help="flags passed to every task")
    ns = parser.parse_args(argv)
    options = SlurmOptions(
        partition=ns.partition,
        account=ns.account,
        timeout_min=ns.time,
        gpus_per_node=ns.gpus_per_node,
        cpus_per_task=ns.cpus_per_task,
        mem_gb=ns.mem_gb,
        signal_delay_s=ns.signal_delay,
        max_requeues=ns.max_requeues,
        array_parallelism=ns.array_parallelism,
    )
    try:
        root = Path(ns.root or f"runs/{Path(ns.recipe).stem}-sweep")
        tasks = submit(
            ns.recipe, ns.recipe_args, parse_grid(ns.grid), root=root, cluster=ns.cluster, options=options
        )
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a --root that is a file, or a folder it may not write in
        print(f"error: --root {root}: cannot write its folders there ({err})", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as err:  # sbatch refused the job (partition, account, time)
        print(f"error: sbatch refused the job array: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    for t in tasks:
        print(f"queued {t.job.job_id}: {t.run_dir}  (log {t.job.paths.stdout})", flush=True)
    if ns.no_wait:
        return 0
    wait(tasks)
    rows = collect(tasks)
    csv_path, md_path = write_results(rows, root)
    print(md_path.read_text(encoding="utf-8"), end="")
    print(f"results: {csv_path} {md_path}")
    failed = [r for r in rows if r["status"] != "done"]
    for r in failed:
        print(f"failed: {r['task']}: {r.get('error', '')}; log {r['log']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
