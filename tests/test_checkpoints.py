"""Sharded checkpoints under real torchrun jobs: exact resume after SIGKILL and SIGTERM (and of each
fine-tuning recipe as shipped), corrupt and half-written checkpoints, resharding across world sizes, export
from any checkpoint."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from recipe_runs import (
    command,
    export_checkpoint,
    final_metrics,
    final_sums,
    kill_tree,
    lose_last_checkpoint_then_rerun,
    losses,
    popen,
    run,
    same_weights,
    sigkill_one_rank_after,
    start_and_wait_for_step,
)

from recipebox.data.sampler import ShardedSampler
from recipebox.launch.tracking import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run(command(out, tokenizer_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigkill_of_one_rank_then_the_same_command_continues_exactly(tmp_path, tokenizer_dir, reference):
    out = tmp_path / "run"
    cmd = command(out, tokenizer_dir, "--export", "false")  # nothing here reads an export
    latest = sigkill_one_rank_after(cmd, out, 5)
    assert latest in ("step-000004", "step-000008", "step-000012", "step-000016", "step-000020"), latest
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and latest in again.stdout
    assert losses(out) == losses(reference)  # bitwise, every step from 1 to 24
    assert final_sums(out) == final_sums(reference)


def test_sigterm_saves_at_the_step_boundary_and_exits_75(tmp_path, tokenizer_dir, saved_runs):
    """One process with 2 DataLoader workers, the same command as the uninterrupted 1-rank run of `saved_runs`
    but tracked with W&B (offline), SIGTERM to every process (as Slurm signals a job step): the workers leave
    the stop to their rank, which saves; the same command continues exactly, in the same W&B run."""
    reference_one = saved_runs(1, "ddp")
    out = tmp_path / "run"
    cmd = command(
        out, tokenizer_dir, "--backend", "ddp", "--tracker", "wandb", "--export", "false", "--num-workers", "2",
        nproc=1, batch_size=32, steps=16,
    )  # fmt: skip
    proc = start_and_wait_for_step(cmd, out, 1)
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the run and its workers
    assert proc.wait(timeout=120) == 75
    stopped_at = max(losses(out))
    assert stopped_at < 16
    assert f"stopped at step {stopped_at} on request; checkpoint saved" in proc.stdout.read()
    assert (out / "checkpoints" / "latest").read_text() == f"step-{stopped_at:06d}"
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(out) == losses(reference_one)
    assert final_sums(out) == final_sums(reference_one)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    assert len(runs) == 2 and len(ids) == 1, runs  # one W&B run id across the stop


def test_corrupt_checkpoints_are_named_and_the_previous_one_is_used(tmp_path, tokenizer_dir, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000016", "step-000020", "step-000024"]
    shard = next((ckpts / "step-000024" / "state").glob("*.distcp"))
    overwrite_middle(shard)  # same size, other bytes: a bad sector or a faulty copy
    (ckpts / "step-000020" / "rank-00001.safetensors").unlink()  # deleted
    verify = run([sys.executable, "-m", "recipebox.checkpoints", "verify", str(ckpts / "step-000024")])
    assert verify.returncode == 2 and f"shard state/{shard.name} is corrupt" in verify.stderr
    sizes_only = run(
        [sys.executable, "-m", "recipebox.checkpoints", "verify", "--sizes-only", str(ckpts / "step-000024")]
    )
    assert sizes_only.returncode == 0 and "(sizes)" in sizes_only.stdout  # the documented blind spot
    (out / "metrics.jsonl").unlink()
    again = run(command(out, tokenizer_dir, "--export", "false"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"step-000024: shard state/{shard.name} is corrupt" in again.stdout
    assert "step-000020: shard rank-00001.safetensors is missing" in again.stdout
    assert "resumed from" in again.stdout and "step-000016" in again.stdout
    ref = losses(reference)
    assert losses(out) == {s: ref[s] for s in range(17, 25)}


def test_a_manifest_that_is_not_one_is_named_and_skipped(tmp_path):
    """A manifest that is not UTF-8 JSON, or JSON of another shape (a copy gone wrong, an edit): the
    checkpoint is named corrupt and resume takes the previous one; `verify` says so with exit 2."""
    from recipebox.checkpoints.sharded import latest_complete_checkpoint

    root = tmp_path / "checkpoints"
    good = root / "step-000004"
    good.mkdir(parents=True)
    (good / "manifest.json").write_text(json.dumps({"step": 4, "meta": {}, "files": {}}), encoding="utf-8")
    bad = [b"\xff\xfe\x00garbage", b"{}", b"[]", b'{"step": 8, "meta": {}, "files": ["state"]}']
    for i, content in enumerate(bad):
        (root / f"step-00001{i}").mkdir()
        (root / f"step-00001{i}" / "manifest.json").write_bytes(content)
    reported = []
    assert latest_complete_checkpoint(root, report=reported.append) == good
    assert len(reported) == len(bad) + 1  # the good one is size-only, which is said too
    assert all("manifest.json: corrupt" in line and "cannot be used" in line for line in reported[: len(bad)])
    verify = run([sys.executable, "-m", "recipebox.checkpoints", "verify", str(root / "step-000010")])
    assert verify.returncode == 2 and "Traceback" not in verify.stderr
    assert f"{root / 'step-000010' / 'manifest.json'}: corrupt" in verify.stderr


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path, tokenizer_dir):
    """A bigger model (about 230 MB of model and AdamW state) makes a save last long enough to be
    interrupted by a real SIGKILL, on a busy machine too: raw writes made a 4-layer, 256-wide model's
    save too quick to catch. No documents are held out: the resumed run's final evaluation of that model
    took 30 of its 50 seconds and proves nothing here."""
    out = tmp_path / "run"
    big = ["--hidden-size", "512", "--num-layers", "6", "--num-heads", "8", "--intermediate-size", "2048",
           "--eval-fraction", "0"]  # fmt: skip
    cmd = command(out, tokenizer_dir, "--save-every", "2", *big, steps=400)
    proc = popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts, interrupted = out / "checkpoints", None
    deadline = time.time() + 240
    while time.time() < deadline and interrupted is None:
        # Completed saves first: a save that finishes while we look is then never taken for a partial one.
        done = {p.name for p in ckpts.glob("step-*")} if ckpts.exists() else set()
        partial = list(ckpts.glob(".tmp-step-*")) if ckpts.exists() else []
        if done and partial and partial[0].name.removeprefix(".tmp-") not in done and _has_shards(partial[0]):
            kill_tree(proc)
            interrupted = partial[0]
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert interrupted is not None and interrupted.exists(), "no save was caught in the middle"
    assert not (interrupted / "manifest.json").exists()
    latest = (ckpts / "latest").read_text()
    verify = run([sys.executable, "-m", "recipebox.checkpoints", "verify", str(ckpts / latest)])
    assert verify.returncode == 0, verify.stderr
    again = run(command(out, tokenizer_dir, *big, "--export", "false", steps=int(latest[5:]) + 2))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpts / latest}" in again.stdout
    assert not interrupted.exists()  # the next commit removed what the killed save left


def _has_shards(folder) -> bool:
    """Some shard is written in `folder`, which may be renamed into place while we look."""
    try:
        return any(folder.rglob("*.distcp"))
    except FileNotFoundError:
        return False


def _launch(tokenizer_dir, out, nproc, backend, steps, *extra):
    """Global batch 32 either way (2 ranks x 16 or 1 x 32): the same samples follow a checkpoint. No export
    unless `extra` asks for one (--export true): the checkpoints are what these runs compare."""
    cmd = command(
        out, tokenizer_dir, "--backend", backend, "--export", "false", *extra,
        nproc=nproc, batch_size=32 // nproc, steps=steps,
    )  # fmt: skip
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory, tokenizer_dir):
    """A 16-step run per (ranks, backend), made once: two cases below resume the same 2-rank DDP run."""
    made = {}

    def get(nproc, backend):
        if (nproc, backend) not in made:
            out = tmp_path_factory.mktemp(f"saved-{nproc}-{backend}") / "run"
            _launch(tokenizer_dir, out, nproc, backend, 16)
            made[nproc, backend] = out
        return made[nproc, backend]

    return get


def test_fsdp_starts_from_the_weights_ddp_starts_from(saved_runs):
    """A model trained from scratch: FSDP2 keeps each rank's own slice of the new weights (DDP copies rank
    0's), so every rank draws them under one seed; the same seed then trains alike on either backend."""
    ddp, fsdp = losses(saved_runs(2, "ddp")), losses(saved_runs(2, "fsdp"))
    for step in range(1, 5):  # same weights, same batches: only reduction order may differ
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5), step


