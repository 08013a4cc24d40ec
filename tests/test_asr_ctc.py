"""The speech recipe's plumbing as a user meets it, on a few clips written here (tones of different
lengths, wav and flac, 8 and 22.05 kHz, one stereo): a short run trains, evaluates WER/CER, writes its
predictions and exports a folder that `pipeline("automatic-speech-recognition")` loads and `predict`
transcribes with; bad audio and bad manifests stop before training. (Learning real speech needs the toy
speech set; see issue notes.)"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import recipe_runs
from conftest import REPO

from launch.tracking import read_metrics

RECIPE = str(REPO / "recipes" / "asr_ctc.py")
python = functools.partial(recipe_runs.python, RECIPE, timeout=600)
WORDS = ["one two", "three", "go left", "stop", "red four"]


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
    assert 0.0 <= m["eval/cer"] and 0.0 <= m["eval/wer"]
    rows = [json.loads(x) for x in (out / "predictions" / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    assert {r["reference"] for r in rows} == {w for w in WORDS}  # lowercased, "!" ignored
    vocab = json.loads((out / "export" / "vocab.json").read_text())
    assert set(vocab) == set("".join(WORDS).replace(" ", "")) | {"|", "[UNK]", "[PAD]"}
    assert m["train/tflops"] > 0


@pytest.mark.slow
def test_the_export_loads_in_the_pipeline_and_predict_transcribes(asr_run, tmp_path):
    from transformers import pipeline

    from data.speech import read_audio

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


@pytest.mark.parametrize("problem", ["corrupt", "missing", "empty_transcript", "too_long"])
def test_bad_audio_or_manifest_stops_before_training_naming_the_file(tmp_path, problem):
    manifest = write_clips(tmp_path, n=3)
    clip = tmp_path / "clips" / "01.flac"
    extra = []
    if problem == "corrupt":
        clip.write_bytes(b"not audio at all" * 100)
    elif problem == "missing":
        clip.unlink()
    elif problem == "empty_transcript":
        manifest.write_text(manifest.read_text().replace("THREE!", "!!"))
    else:
        extra = ["--max-seconds", "0.55"]
    out = tmp_path / "run"
    proc = python("--train-manifest", str(manifest), "--validation-manifest", "", "--test-manifest", "",
                  "--output-dir", str(out), "--tracker", "none", *extra, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "Traceback" not in proc.stderr
    named = {
        "corrupt": str(clip),
        "missing": str(clip),
        "empty_transcript": "line 3",
        "too_long": "--max-seconds",
    }
    assert named[problem] in last_line
    assert not (out / "metrics.jsonl").exists()
