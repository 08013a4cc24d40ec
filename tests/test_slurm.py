"""The Slurm lane: real jobs on the local single-node cluster (slurm/local_cluster.sh; a cluster the tests
start is taken down when they end).

The sbatch script and submitit arrays train a tiny BERT; preemption (USR1 to the batch shell, submitit's
interrupt) must save, requeue, resume, and end with the same final metrics as an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env
from recipe_runs import job_completes, sbatch, slurm_job_field, wait_for_job

from recipebox.launch import submit
from recipebox.launch.tracking import read_metrics

pytestmark = pytest.mark.slurm

RECIPE = "recipes/mlm_nsp.py"
TOY = REPO / "data" / "toy" / "mlm_nsp" / "corpus.txt"
TINY = [
    "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
    "--max-steps", "40", "--save-every", "5", "--tracker", "none", "--num-workers", "0",
]  # fmt: skip
LOCAL_SBATCH = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--partition=local", "--time=10"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """One WordPiece for every compared run: training one has nondeterministic ties."""
    from recipebox.data.text import read_documents
    from recipebox.data.tokenizer import train_wordpiece

    folder = tmp_path_factory.mktemp("tokenizer")
    docs = read_documents([str(TOY)], documents="blank_line", cache_dir=str(folder / "cache"))
    tok = train_wordpiece((s for d in docs for s in d), vocab_size=2000, lowercase=True)
    tok.save_pretrained(folder / "tok")
    return str(folder / "tok")


def sbatch_args(script: str, log: Path, recipe_args: list[str]) -> list[str]:
    return [*LOCAL_SBATCH, f"--output={log}", script, *recipe_args]


def sbatch_env(run_dir: Path) -> dict[str, str]:
    return subprocess_env(RUN_DIR=str(run_dir), NPROC_PER_NODE="1", PYTHON=sys.executable)


def final_eval(run_dir: Path) -> dict:
    """The last train loss and the final evaluation, the numbers an uninterrupted run must reproduce."""
    records = read_metrics(run_dir)
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert train and evals, f"{run_dir}/metrics.jsonl has no train or eval records"
    out = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
    out.update(
        step=evals[-1]["step"], last_train_loss=train[-1]["train/loss"], last_train_step=train[-1]["step"]
    )
    return out


@pytest.fixture(scope="module")
def deepspeed_job(local_cluster, tokenizer, tmp_path_factory):
    """`sbatch slurm/mlm_nsp_deepspeed.sh`, submitted first so it shares the node with the runs below."""
    root = tmp_path_factory.mktemp("deepspeed")
    run_dir, log = root / "run", root / "job.out"
    args = sbatch_args(
        "slurm/mlm_nsp_deepspeed.sh", log, [*TINY, "--tokenizer", tokenizer, "--max-steps", "10"]
    )
    job = sbatch(args, sbatch_env(run_dir))
    yield job, run_dir, log
    subprocess.run(["scancel", job], capture_output=True)  # a no-op once it has ended


@pytest.fixture(scope="module")
def causal_lm_job(deepspeed_job, tmp_path_factory):
    """`sbatch -J gpt slurm/train.sh causal_lm ...`: another recipe through the generic script, submitted
    early to share the node too."""
    root = tmp_path_factory.mktemp("train_sh")
    run_dir, log = root / "run", root / "job.out"
    args = ["--job-name=gpt", *sbatch_args("slurm/train.sh", log, ["causal_lm", "--max-steps", "6",
            "--log-every", "2", "--tracker", "none"])]  # fmt: skip
    job = sbatch(args, sbatch_env(run_dir))
    yield job, run_dir, log
    subprocess.run(["scancel", job], capture_output=True)


@pytest.fixture(scope="module")
def reference(deepspeed_job, causal_lm_job, tokenizer, tmp_path_factory) -> dict:
    """`sbatch slurm/mlm_nsp.sh`, uninterrupted: the run the preempted ones are compared with."""
    root = tmp_path_factory.mktemp("sbatch")
    run_dir, log = root / "run", root / "job.out"
    job = sbatch(sbatch_args("slurm/mlm_nsp.sh", log, [*TINY, "--tokenizer", tokenizer]), sbatch_env(run_dir))
    return {"run_dir": run_dir, "log": job_completes(job, log, 300), "final": final_eval(run_dir)}


def test_sbatch_script_trains_and_exports(reference):
    run_dir = reference["run_dir"]
    assert (run_dir / "export" / "model.safetensors").stat().st_size > 0
    assert (run_dir / "export" / "config.json").is_file()
    assert reference["final"]["step"] == 40
    assert "rendezvous" in reference["log"] and "exported to" in reference["log"]


def test_the_generic_script_runs_the_recipe_its_first_argument_names(causal_lm_job):
    job, run_dir, log = causal_lm_job
    text = job_completes(job, log, 300)
    assert f"run folder {run_dir}" in text and "rendezvous" in text and "exported to" in text, text[-3000:]
    assert json.loads((run_dir / "export" / "config.json").read_text())["model_type"] == "gpt2"
    assert max(r["step"] for r in read_metrics(run_dir)) == 6


def test_the_generic_script_names_the_recipes_when_its_first_argument_is_not_one(tmp_path):
    for args in ([], ["--max-steps", "4"], ["mlm"], ["../recipes/qa"]):
        proc = subprocess.run(
            ["bash", "slurm/train.sh", *args], cwd=REPO, env=sbatch_env(tmp_path / "run"),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert proc.returncode == 2, (args, proc.stderr)
        assert "the first argument names the recipe to run, one of: asr_ctc causal_lm mlm_nsp ner qa" in (
            proc.stderr
        )
        assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def preempted(reference, tokenizer, tmp_path_factory) -> dict:
    """The reference config twice, side by side on the node's two CPUs, each preempted once after its
    first checkpoint: the sbatch script by USR1 to its batch shell, a submitit task by submitit's interrupt."""
    root = tmp_path_factory.mktemp("preempted")
    args = [*TINY, "--tokenizer", tokenizer]
    run_dir, log = root / "sbatch-run", root / "sbatch.out"
    job = sbatch(sbatch_args("slurm/mlm_nsp.sh", log, args), sbatch_env(run_dir))
    (task,) = submit.submit(
        RECIPE, args, root=root / "submitit", options=submit.SlurmOptions(timeout_min=10), check=False
    )
    task_log = Path(task.job.paths.stdout)

    def usr1_to_batch_shell():
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)

    # what a preemption looks like to submitit: SIGTERM, then USR2
    pending = [(run_dir, usr1_to_batch_shell, log), (task.run_dir, task.job._interrupt, task_log)]
    deadline = time.monotonic() + 240
    while pending:
        for entry in list(pending):
            if (entry[0] / "checkpoints" / "step-000005").is_dir():
                entry[1]()
                pending.remove(entry)
        if time.monotonic() > deadline:
            tail = entry[2].read_text()[-3000:] if entry[2].exists() else ""
            pytest.fail(f"no first checkpoint in {entry[0]} after 240s\n{tail}")
        time.sleep(0.3)
    wait_for_job(job, 300)
    submit.wait([task], timeout_s=300)
    return {"job": job, "run_dir": run_dir, "log": log, "task": task}