def test_the_same_checkpoint_evaluates_alike_on_one_and_two_ranks(tmp_path, tokenizer_dir, saved_runs):
    """Held-out rows are masked from (seed, row), not from each rank's stream: the 2-rank run's last
    checkpoint, resumed by one process with no step left, counts the same masked tokens right."""
    saved = saved_runs(2, "ddp")
    _launch(
        tokenizer_dir, tmp_path / "one", 1, "ddp", 16, "--resume", str(saved / "checkpoints" / "step-000016")
    )
    two, one = (final_metrics(read_metrics(out)) for out in (saved, tmp_path / "one"))
    assert one["eval/mlm_accuracy"] == two["eval/mlm_accuracy"]  # exact: counts summed over ranks
    assert one["eval/loss/mlm"] == pytest.approx(two["eval/loss/mlm"], rel=1e-6)  # fp32 sums per batch


@pytest.fixture(scope="module")
def checkpoint_exports(tmp_path_factory):
    """`python -m recipebox.checkpoints export` of a checkpoint, made once: two cases below read the same one."""
    return functools.cache(lambda ckpt: export_checkpoint(ckpt, tmp_path_factory.mktemp("exported") / "out"))


@pytest.mark.parametrize(
    "saved_by, saved_backend, resumed_by, resumed_backend",
    [(2, "ddp", 1, "ddp"), (1, "ddp", 2, "ddp"), (2, "ddp", 2, "fsdp"), (2, "fsdp", 2, "ddp")],
)
def test_resharding_keeps_weights_exact_and_training_on_course(
    tmp_path,
    tokenizer_dir,
    saved_runs,
    checkpoint_exports,
    saved_by,
    saved_backend,
    resumed_by,
    resumed_backend,
):
    saved = saved_runs(saved_by, saved_backend)
    ckpt = saved / "checkpoints" / "step-000008"
    # Zero further steps: the resumed model must be the saved one, bit for bit.
    same = _launch(tokenizer_dir, tmp_path / "resumed", resumed_by, resumed_backend, 8, "--resume", str(ckpt),
                   "--export", "true")  # fmt: skip
    if saved_by != resumed_by:
        assert f"saved by {saved_by} rank(s), resumed by {resumed_by}" in same.stdout
    assert same_weights(checkpoint_exports(ckpt), tmp_path / "resumed" / "export")
    # Eight more steps over the same batches; with another world size the masking draws differ, so the
    # loss agrees within noise; with the same world size and another backend, up to reduction order.
    cont = tmp_path / "continued"
    _launch(tokenizer_dir, cont, resumed_by, resumed_backend, 16, "--resume", str(ckpt))
    ref, got = losses(saved), losses(cont)
    assert sorted(got) == list(range(9, 17))
    if saved_by == resumed_by:
        for step, loss in got.items():
            assert loss == pytest.approx(ref[step], rel=1e-4)
    mean_ref, mean_got = sum(ref[s] for s in got) / 8, sum(got.values()) / 8
    assert abs(mean_got - mean_ref) / mean_ref < 0.03


