"""The speech recipe as a user runs it. The default run (a small wav2vec2 from scratch, torchrun with 2 ranks,
on the bundled spoken digits) against a WER floor on the test split's held-out voices; one process
re-evaluating its checkpoint (the same transcripts and counts); its export through `predict` on real speech
(../shared/data/jfk.flac) and in the demo page in a real browser. Plumbing on a few clips written here (tones
of different lengths, wav and flac, 8 and 22.05 kHz, one stereo): a short run's predictions and export; bad
audio and bad manifests stop before training; a stopped run continues with the same losses."""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys

import numpy as np
import pytest
import recipe_runs
import torch
from conftest import REPO, SHARED_DATA
from demo_pages import start_app, stop_apps, wait_for_server
from recipe_runs import final_metrics

from recipebox.launch.tracking import read_metrics

RECIPE = str(REPO / "recipes" / "asr_ctc.py")
python = functools.partial(recipe_runs.python, RECIPE, timeout=600)
WORDS = ["one two", "three", "go left", "stop", "red four"]
TOY = REPO / "data" / "toy" / "speech"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The default run on 2 ranks: 600 steps of 2 x 8 clips, about 1.5 minutes on 2 cores."""
    out = tmp_path_factory.mktemp("asr") / "toy"
    # The README's command as it is (W&B offline is the default tracker), plus the replica check
    proc = recipe_runs.torchrun(RECIPE, "--output-dir", str(out), "--log-every", "50",
                                "--check-replicas", "true", timeout=2400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, read_metrics(out)


@pytest.mark.slow
def test_the_default_run_transcribes_voices_it_never_heard(toy_run):
    """Untrained, the model transcribes nothing right (WER 1.0, measured at step 100 of this run's schedule);
    after 600 steps the held-out voices of the test split come out at WER 0.22-0.41, CER 0.06-0.14, with 33
    to 49 of the 80 clips exact (seeds 42, 1, 2, 3 on one machine; the same seed moves with the CPU: 0.31
    and 0.35 for seed 42 on two machines)."""
    out, records = toy_run
    m = final_metrics(records)
    print({k: round(m[k], 4) for k in ("test/wer", "test/cer", "eval/wer", "eval/cer")})
    assert m["test/wer"] < 0.5 and m["test/cer"] < 0.25
    assert m["replica_param_sums"][0] == m["replica_param_sums"][1]
    rows = [json.loads(x) for x in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 80 and sum(r["transcript"] == r["reference"] for r in rows) >= 25
    tables = recipe_runs.wandb_tables(out, "eval/samples")  # every evaluation's first clips, as W&B tables
    assert tables and all(t["columns"] == ["clip", "reference", "transcript"] for t in tables)
    assert [r[1:] for r in tables[-1]["data"]] == [
        [s["reference"], s["transcript"]] for s in m["eval/samples"]
    ]
    for row in rows[:6]:
        print(f"{row['reference']!r:>24} -> {row['transcript']!r}")


@pytest.mark.slow
def test_one_process_evaluating_the_checkpoint_gives_the_same_transcripts_and_counts(toy_run, tmp_path):
    """The 2-rank run's last checkpoint, resumed by one process with no step left: the same transcripts and
    the same WER and CER (each rank counted its rows' edits; the sums over ranks are exact)."""
    out, records = toy_run
    step = max(r["step"] for r in records)
    one = tmp_path / "one"
    proc = python("--output-dir", str(one), "--resume", str(out / "checkpoints" / f"step-{step:06d}"),
                  "--max-steps", str(step), "--tracker", "none")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine, theirs = final_metrics(read_metrics(one)), final_metrics(records)
    for split in ("validation", "test"):
        two_ranks = (out / "predictions" / f"{split}.jsonl").read_text()
        assert (one / "predictions" / f"{split}.jsonl").read_text() == two_ranks
    for key in ("test/wer", "test/cer", "eval/wer", "eval/cer"):
        assert mine[key] == theirs[key]


@pytest.mark.slow
def test_predict_transcribes_real_speech_as_the_pipeline_does(toy_run):
    """62.5 s of real speech, 16 kHz stereo (the toy model knows only digits, so the words are wrong, but
    the clip goes through reading, downmixing, the export and the pipeline end to end)."""
    from transformers import pipeline

    from recipebox.data.speech import read_audio

    jfk = SHARED_DATA / "jfk.flac"
    if not jfk.is_file():
        pytest.skip(f"{jfk} is not here")
    export = toy_run[0] / "export"
    proc = python("predict", str(export), str(jfk))
    assert proc.returncode == 0, proc.stderr[-2000:]
    asr = pipeline("automatic-speech-recognition", model=str(export))
    assert proc.stdout.rstrip("\n") == asr({"raw": read_audio(jfk), "sampling_rate": 16000})["text"]
    assert set(proc.stdout.strip()) <= set("zeroonetwthfivsxg ")  # the toy vocabulary's characters


def test_predict_without_a_clip_transcribes_the_held_out_clips_of_the_export(toy_run, capsys, tmp_path):
    from recipebox.checkpoints.sharded import CheckpointError
    from recipebox.data.text import DataError
    from recipes.asr_ctc import main, transcribe

    export = toy_run[0] / "export"
    assert main(["predict", str(export)]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    saved = json.loads((export / "examples.json").read_text())["transcribe"]
    assert [path for path, _ in lines] == [str(export / name) for (name,) in saved] and len(lines) == 3
    assert all(text == transcribe(str(export), path) for path, text in lines)
    shared = tmp_path / "shared"  # an export from someone else whose examples.json points outside it
    shutil.copytree(export, shared)
    (shared / "examples.json").write_text(json.dumps({"transcribe": [["../../home/secret.wav"]]}))
    with pytest.raises(CheckpointError, match=r"names .*secret.wav, outside the export; give audio files"):
        main(["predict", str(shared)])
    with pytest.raises(
        DataError, match=r"no such audio file .*nowhere.flac; fix the path or give another clip$"
    ):
        main(["predict", str(export), str(tmp_path / "nowhere.flac")])  # a manifest's fix does not apply


@pytest.mark.slow
def test_demo_page_transcribes_an_uploaded_clip(toy_run, browser):
    from gradio_client import Client, handle_file

    from recipes.asr_ctc import transcribe

    export = toy_run[0] / "export"
    clip = TOY / "clips" / "test" / "0005.flac"
    expected = transcribe(export, clip)
    proc, url, _ = start_app(export)
    try:
        wait_for_server(proc, url)
        page = browser.new_page()
        page.goto(url)
        page.locator("#asr-audio input[type=file]").set_input_files(str(clip))
        page.get_by_role("button", name="Transcribe", exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#asr-out textarea').value.length > 0", timeout=60_000
        )
        assert page.locator("#asr-out textarea").input_value() == expected
        page.close()
        text, note = Client(url, verbose=False).predict(handle_file(str(clip)), api_name="/transcribe")
        assert (text, note) == (expected, "")
    finally:
        stop_apps([proc])


def pooled_rates(rows) -> tuple[float, float]:
    """WER and CER of a split's prediction rows: edits summed over the split over reference lengths summed."""
    from recipebox.data.speech import error_counts

    words, ref_words, chars, ref_chars = (sum(c) for c in zip(*(error_counts(r["reference"], r["transcript"])
                                                                 for r in rows)))  # fmt: skip
    return words / ref_words, chars / ref_chars


def write_clips(folder, n: int = 10):
    """n clips (0.5-1.2 s of tones), and a CSV manifest with paths relative to it."""
    import soundfile as sf

    (folder / "clips").mkdir(parents=True, exist_ok=True)
    rows = ["audio,text"]
    for i in range(n):
        rate = (8000, 16000, 22050)[i % 3]
        t = np.arange(int(rate * (0.5 + 0.07 * i))) / rate
        wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t).astype(np.float32)
        if i == 4:
            wave = np.stack([wave, wave * 0.5], axis=1)  # stereo
        name = f"clips/{i:02d}.{'flac' if i % 2 else 'wav'}"
        sf.write(folder / name, wave, rate)
        rows.append(f"{name},{WORDS[i % len(WORDS)].upper()}!")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv"


@pytest.fixture(scope="module")
def asr_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("asr")
    manifest = write_clips(data)
    out = data / "run"
    proc = python("--train-manifest", str(manifest), "--validation-manifest", str(manifest), "--test-manifest",
                  "", "--output-dir", str(out), "--tracker", "none", "--max-steps", "4", "--batch-size", "4",
                  "--log-every", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, read_metrics(out)


@pytest.mark.slow
def test_a_short_run_scores_wer_and_cer_and_writes_its_predictions(asr_run):
    out, records = asr_run
    m = {k: v for r in records for k, v in r.items()}
    rows = [json.loads(x) for x in (out / "predictions" / "validation.jsonl").read_text().splitlines()]
    assert (m["eval/wer"], m["eval/cer"]) == pytest.approx(pooled_rates(rows), rel=1e-9)
    assert len(rows) == 10
    assert {r["reference"] for r in rows} == {w for w in WORDS}  # lowercased, "!" ignored
    vocab = json.loads((out / "export" / "vocab.json").read_text())
    assert set(vocab) == set("".join(WORDS).replace(" ", "")) | {"|", "[UNK]", "[PAD]"}
    assert m["train/tflops"] > 0


@pytest.mark.slow
def test_the_export_loads_in_the_pipeline_and_predict_transcribes(asr_run, tmp_path):
    from transformers import pipeline

    from recipebox.data.speech import read_audio

    out, _ = asr_run
    export = out / "export"
    clip = sorted((out.parent / "clips").iterdir())[1]
    asr = pipeline("automatic-speech-recognition", model=str(export))
    expected = asr({"raw": read_audio(clip), "sampling_rate": 16000})["text"]
    proc = python("predict", str(export), str(clip))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip("\n") == expected
    examples = json.loads((export / "examples.json").read_text())["transcribe"]
    assert all((export / row[0]).is_file() for row in examples)  # the clips travel with the export


@pytest.mark.parametrize(
    "problem", ["corrupt", "truncated", "missing", "empty_transcript", "too_long", "too_short"]
)
def test_bad_audio_or_manifest_stops_before_training_naming_the_file(tmp_path, problem):
    manifest = write_clips(tmp_path, n=3)
    clip = tmp_path / "clips" / "01.flac"
    extra = []
    if problem == "corrupt":
        clip.write_bytes(b"not audio at all" * 100)
    elif problem == "truncated":  # the header reads, the body does not decode: found by --check-audio full
        clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    elif problem == "missing":
        clip.unlink()
    elif problem == "empty_transcript":
        manifest.write_text(manifest.read_text().replace("THREE!", "!!"))
    elif problem == "too_short":  # 0.5-0.64 s clips have 24-31 frames: no room for 40 characters
        manifest.write_text(
            re.sub(
                r"(?m)^(clips/.*?),.*$", r"\1,a transcript of forty letters for a clip", manifest.read_text()
            )
        )
    else:
        extra = ["--max-seconds", "0.55"]
    out = tmp_path / "run"
    proc = python("--train-manifest", str(manifest), "--validation-manifest", "", "--test-manifest", "",
                  "--output-dir", str(out), "--tracker", "none", *extra, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "Traceback" not in proc.stderr
    named = {
        "corrupt": f"line 3: soundfile cannot read {clip}",
        "truncated": f"line 3: {clip}: soundfile cannot decode it",
        "missing": str(clip),
        "empty_transcript": "line 3",
        "too_long": "--max-seconds",
        "too_short": "every training clip is shorter than its transcript needs (first: ",
    }
    assert named[problem] in last_line
    assert not (out / "metrics.jsonl").exists()


def test_a_clip_too_short_for_its_transcript_is_left_out_of_training_and_named(tmp_path):
    """CTC needs a frame per character: such a row would only add a zeroed infinite loss."""
    manifest = write_clips(tmp_path, n=3)
    manifest.write_text(manifest.read_text().replace("THREE!", "three three three three three three three"))
    out = tmp_path / "run"
    proc = python("--train-manifest", str(manifest), "--validation-manifest", "", "--test-manifest", "",
                  "--output-dir", str(out), "--tracker", "none", "--max-steps", "1", timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data: 1 train clip(s) too short for their transcripts left out (first: " in proc.stdout
    assert "train.csv, line 3: 28 frames, its transcript needs 48)" in proc.stdout  # 41 + 7 between "ee"s


@pytest.mark.slow
def test_a_stopped_run_continues_with_the_same_losses(tmp_path):
    """SIGTERM mid-run: exit 75 after a checkpoint; the same command continues and gives, step for step, the
    losses of an uninterrupted run (SpecAugment's masks and the batch order included)."""
    manifest = write_clips(tmp_path, n=12)
    args = ["--train-manifest", str(manifest), "--validation-manifest", "", "--test-manifest", "",
            "--max-steps", "10", "--save-every", "3", "--log-every", "1", "--batch-size", "4", "--tracker",
            "none", "--num-layers", "1", "--mask-time-prob", "0.3", "--export", "false"]  # fmt: skip
    reference = tmp_path / "reference"
    proc = python("--output-dir", str(reference), *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "stopped"
    cmd = [sys.executable, RECIPE, "--output-dir", str(out), *args]
    assert max(recipe_runs.stop_then_rerun(cmd, out)) < 10
    assert recipe_runs.losses(out) == recipe_runs.losses(reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [["--backend", "fsdp", "--layerdrop", "0.2"], ["--backend", "deepspeed", "--zero-stage", "3"]],
    ids=["fsdp-layerdrop", "zero3"],
)
def test_sharded_backends_train_and_count_every_clip(backend, tmp_path):
    """FSDP2 (with layer drop: every rank drops the same layers) and ZeRO-3 gather layers collectively; an
    uneven validation split (9 clips on 2 ranks) is decoded and counted whole, and the export transcribes."""
    manifest = write_clips(tmp_path, n=9)
    out = tmp_path / "run"
    proc = recipe_runs.torchrun(RECIPE, *backend, "--output-dir", str(out), "--tracker", "none", "--max-steps",
                                "3", "--batch-size", "2", "--train-manifest", str(manifest),
                                "--validation-manifest", str(manifest), "--test-manifest", "", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = final_metrics(read_metrics(out))
    rows = [json.loads(x) for x in (out / "predictions" / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and len({r["audio"] for r in rows}) == 9
    assert (m["eval/wer"], m["eval/cer"]) == pytest.approx(pooled_rates(rows), rel=1e-9)  # every clip, once
    assert (out / "export" / "processor_config.json").is_file() and (
        out / "export" / "model.safetensors"
    ).is_file()


def tiny_task(tmp_path, clips: int):
    """The recipe's task over `clips` written clips, with a one-layer model in eval mode (no SpecAugment)."""
    from recipebox.data.speech import build_vocab, make_processor, normalize_transcript, read_manifest
    from recipes.asr_ctc import ASRConfig, ASRTask, _setup_model

    utts = read_manifest(str(write_clips(tmp_path, n=clips)), "audio", "text")
    texts = [normalize_transcript(u.text, ASRConfig.chars_to_ignore) for u in utts]
    cfg = ASRConfig(num_layers=1, mask_time_prob=0.0)
    processor = make_processor(build_vocab(texts), tmp_path / "processor")
    model = _setup_model(cfg, processor, 10).eval()
    return ASRTask(cfg, processor, {"train": (utts, texts)}, model, tmp_path)


def test_an_export_missing_a_file_of_its_processor_is_named(tmp_path):
    """wav2vec2's processor writes its feature extractor into processor_config.json and its characters into
    vocab.json: the export lists both, and predict and the demo name a missing one instead of failing in
    transformers."""
    from recipebox.checkpoints.export import PROCESSOR_LIST, check_export, export_hf
    from recipebox.checkpoints.sharded import CheckpointError

    task = tiny_task(tmp_path, clips=2)
    export = export_hf(task.model, task.processor, tmp_path / "export", title="T", metrics={}, config={})
    assert {"processor_config.json", "vocab.json"} <= set(json.loads((export / PROCESSOR_LIST).read_text()))
    assert check_export(export, "asr_ctc")
    (export / "processor_config.json").unlink()
    with pytest.raises(
        CheckpointError, match="export lacks processor_config.json of its tokenizer or feature"
    ):
        check_export(export, "asr_ctc")


def test_static_shape_batches_bucket_the_transcripts_apart_and_keep_the_loss(tmp_path):
    """Under --backend xla every batch is padded to fixed lengths: the audio to its bucket (powers of two up
    to --max-seconds), the transcripts to buckets of their own (16 here, not the audio's 16,384). The CTC loss
    of the padded batch is the unpadded batch's, which is the model's own (reduction "sum")."""
    from recipebox.kernels.buckets import BucketedCollate, bucket_lengths

    task = tiny_task(tmp_path, clips=4)
    model = task.model
    rows = [task.splits["train"][i] for i in range(4)]
    plain = task.collate(rows)
    fixed = BucketedCollate(task.collate, bucket_lengths(task.max_length))(rows)
    assert plain["input_values"].shape[1] < fixed["input_values"].shape[1] == 16384
    longest = plain["labels"].shape[1]
    assert fixed["labels"].shape[1] == 16 and (fixed["labels"][:, longest:] == -100).all()
    assert torch.equal(fixed["labels"][:, :longest], plain["labels"])
    with torch.no_grad():
        loss = task.loss(model, plain)[0]["loss"]
        padded = task.loss(model, fixed)[0]["loss"]
        inputs = {k: plain[k] for k in ("input_values", "attention_mask", "labels")}
        own = model(**inputs).loss
    assert padded.item() == pytest.approx(loss.item(), rel=1e-4)
    assert loss.item() == pytest.approx(own.item(), rel=1e-5)


def test_a_batch_of_clips_shorter_than_the_front_end_is_padded_up_to_it(tmp_path):
    """A 12.5 ms clip alone in a batch (the last of an evaluation split) stopped the run inside wav2vec2's
    convolutions; it is padded to their 400-sample receptive field, gets no frame and decodes to nothing."""
    from recipes.asr_ctc import greedy_decode

    task = tiny_task(tmp_path, clips=2)
    model, processor = task.model, task.processor
    assert task.min_samples == 400
    row = dict(task.splits["train"][0])
    row["input_values"] = row["input_values"][:200]
    batch = task.collate([row])
    assert batch["input_values"].shape[1] == 400 and batch["attention_mask"].sum() == 200
    with torch.no_grad():
        losses, (logits, frames) = task.loss(model, batch)
    assert frames.tolist() == [0] and greedy_decode(processor, logits, frames) == [""]
    assert task.collate([task.splits["train"][0]])["input_values"].shape[1] > 400  # longer clips as they are


@pytest.mark.slow
def test_a_datasets_name_trains_on_two_ranks(tmp_path):
    """A `datasets` folder (parquet, an Audio column of clip bytes) as every split: rank 0 writes the clips
    into RUN/cache/audio once, the other rank reuses them; evaluation covers the whole split."""
    from test_speech_data import write_audio_dataset

    rows = [line.split(",") for line in (TOY / "test.csv").read_text().splitlines()[1:11]]
    clips, texts = [TOY / audio for audio, _ in rows], [text.upper() for _, text in rows]
    write_audio_dataset(tmp_path / "ds", clips, texts, split="train")
    write_audio_dataset(tmp_path / "ds", clips[:5], texts[:5], split="test")
    out = tmp_path / "run"
    proc = recipe_runs.torchrun(RECIPE, "--train-manifest", str(tmp_path / "ds"), "--validation-manifest",
                                str(tmp_path / "ds"), "--validation-split", "test", "--test-manifest", "",
                                "--text-column", "sentence", "--output-dir", str(out), "--tracker", "none",
                                "--max-steps", "2", "--batch-size", "2", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "cache" / "audio" / "train").iterdir())) == 10
    rows = [json.loads(x) for x in (out / "predictions" / "validation.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [t.lower() for t in texts[:5]]