def test_usr1_to_batch_shell_saves_requeues_and_resumes(preempted, reference):
    job, run_dir, text = preempted["job"], preempted["run_dir"], preempted["log"].read_text()
    assert slurm_job_field(job, "JobState") == "COMPLETED", text[-3000:]
    assert slurm_job_field(job, "Restarts") == "1", text[-3000:]
    assert "USR1 received" in text and "resumed from" in text, text[-3000:]
    resumed_at = int(re.search(r"resumed from \S+step-(\d+) at step", text).group(1))
    assert 5 <= resumed_at < 40
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert final_eval(run_dir) == reference["final"]


def test_submitit_interrupt_checkpoints_requeues_and_resumes(preempted, reference):
    task = preempted["task"]
    result = task.job.result()
    text = Path(task.job.paths.stdout).read_text()
    assert "requeueing" in text and "resumed from" in text, text[-3000:]
    assert slurm_job_field(task.job.job_id, "Restarts") == "1"
    assert result["step"] == 40
    assert final_eval(task.run_dir) == reference["final"]


def test_submitit_array_over_grid_writes_results_table(local_cluster, tokenizer, tmp_path):
    cmd = [sys.executable, "-m", "recipebox.launch.submit", "--grid", "lr=1e-3,2e-3", "--grid", "seed=1,2"]
    cmd += ["--root", str(tmp_path), "--time", "10", RECIPE, *TINY, "--max-steps", "8", "--save-every", "0"]
    cmd += ["--export", "false"]  # a sweep: metrics and checkpoints only
    out = subprocess.run(
        [*cmd, "--tokenizer", tokenizer], cwd=REPO, capture_output=True, text=True, timeout=400
    )
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = re.findall(r"^queued (\d+)_(\d+): ", out.stdout, re.M)
    assert len(jobs) == 4 and len({array for array, _ in jobs}) == 1, "the 4 tasks are one job array"
    csv_path, md_path = tmp_path / "results.csv", tmp_path / "results.md"
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    assert [(r["lr"], r["seed"]) for r in table] == [
        ("1e-3", "1"),
        ("1e-3", "2"),
        ("2e-3", "1"),
        ("2e-3", "2"),
    ]
    for row in table:
        assert row["status"] == "done", f"{row['task']} failed: {row.get('error')}; log {row['log']}"
        assert float(row["step"]) == 8 and 0 < float(row["eval/loss"]) < 20
        config = (Path(row["run_dir"]) / "config.yaml").read_text()
        assert f"seed: {row['seed']}\n" in config and f"lr: {float(row['lr'])}\n" in config
    assert len({r["run_dir"] for r in table}) == 4
    assert len({r["eval/loss"] for r in table}) == 4, "different lr/seed must give different runs"
    assert len(md_path.read_text().splitlines()) == 2 + 4