def test_a_log_window_cut_by_a_checkpoint_logs_its_mean_on_another_world_size(tmp_path, tokenizer_dir):
    """Logged every 8 steps, saved at 4 by one process, resumed there by two ranks: the loss logged at step 8
    is the mean over all 8 steps, as in the uninterrupted run (within the noise of other masking draws),
    not 0.75 of it (the saved half was counted at one rank's weight)."""
    whole = tmp_path / "whole"
    _launch(tokenizer_dir, whole, 1, "ddp", 8, "--log-every", "8")
    ckpt = whole / "checkpoints" / "step-000004"
    _launch(tokenizer_dir, tmp_path / "resumed", 2, "ddp", 8, "--log-every", "8", "--resume", str(ckpt))
    (mean,), (resumed,) = losses(whole).values(), losses(tmp_path / "resumed").values()
    assert resumed == pytest.approx(mean, rel=0.03)


def test_resume_never_refuses_an_existing_run(tmp_path, tokenizer_dir, reference):
    proc = run(command(reference, tokenizer_dir, "--resume", "never", nproc=1))
    assert (
        proc.returncode == 2 and "already holds checkpoints" in proc.stderr and "--resume auto" in proc.stderr
    )


def _snapshot(run_dir) -> dict[str, bytes]:
    """Every file a run folder holds, by relative path: what a refused command must leave as it was (the
    tokenised-data cache aside: `datasets` leaves lock files there, and another corpus adds its own table)."""
    files = [
        p for p in sorted(run_dir.rglob("*")) if p.is_file() and p.relative_to(run_dir).parts[0] != "cache"
    ]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files}


