"""The backend protocol on real ranks: every backend keeps the contract the loop relies on, evaluation with
`generate` runs in lockstep on sharded models and gives the same ids everywhere, and FSDP2 shards each
model family by its outermost layer lists. One torchrun job with 2 ranks and one plain process run
tests/backend_checks.py; the XLA half runs in tests/test_xla.py (its own environment)."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import BIN, REPO, free_port
from recipe_runs import run

pytestmark = pytest.mark.slow
CHECKS = str(REPO / "tests" / "backend_checks.py")
TWO_RANKS = ("ddp", "fsdp", "deepspeed1", "deepspeed2", "deepspeed3")


def results(launcher: list[str], out, *groups: str) -> dict:
    proc = run([*launcher, CHECKS, str(out), *groups], timeout=900)  # a hang (a rank waiting in a collective
    assert proc.returncode == 0, proc.stderr[-4000:]  # another never joins) fails at the timeout
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master-port={free_port()}"]
    return results(torchrun, tmp_path_factory.mktemp("two-ranks"), "contract", "generate", "shard")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return results([sys.executable], tmp_path_factory.mktemp("one"), "generate")


@pytest.mark.parametrize("backend", TWO_RANKS)
def test_backend_keeps_the_contract_on_two_ranks(two_ranks, backend):
    r = two_ranks[f"contract/{backend}"]
    assert r["changed"] and r["grad_norm"] > 0 and r["loss"] > 0
    assert (r["samples"], r["tokens"]) == (4, 24)  # this rank's 4 rows of 6 tokens
    assert r["lr_after_1"] == pytest.approx(r["lr_expected_after_1"])
    assert r["accumulation_equals_bigger_batch"], "2 micro-batches without sync differ from one batch of 4"
    assert r["loaded_over_another_state"], "the resume check must load over weights other than the saved ones"
    assert r["resumed_loss_equal"] and r["resumed_weights_equal"], "the checkpoint did not continue exactly"
    assert r["full_state_keys_match"] and r["full_state_same_on_every_rank"] and r["export_state_on_rank_0"]


def test_ranks_that_built_different_weights_are_stopped_under_check_replicas(two_ranks):
    """FSDP2 keeps each rank's own slice of the model it built: a build that drew differently per rank would
    train a patchwork, so --check-replicas compares the built weights before the backend wraps them."""
    refused = two_ranks["built_alike"]["refused"]
    assert refused.startswith("the ranks built different weights (hashes by rank [") and "seed" in refused


def test_every_backend_takes_the_same_first_step(two_ranks):
    """Same init, same data: the normalised loss is one number whichever backend computes it."""
    losses = {b: two_ranks[f"contract/{b}"]["loss"] for b in TWO_RANKS}
    assert max(losses.values()) - min(losses.values()) < 1e-5, losses


def test_generation_in_evaluation_is_the_same_everywhere(two_ranks, one_process):
    """DDP, FSDP2 and ZeRO-3 on 2 ranks (5 eval rows: one rank runs an extra, repeated batch) and one process
    generate the same greedy ids for a tiny GPT-2 and a tiny T5, and no rank hangs."""
    reference = one_process["generate/ddp"]
    for family in ("gpt2", "t5"):
        ids = reference[family]["generated"]
        assert len(ids) == 5 and len({tuple(row) for row in ids}) > 1, ids  # rows differ: a real check
        for run_name in ("generate/ddp", "generate/fsdp", "generate/deepspeed3"):
            assert two_ranks[run_name][family]["generated"] == ids, (run_name, family)
            wrapped = two_ranks[run_name]["gpt2_wrapped"]["generated"]
            assert family != "gpt2" or wrapped == ids, (
                f"{run_name}: the model inside a task's module generates"
            )
        assert one_process["generate/deepspeed3"][family]["generated"] == ids
        perplexities = [two_ranks[n][family]["perplexity"] for n in ("generate/ddp", "generate/fsdp")]
        assert perplexities[0] == pytest.approx(reference[family]["perplexity"], rel=1e-5)
        assert perplexities[1] == pytest.approx(perplexities[0], rel=1e-5)


def test_a_split_smaller_than_the_world_is_evaluated_without_a_hang(two_ranks, one_process):
    """One eval row on 2 ranks: rank 1 has none, joins every collective forward and generate, counts nothing."""
    reference = one_process["generate/ddp"]["one_row"]
    assert len(reference["generated"]) == 1
    for run_name in ("generate/ddp", "generate/fsdp", "generate/deepspeed3"):
        assert two_ranks[run_name]["one_row"]["generated"] == reference["generated"], run_name
        assert two_ranks[run_name]["one_row"]["perplexity"] == pytest.approx(
            reference["perplexity"], rel=1e-5
        )


@pytest.mark.parametrize(
    "family, wrapped",
    [
        ("bert", ["BertLayer"]),
        ("gpt2", ["GPT2Block"]),
        ("t5", ["T5Block", "T5Block"]),  # encoder and decoder blocks; T5Block.layer inside is left to them
        ("bart", ["BartEncoderLayer", "BartDecoderLayer"]),
        ("wav2vec2", ["Wav2Vec2GroupNormConvLayer", "Wav2Vec2EncoderLayer"]),
    ],
)
def test_fsdp2_shards_each_family_by_its_outermost_layers_and_trains(two_ranks, family, wrapped):
    r = two_ranks["shard"][family]
    assert r["wrapped"] == wrapped
    assert r["changed"] and r["grad_norm"] > 0 and math.isfinite(r["loss"])