def test_deepspeed_script_trains_zero2_and_exports(deepspeed_job):
    job, run_dir, log = deepspeed_job
    job_completes(job, log, 300)
    assert (run_dir / "export" / "model.safetensors").stat().st_size > 0
    newest = (run_dir / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((run_dir / "checkpoints" / newest / "manifest.json").read_text())
    assert manifest["meta"]["deepspeed"] == {"zero_stage": 2} and manifest["meta"]["step"] == 10


def test_failed_task_is_a_row_with_its_log(local_cluster, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text('import sys\nsys.exit("error: broken.py cannot train")\n')
    tasks = submit.submit(broken, root=tmp_path, options=submit.SlurmOptions(timeout_min=5), check=False)
    submit.wait(tasks, timeout_s=120)
    (row,) = submit.collect(tasks)
    assert row["status"] == "failed" and "broken.py exited with status 1" in row["error"], row
    assert "error: broken.py cannot train" in Path(row["log"]).read_text()
    submit.write_results([row], tmp_path)
    assert "| failed |" in (tmp_path / "results.md").read_text()


def test_bad_input_names_the_thing_and_the_fix(tmp_path, monkeypatch, capsys):
    with pytest.raises(submit.SubmitError, match=r"grid entry 'lr' is malformed; write OPTION=V1,V2"):
        submit.parse_grid(["lr"])
    with pytest.raises(submit.SubmitError, match="'seed' is given twice"):
        submit.parse_grid(["seed=1", "seed=2"])
    with pytest.raises(submit.SubmitError, match=r"grid entry 'lr=1e-3,' is malformed"):
        submit.parse_grid(["lr=1e-3,"])
    with pytest.raises(submit.SubmitError, match=r"grid entry 'seed=1,1' lists a value twice"):
        submit.parse_grid(["seed=1,1"])
    with pytest.raises(submit.SubmitError, match=r"two grid points would share the run folder .*model=org_m"):
        submit.submit(RECIPE, [], submit.parse_grid(["model=org/m,org_m"]), root=tmp_path, cluster="local")
    with pytest.raises(
        submit.SubmitError, match=r"recipe recipes/nope.py is not a file; .*recipes/mlm_nsp.py"
    ):
        submit.submit("recipes/nope.py", root=tmp_path, cluster="local")
    with pytest.raises(submit.SubmitError, match=r"mlm_nsp.py has no option --learning-rate; see"):
        submit.submit(RECIPE, [], [{"learning_rate": "1"}], root=tmp_path, cluster="local")
    # asr_ctc's --help shows a default with a % in it; its usage mentions torchrun's --nproc_per_node
    speech = submit.resolve_recipe("recipes/asr_ctc.py")
    submit.check_options(speech, ["--train-manifest", "m.csv"], ["chars_to_ignore"])
    with pytest.raises(submit.SubmitError, match=r"asr_ctc.py has no option --nproc"):
        submit.check_options(speech, ["--nproc=2"], [])
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo
    with pytest.raises(submit.SubmitError, match=r"no Slurm cluster answers .*slurm/local_cluster.sh up"):
        submit.submit(RECIPE, root=tmp_path, check=False)
    (tmp_path / "a_file").write_text("")
    assert submit.main(["--cluster", "local", "--root", str(tmp_path / "a_file"), RECIPE]) == 2
    assert f"error: --root {tmp_path / 'a_file'}: cannot write its folders there" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        submit.main(["--time", "0", RECIPE])
    assert done.value.code == 2 and "argument --time: must be at least 1, got 0" in capsys.readouterr().err
    cli = subprocess.run(
        [sys.executable, "-m", "recipebox.launch.submit", "--grid", "lr", RECIPE],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "error: grid entry 'lr' is malformed" in cli.stderr
    blocked = tmp_path / "blocked" / "submitit"  # a machine without the slurm extra
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed')\n")
    cli = subprocess.run([sys.executable, "-m", "recipebox.launch.submit", "--help"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(blocked.parent)})  # fmt: skip
    assert cli.returncode == 2 and cli.stderr.startswith("error: recipebox.launch.submit needs submitit: pip")


def test_local_cluster_status_names_each_daemon(local_cluster):
    out = subprocess.run(
        ["bash", "slurm/local_cluster.sh", "status"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for daemon in ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"):
        assert re.search(rf"^{daemon} running \(pid \d+\)$", out.stdout, re.M), out.stdout
    assert shutil.which("sacct")


def test_a_task_takes_its_ranks_from_slurm_not_the_submitting_shell(monkeypatch):
    # A shell that ran torchrun (or a test that set a rank) must not make every task wait for 4 ranks.
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "MASTER_PORT": "20123", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(key, value)
    env = submit.RecipeRun.child_env()
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & env.keys()
    assert env["SLURM_PROCID"] == "0" and env["PYTHONUNBUFFERED"] == "1"


def test_a_task_of_several_ranks_is_done_when_every_rank_is(tmp_path):
    """--gpus-per-node 2 gives each task 2 Slurm tasks (ranks): submitit's result() refuses such a job, so
    the row reads every rank's result, and a rank that failed fails the row."""

    class Job:
        paths = type("Paths", (), {"stdout": tmp_path / "log.out"})()

        def __init__(self, *outcomes):
            self.outcomes = outcomes

        def result(self):
            assert len(self.outcomes) == 1, "You should use `results()` if your job has subtasks."
            return self.results()[0]

        def results(self):
            for outcome in self.outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
            return list(self.outcomes)

    done = {"eval/loss": 1.5}
    tasks = [
        submit.Task({"lr": "1e-3"}, tmp_path / "a", Job(done, done)),
        submit.Task(
            {"lr": "1e-2"}, tmp_path / "b", Job(done, submit.RecipeFailed("rank 1 exited with status 1"))
        ),
    ]
    rows = submit.collect(tasks)
    assert rows[0]["status"] == "done" and rows[0]["eval/loss"] == 1.5
    assert rows[1]["status"] == "failed" and "rank 1 exited" in rows[1]["error"]