def test_a_rerun_on_other_training_data_is_refused_not_continued(tmp_path, tokenizer_dir, reference):
    """The run folder's checkpoints are the same training continued: the same command with another corpus
    (here half the toy one) must not resume step 24 of the first corpus and replace its export."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    half = tmp_path / "half.txt"
    documents = (REPO / "data" / "toy" / "mlm_nsp" / "corpus.txt").read_text(encoding="utf-8").split("\n\n")
    half.write_text("\n\n".join(documents[: len(documents) // 2]), encoding="utf-8")
    before = _snapshot(out)
    proc = run(command(out, tokenizer_dir, "--train-files", str(half), nproc=1))
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "step-000024 was trained on other training data" in proc.stderr and "--output-dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(out) == before


def test_a_run_whose_every_checkpoint_is_damaged_stops_instead_of_starting_again(
    tmp_path, tokenizer_dir, reference
):
    """Training from step 0 would overwrite the run's export and leave it nothing to go back to."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for folder in (out / "checkpoints").glob("step-*"):
        (folder / "rank-00000.safetensors").unlink()
    before = _snapshot(out)
    proc = run(command(out, tokenizer_dir, nproc=1))
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "none of this run's checkpoints verifies" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(out) == before


def test_verify_follows_latest_and_a_run_folder_is_told_its_newest_checkpoint(reference, capsys):
    from recipebox.checkpoints.__main__ import main

    newest = reference / "checkpoints" / "step-000024"
    assert main(["verify", "--sizes-only", str(reference / "checkpoints" / "latest")]) == 0
    assert f"{newest}: complete, step 24" in capsys.readouterr().out
    for folder in (reference, reference / "checkpoints"):
        assert main(["verify", str(folder)]) == 2
        assert f"{folder} is not a checkpoint but holds them; pass one, e.g. {newest}" in (
            capsys.readouterr().err
        )


def test_verify_names_an_unreadable_pointer_or_manifest(tmp_path, capsys):
    from recipebox.checkpoints.__main__ import main

    step = tmp_path / "step-000001"
    (step / "manifest.json").mkdir(parents=True)  # not a file
    (tmp_path / "latest").write_bytes(b"\xffstep-000001")  # not UTF-8
    assert main(["verify", str(step)]) == 2
    assert f"{step / 'manifest.json'}: corrupt (" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "latest")]) == 2
    assert f"{tmp_path / 'latest'}: unreadable (" in capsys.readouterr().err


