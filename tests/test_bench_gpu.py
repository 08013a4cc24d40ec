"""bench/gpu.sh: its synthetic inputs fill every row to the sequence length; scripts/gpu_check.sh's dry run
goes through every row of the GPU benchmark on CPU (tiny BERT, bf16), prints the whole table with numbers in
it, profiles a step (bench/profile_step.py) and collects the gpu tests; a kernel's device time counts
once however its neighbours overlap it; a benchmark stopped part-way prints the rows it finished, and its
stop reaches the ranks behind torchrun."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import REPO, subprocess_env

sys.path.insert(0, str(REPO / "bench"))
import bench_gpu  # noqa: E402
import profile_step  # noqa: E402

NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")


def test_synthetic_rows_are_exactly_the_sequence_length(tmp_path):
    """No row pads and no batch changes shape, so --compile never recompiles and tokens/s is rows x seq_len."""
    from transformers import AutoTokenizer

    from recipebox.data.classification import read_table, texts
    from recipebox.data.nsp import build_nsp_pairs
    from recipebox.data.text import read_documents

    s = bench_gpu.TINY
    inputs = bench_gpu.write_inputs(tmp_path / "inputs", s)
    tok = AutoTokenizer.from_pretrained(inputs["model"])
    assert len(tok) == s.vocab

    documents = read_documents([str(inputs["corpus"])], documents="blank_line")
    pairs = build_nsp_pairs(documents, seed=42, copies=5)
    assert len(pairs["a"]) % s.batch == 0
    enc = tok(pairs["a"], pairs["b"], truncation="longest_first", max_length=s.seq_len)
    assert {len(ids) for ids in enc["input_ids"]} == {s.seq_len}
    assert tok.unk_token_id not in {i for ids in enc["input_ids"] for i in ids}

    titles = texts(read_table(str(inputs["table"])), ["title"])[0]
    assert len(titles) % s.batch == 0
    assert {len(ids) for ids in tok(titles, truncation=True, max_length=s.seq_len)["input_ids"]} == {
        s.seq_len
    }


@pytest.mark.slow
def test_dry_run_prints_every_row_with_numbers(tmp_path):
    """scripts/gpu_check.sh --dry-run: the benchmark, then the gpu tests (skipped here), each logged. About 100 s
    here with inductor's cache warm (the two --compile rows build C++ kernels the first time)."""
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "logs"), "--dry-run"],
        cwd=REPO,
        env=subprocess_env(RECIPEBOX_TEST_WORKERS="0"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "bench/gpu.sh exit 0, profile exit 0, gpu tests exit 0" in proc.stdout
    tests = (tmp_path / "logs" / "gpu-tests.log").read_text()
    assert re.search(r"\b(\d+) skipped", tests) and "needs a CUDA device" in tests and "failed" not in tests
    bench = (tmp_path / "logs" / "bench.log").read_text()
    assert bench in proc.stdout
    lines = [line for line in bench.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        rows[cells["benchmark"], cells["run"]] = cells
    assert list(rows) == [(bench, run) for bench, run, _, _ in bench_gpu.ROWS]
    for key, cells in rows.items():
        assert NUMBER.match(cells["samples/s"]) and float(cells["samples/s"]) > 0, (key, cells)
        assert NUMBER.match(cells["ratio"]), (key, cells)
        assert cells["MFU"] == "n/a" and cells["peak mem (GB)"] == "n/a", (key, cells)  # CPU: no peak
    for key in [k for k in rows if k[0] != "MLM+NSP backends"]:
        assert rows[key]["vs"] == "Trainer" and float(rows[key]["ratio"]) > 0
    assert float(rows["MLM+NSP", "transformers.Trainer"]["ratio"]) == 1.0
    assert rows["MLM+NSP backends", "ddp"]["samples/s"] == rows["MLM+NSP", "recipe"]["samples/s"]
    assert "MFU: n/a" in proc.stdout
    # The step's profile: its time per step, then the ops that took the most, each with numbers.
    profile = (tmp_path / "logs" / "profile.log").read_text()
    assert profile in proc.stdout and "MLM+NSP (recipes/mlm_nsp.py)" in profile
    # The README holds eager bf16's step; this is the fastest configuration's: compiled, bf16-pure
    assert "MLM+NSP (recipes/mlm_nsp.py) --compile;" in profile and "bf16-pure, one process" in profile
    assert re.search(
        r"^step: \d+\.\d+ ms wall \(unprofiled\); [\d,]+ top-level aten ops per step", profile, re.M
    )
    top = [line.strip("|").split("|") for line in profile.splitlines() if line.startswith("| aten::")]
    assert len(top) == 15 and all(NUMBER.match(c.strip().rstrip("%")) for row in top for c in row[1:]), top
    assert "aten::mm" in {row[0].strip() for row in top} or "aten::linear" in {row[0].strip() for row in top}


def test_device_busy_time_counts_overlapping_kernels_once():
    """Kernels on several streams overlap (a copy beside a matmul): the busy time is their union, so it never
    exceeds the wall time and the share of each kind is over real device time."""
    assert profile_step.union_us([]) == 0.0
    assert profile_step.union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25.0
    assert profile_step.union_us([(20, 30), (0, 40)]) == 40.0
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNN": "matmul",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",  # built with CUTLASS: attention comes first
        "Memcpy HtoD (Pinned -> Device)": "copies",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "other",
    }
    assert {n: profile_step.kind(n) for n in names} == names

    def kernel(name, start, end):
        interval = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, time_range=interval)

    events = [kernel("gemm_a", 0, 10), kernel("gelu", 10, 16), kernel("gemm_b", 20, 30)]
    busy = profile_step.union_us([(e.time_range.start, e.time_range.end) for e in events])
    rows = profile_step.rows_by(events, lambda e: profile_step.kind(e.name), 2, busy)
    assert rows == ["| matmul | 0.010 | 76.9% | 1.0 |", "| other | 0.003 | 23.1% | 0.5 |"]


