"""bench/gpu.sh: its synthetic inputs fill every row to the sequence length, and `--dry-run` runs every row of
the GPU benchmark on CPU (tiny BERT, fp32) and prints the whole table with numbers in it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

sys.path.insert(0, str(REPO / "bench"))
import bench_gpu  # noqa: E402

NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")


def test_synthetic_rows_are_exactly_the_sequence_length(tmp_path):
    """No row pads and no batch changes shape, so --compile never recompiles and tokens/s is rows x seq_len."""
    from transformers import AutoTokenizer

    from data.classification import read_table, texts
    from data.nsp import build_nsp_pairs
    from data.text import read_documents

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
def test_dry_run_prints_every_row_with_numbers():
    """About 100 s here with inductor's cache warm (the two --compile rows build C++ kernels the first time)."""
    proc = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
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