def test_resuming_with_another_model_size_stops_naming_the_tensor_and_keeps_the_runs_config(
    tokenizer_dir, reference
):
    """The same command with --hidden-size 48 where the run's checkpoints hold 32: exit 2 with the first
    tensor that differs and the fix (it was a DCP traceback), and config.yaml and model_config still
    describe the checkpoints (they were rewritten before the load failed)."""
    kept = {p: p.read_bytes() for p in [reference / "config.yaml", *(reference / "model_config").iterdir()]}
    proc = run(command(reference, tokenizer_dir, "--hidden-size", "48", nproc=1))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not fit the model it is loaded into (" in proc.stderr and "mismatch" in proc.stderr
    assert "hf/config.json holds them) or give a new --output-dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in kept} == kept


def test_resuming_late_in_a_big_epoch_iterates_only_what_is_left():
    """The position is an index into a permutation; nothing before it is read or iterated: the iterator a
    late resume gets holds the rest of the epoch alone (a skip by iterating would hold all of it, or be a
    generator of unknown length). Counted, not timed: a timing on a busy 2-core machine flaked."""
    import operator

    sampler = ShardedSampler(4_000_000, rank=1, world_size=2, batch_size=32, seed=0)
    per_rank = 2_000_000
    for start in (32, 1_999_000):
        sampler.set_epoch(5, start=start)
        assert operator.length_hint(iter(sampler), -1) == per_rank - start == len(sampler)
    sampler.set_epoch(5)
    tail = list(iter(sampler))[1_999_000:]
    sampler.set_epoch(5, start=1_999_000)
    assert list(sampler) == tail


def test_minutes_cadence_saves_on_every_rank_together(tmp_path, tokenizer_dir):
    """--save-every-minutes alone (no step cadence): ranks vote, so a save never waits on a lone rank."""
    out = tmp_path / "run"
    cadence = ["--save-every", "0", "--save-every-minutes", "0.0005", "--keep-last", "0", "--export", "false"]
    cmd = command(out, tokenizer_dir, *cadence, steps=12)
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert len(saved) >= 4 and saved[-1] == 12, saved  # 30 ms apart: most steps save, the last always
    # --export false: no export/, and the run says how to make one from its last checkpoint
    assert not (out / "export").exists()
    assert f"python -m recipebox.checkpoints export {out / 'checkpoints' / 'step-000012'} DEST" in proc.stdout
    for step in saved:
        manifest = json.loads((out / "checkpoints" / f"step-{step:06d}" / "manifest.json").read_text())
        assert manifest["meta"]["world_size"] == 2


def test_export_carries_any_processor_tokenizer_or_feature_extractor(tmp_path):
    """`python -m recipebox.checkpoints export` takes the run's processor from hf/processor: a tokenizer alone, or a
    processor holding a feature extractor and a tokenizer (speech); hf/tokenizer of older checkpoints too."""
    from transformers import (
        PreTrainedTokenizerFast,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Processor,
    )  # fmt: skip

    from recipebox.checkpoints.__main__ import load_processor
    from recipebox.data.tokenizer import train_wordpiece

    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<pad>": 0, "<unk>": 1, "|": 2, "a": 3, "b": 4}))
    speech = Wav2Vec2Processor(
        feature_extractor=Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16000, return_attention_mask=True
        ),
        tokenizer=Wav2Vec2CTCTokenizer(
            str(vocab), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
        ),
    )
    speech.save_pretrained(tmp_path / "speech" / "hf" / "processor")
    loaded = load_processor(tmp_path / "speech" / "hf")
    assert isinstance(loaded, Wav2Vec2Processor) and loaded.feature_extractor.sampling_rate == 16000
    assert loaded.tokenizer.convert_tokens_to_ids(["a", "b"]) == [3, 4]

    text = train_wordpiece(["a cat sat on the mat", "the dog sat"], vocab_size=60)
    for name in ("processor", "tokenizer"):  # today's folder and the older checkpoints' one
        text.save_pretrained(tmp_path / name / "hf" / name)
        loaded = load_processor(tmp_path / name / "hf")
        assert (
            isinstance(loaded, PreTrainedTokenizerFast)
            and loaded("the cat").input_ids == text("the cat").input_ids
        )
    assert load_processor(tmp_path / "none") is None