def test_each_recipe_and_its_trainer_run_before_compile_and_zero():
    """A time limit stops the benchmark at its last rows: those are --compile, bf16-pure and ZeRO, never the
    recipe vs Trainer comparisons; a row that reuses another's run (the Trainer's config, ddp's figures) runs after it."""
    order = bench_gpu.RUN_ORDER
    assert sorted(order) == list(range(len(bench_gpu.ROWS)))
    ran = [bench_gpu.ROWS[i][:2] for i in order]
    assert ran[:4] == [
        ("MLM+NSP", "recipe"),
        ("MLM+NSP", "transformers.Trainer"),
        ("classification", "recipe"),
        ("classification", "transformers.Trainer"),
    ]
    extras = ("compile", "bf16-pure", "ZeRO")
    assert all(any(x in run for x in extras) for _, run in ran[5:]), ran  # after ddp (the recipe row again)
    for position, i in enumerate(order):
        if bench_gpu.ROWS[i][3] in ("trainer", "same"):
            task = bench_gpu.ROWS[i][2]
            source = next(j for j, row in enumerate(bench_gpu.ROWS) if row[1] == "recipe" and row[2] == task)
            assert order.index(source) < position, ran[position]


def test_a_stopped_benchmark_still_prints_the_rows_it_finished():
    done = {"samples_per_s": 10.0, "tokens_per_s": 320.0, "tflops": 0.5, "elapsed": 7.0}
    failed = {"error": "stopped by the OS: out of memory", "elapsed": 3.0}  # its own error, whatever words
    stopped = {"error": "stopped after 9 s, before this row finished", "elapsed": 0.0, "stopped": True}
    results = {0: done, 1: failed, **{i: dict(stopped) for i in range(2, len(bench_gpu.ROWS))}}
    lines = bench_gpu.table(bench_gpu.TINY, results, peak=1.0)
    assert lines[2] == "| MLM+NSP | recipe | 10.0 | 320 | 0.5000 | 50.0% | n/a | n/a | Trainer | 7 |"
    assert "| failed |" in lines[3]
    assert all("| not run |" in line for line in lines[4:]) and len(lines) == 2 + len(bench_gpu.ROWS)


def test_a_stop_reaches_the_ranks_behind_torchrun(tmp_path):
    """SIGTERM to the benchmark: torchrun, in a session of its own, gets it once and ends its ranks (also in
    sessions of their own, out of reach of a signal to the benchmark's process group) before it exits."""
    marker = f"{time.time_ns() % 10**6 + 10**6}"  # a sleep no other process runs
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import bench_gpu\n"
        "import signal; signal.signal(signal.SIGTERM, bench_gpu.stop_on_sigterm)\n"
        "from launch_two_ranks import torchrun_ranks\n"
        f"torchrun_ranks(['--no-python', 'sleep', '{marker}'], Path(sys.argv[1]), nproc=2)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "log")],
        cwd=REPO,
        env=subprocess_env(),
        stderr=subprocess.PIPE,
    )

    def sleeping():
        found = subprocess.run(["pgrep", "-f", f"^sleep {marker}$"], capture_output=True, text=True)
        return found.stdout.split()

    deadline = time.monotonic() + 60
    while len(sleeping()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert len(sleeping()) == 2, proc.stderr and proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert sleeping() == []