def test_a_truncated_or_tokenizerless_export_is_named_before_anything_loads(tmp_path, tokenizer_dir):
    """predict, the demos and --model read a folder someone copied: a weights file cut short, or an export
    without its tokenizer (transformers then builds an empty one and answers nonsense), is named with the fix."""
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    from recipebox.checkpoints.export import check_export
    from recipebox.checkpoints.sharded import CheckpointError
    from recipebox.launch.recipe import pretrained_source

    good = tmp_path / "export"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, architectures=["BertForPreTraining"])  # fmt: skip
    BertForPreTraining(config).save_pretrained(good)
    tok.save_pretrained(good)
    assert check_export(good, "mlm_nsp") == str(good) and pretrained_source(str(good)) == str(good)
    cut, bare = shutil.copytree(good, tmp_path / "cut"), shutil.copytree(good, tmp_path / "bare")
    weights = cut / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    for check in (lambda: check_export(cut, "mlm_nsp"), lambda: pretrained_source(str(cut))):
        with pytest.raises(CheckpointError, match=f"{weights} does not load .*truncated or damaged"):
            check()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(
        CheckpointError, match="holds no tokenizer or feature extractor.*export the run again"
    ):
        check_export(bare, "mlm_nsp")
    # An export lists the files its tokenizer wrote: one of them missing is named (transformers would load
    # without it, or fail with a traceback that names neither the folder nor the fix).
    from recipebox.checkpoints.export import PROCESSOR_LIST, export_hf

    made = export_hf(BertForPreTraining(config), tok, tmp_path / "made", title="T", metrics={}, config={})
    listed = json.loads((made / PROCESSOR_LIST).read_text())
    assert "tokenizer.json" in listed and "config.json" not in listed and check_export(made, "mlm_nsp")
    (made / "tokenizer.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"made lacks tokenizer.json of its tokenizer.*export the run again"
    ):
        check_export(made, "mlm_nsp")
    (made / PROCESSOR_LIST).write_text('{"tokenizer.json": 1}')
    with pytest.raises(CheckpointError, match=rf"{PROCESSOR_LIST} is not a list of file names"):
        check_export(made, "mlm_nsp")
    (made / PROCESSOR_LIST).write_text("[")
    with pytest.raises(CheckpointError, match=rf"{PROCESSOR_LIST} does not read"):
        check_export(made, "mlm_nsp")
    (made / "chat_templates").mkdir()  # a folder a processor wrote counts as there
    (made / PROCESSOR_LIST).write_text('["tokenizer_config.json", "chat_templates"]')
    assert check_export(made, "mlm_nsp")


def overwrite_middle(path, size=4096):
    """4 KB in the middle of a file overwritten with other bytes; its size stays the same."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - size // 2)
    data[start : start + size] = bytes(255 - b for b in data[start : start + size])
    path.write_bytes(bytes(data))


@pytest.fixture
def small_checkpoint(tmp_path):
    """A one-process checkpoint of a tiny model and its optimizer, as the loop writes it."""
    import torch

    from recipebox.checkpoints.sharded import save_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    rank_state = {"rng/torch": torch.get_rng_state()}
    meta = {"step": 3, "world_size": 1}
    path = save_checkpoint(tmp_path / "ckpts", 3, model=model, optimizer=optimizer, rank_state=rank_state,
                           rank_meta={}, meta=meta, extra_files={"hf/config.json": tmp_path / "hf" / "config.json"})  # fmt: skip
    return path, model, optimizer


@pytest.mark.parametrize("which", ["model and optimizer shard", "rank state", "metadata", "hf config"])
def test_same_size_corruption_of_any_file_is_caught(small_checkpoint, which):
    from recipebox.checkpoints.__main__ import export_checkpoint
    from recipebox.checkpoints.sharded import (
        CheckpointError,
        latest_complete_checkpoint,
        load_checkpoint,
        verify_checkpoint,
    )

    path, model, optimizer = small_checkpoint
    manifest = verify_checkpoint(path)
    assert manifest["hash"] == "xxh3_64" and set(manifest["hashes"]) == set(manifest["files"])
    target = {
        "model and optimizer shard": next((path / "state").glob("*.distcp")),
        "rank state": path / "rank-00000.safetensors",
        "metadata": path / "state" / ".metadata",
        "hf config": path / "hf" / "config.json",
    }[which]
    overwrite_middle(target, size=2)
    name = str(target.relative_to(path))
    with pytest.raises(CheckpointError, match=f"shard {name} is corrupt: same size"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"shard {name} is corrupt"):
        export_checkpoint(path, path.parent / "export")
    with pytest.raises(CheckpointError, match=f"shard {name} is corrupt"):
        load_checkpoint(path, model=model, optimizer=optimizer)
    skipped = []
    assert latest_complete_checkpoint(path.parent, report=skipped.append) is None
    assert f"shard {name} is corrupt" in skipped[0]
    verify_checkpoint(path, checksums=False)  # sizes only: the switch's documented blind spot


@pytest.mark.parametrize(
    "edit", ['"step": 3', '"world_size": 1'], ids=["the step", "the world size"]
)  # fmt: skip
def test_a_manifest_changed_in_place_is_caught(small_checkpoint, edit):
    """The manifest is one more file a bad sector or a faulty copy can alter without breaking its JSON: a
    digit changed in place (resume would load another step, or skip the saved RNG states) is caught by the
    manifest's own hash, and so is a hashes table that no longer names the files."""
    from recipebox.checkpoints.sharded import MANIFEST, CheckpointError, verify_checkpoint

    path = small_checkpoint[0]
    text = (path / MANIFEST).read_text()
    assert edit in text
    (path / MANIFEST).write_text(text.replace(edit, edit[:-1] + "8"))
    for checksums in (True, False):
        with pytest.raises(CheckpointError, match="manifest.json: corrupt \\(it does not match its own hash"):
            verify_checkpoint(path, checksums=checksums)
    manifest = json.loads(text)
    name = sorted(manifest["hashes"])[0]
    del manifest["hashes"][name], manifest["self"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="its hashes and its files name different files"):
        verify_checkpoint(path)


class RunsCode:
    """Unpickled, it runs a shell command: what a crafted checkpoint could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def replace_and_resize(path, name: str, data: bytes) -> None:
    """Puts `data` in the checkpoint's file `name`, with a manifest that agrees (as whoever made it would)."""
    from recipebox.checkpoints.sharded import MANIFEST

    (path / name).write_bytes(data)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.pop("hash", None), manifest.pop("hashes", None), manifest.pop("self", None)
    manifest["files"][name] = len(data)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_whose_pickles_hold_code_is_refused_not_run(small_checkpoint, tmp_path):
    """DCP's index (.metadata) is a pickle, and its planner torch.loads the optimizer's plain state with
    weights_only=False: a checkpoint someone else made could run code as the user who resumes or exports it.
    Only the index's own classes are built, every torch.load is weights-only, and the load is refused."""
    import io
    import pickle

    import torch

    from recipebox.checkpoints.__main__ import export_checkpoint
    from recipebox.checkpoints.sharded import CheckpointError, load_checkpoint, loading_safely

    path, model, optimizer = small_checkpoint
    marker = tmp_path / "ran"
    replace_and_resize(path, "state/.metadata", pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"posix.system is not part of a checkpoint's index"):
        load_checkpoint(path, model=model, optimizer=optimizer)
    from transformers import BertConfig

    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, architectures=["BertForMaskedLM"])  # fmt: skip
    replace_and_resize(path, "hf/config.json", config.to_json_string().encode())  # an exportable checkpoint
    with pytest.raises(CheckpointError, match="holds pickled objects beyond weights and plain state"):
        export_checkpoint(path, tmp_path / "export")
    buffer = io.BytesIO()
    torch.save({"param_groups": [{"lr": 0.1}], "x": RunsCode(marker)}, buffer)
    with pytest.raises(CheckpointError, match="posix.system is not allowed"), loading_safely(tmp_path):
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # as DCP's planner and DeepSpeed ask
    assert not marker.exists()
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)["param_groups"]  # outside: as asked
    assert marker.exists()  # (the test's own file, to show the payload is real)


def test_checkpoints_without_hashes_still_load_with_a_notice(small_checkpoint):
    """Checkpoints written before content hashes (or with --checkpoint-checksums false) have sizes only."""
    from recipebox.checkpoints.sharded import MANIFEST, load_checkpoint, verify_checkpoint

    path, model, optimizer = small_checkpoint
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["hash"], manifest["hashes"], manifest["self"]  # as written before either existed
    (path / MANIFEST).write_text(json.dumps(manifest))
    notices = []
    assert verify_checkpoint(path, report=notices.append)["step"] == 3
    assert notices == [f"{path}: its manifest has sizes only (no content hashes); checked by size"]
    meta, rank_state, _ = load_checkpoint(path, model=model, optimizer=optimizer)
    assert meta["step"] == 3 and "rng/torch" in rank_state


def test_async_save_sigkill_then_the_same_command_continues_exactly(tmp_path, tokenizer_dir, reference):
    """--async-save: the same run as `reference`, killed mid-training; every committed checkpoint verifies
    (content included), none is left half-committed, and the same command continues bit for bit."""
    out = tmp_path / "run"
    cmd = command(out, tokenizer_dir, "--async-save", "true", "--export", "false")
    latest = sigkill_one_rank_after(cmd, out, 9)
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        verify = run([sys.executable, "-m", "recipebox.checkpoints", "verify", str(ckpt)])
        assert verify.returncode == 0, verify.stdout + verify.stderr
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / latest}" in again.stdout
    assert losses(out) == losses(reference)
    assert final_sums(out) == final_sums(reference)
    assert not list((out / "checkpoints").glob(".tmp-*")) and (
        out / "checkpoints" / "latest"
    ).read_text() == ("step-000024")


def test_async_save_under_fsdp_writes_the_same_checkpoint(
    tmp_path, tokenizer_dir, saved_runs, checkpoint_exports
):
    """FSDP2's sharded state through the background save: the same losses and the same weights at step 8
    as the synchronous run of `saved_runs`."""
    sync = saved_runs(2, "fsdp")
    out = tmp_path / "run"
    _launch(tokenizer_dir, out, 2, "fsdp", 16, "--async-save", "true")
    assert losses(out) == losses(sync)
    ckpt = "step-000008"
    mine = export_checkpoint(out / "checkpoints" / ckpt, tmp_path / "exported")
    assert same_weights(mine, checkpoint_exports(sync / "checkpoints" / ckpt))


def test_async_save_copies_the_state_before_training_goes_on(tmp_path):
    """The background save writes the weights as they were when save_checkpoint returned, whatever the
    training does to them while the write is in flight."""
    import torch

    from recipebox.checkpoints.sharded import BackgroundSaves, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    background = BackgroundSaves()
    args = dict(rank_state={"x": torch.zeros(1)}, rank_meta={}, meta={"world_size": 1})
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, background=background, **args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what the next step would do, while the write may still be running
    background.close()
    assert (tmp_path / "latest").read_text() == path.name
    fresh = torch.nn.Linear(256, 256)
    load_checkpoint(path, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoints_are_ordered_by_step_and_pruning_keeps_the_one_just_saved(tmp_path):
    """step-1000000 is newer than step-999000 (not by name); a run resumed from step 16 after the broken
    20 and 24 were skipped keeps its new step 18 under --keep-last 1 (the broken ones are not counted)."""
    from recipebox.checkpoints.sharded import _prune, latest_complete_checkpoint, step_folders

    def make(root, *steps):
        for step in steps:
            folder = root / f"step-{step:06d}"
            folder.mkdir(parents=True)
            manifest = {"step": step, "meta": {}, "files": {}}
            (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")

    big = tmp_path / "big"
    make(big, 999_000, 1_000_000)
    assert [s for s, _ in step_folders(big)] == [999_000, 1_000_000]
    assert latest_complete_checkpoint(big, report=lambda _: None).name == "step-1000000"
    _prune(big, 1, 1_000_000)
    assert [p.name for _, p in step_folders(big)] == ["step-1000000"]

    resumed = tmp_path / "resumed"
    make(resumed, 16, 18, 20, 24)
    (resumed / ".tmp-step-000017" / "state").mkdir(parents=True)  # a save that was killed
    _prune(resumed, 1, 18)
    assert [s for s, _ in step_folders(resumed)] == [18, 20, 24] and not list(resumed.glob(".tmp-*"))


@pytest.mark.parametrize(
    "recipe, config",
    [("ner", "ner"), ("qa", "qa"), ("text_classification", "toxic")],
)
def test_each_fine_tuning_recipe_continues_exactly_after_losing_its_last_checkpoint(tmp_path, recipe, config):
    """The fine-tuning recipes as shipped (pretrained MiniLM, a new head, their own batching: QA's context
    windows, NER's word-aligned labels, multi-label targets), one process, training only: the last checkpoint
    is lost, as in a crash after step 2's save, and the same command does step 3 again with the same loss and
    grad norm."""
    out = tmp_path / "run"
    script = str(REPO / "recipes" / f"{recipe}.py")
    cmd = [sys.executable, script, "--config", f"recipes/configs/{config}.yaml", "--output-dir", str(out)]
    cmd += ["--max-steps", "3", "--save-every", "2", "--log-every", "1", "--export", "false"]
    cmd += ["--eval-every", "0", "--validation-file=", "--test-file=", "--tracker", "none"]
    lose_last_checkpoint_then_rerun(cmd, out)
