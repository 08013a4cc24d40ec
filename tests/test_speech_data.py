"""Speech data: audio read, mixed to mono and resampled to 16 kHz; manifests (CSV, JSON lines, folders) and
their errors; duration limits; transcripts, the character vocabulary and the CTC processor; WER/CER counts
checked by hand and against jiwer."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from recipebox.data.speech import (
    PAD,
    SAMPLE_RATE,
    UNK,
    WORD_DELIMITER,
    Utterance,
    build_vocab,
    check_durations,
    edit_distance,
    error_counts,
    make_processor,
    normalize_transcript,
    read_audio,
    read_manifest,
    unseen_characters,
)
from recipebox.data.text import DataError


def sine(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def write_clip(path, rate: int = 22050, seconds: float = 0.5, freq: float = 440.0, **kw) -> str:
    soundfile.write(str(path), sine(freq, rate, seconds), rate, **kw)
    return str(path)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def corrupt(path) -> str:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return str(path)


# -- read_audio ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [22050, 44100, 8000, 16000])
def test_read_audio_resamples_to_16k_and_keeps_the_frequency(tmp_path, rate):
    n = int(rate * 1.0)
    path = write_clip(tmp_path / "a.wav", rate, seconds=1.0, freq=440.0, subtype="PCM_16")
    out = read_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - n * SAMPLE_RATE / rate) <= 1
    assert abs(peak_hz(out, SAMPLE_RATE) - 440.0) <= 2.0
    assert 0.45 < np.abs(out[100:-100]).max() < 0.55  # amplitude kept, away from the filter's edges


def test_read_audio_other_rate(tmp_path):
    path = write_clip(tmp_path / "a.wav", 16000, seconds=1.0, freq=1000.0)
    out = read_audio(path, rate=8000)
    assert len(out) == 8000 and abs(peak_hz(out, 8000) - 1000.0) <= 2.0


def test_read_audio_averages_stereo(tmp_path):
    left, right = sine(300, 16000, 0.5), sine(1200, 16000, 0.5)
    soundfile.write(tmp_path / "s.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    out = read_audio(tmp_path / "s.wav")
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("suffix,lossless", [(".wav", True), (".flac", True), (".ogg", False)])
def test_read_audio_formats(tmp_path, suffix, lossless):
    path = write_clip(tmp_path / f"a{suffix}", 16000, seconds=0.5)
    out = read_audio(path)
    assert len(out) == 8000
    assert abs(peak_hz(out, SAMPLE_RATE) - 440.0) <= 3.0
    if lossless:
        np.testing.assert_allclose(out, sine(440, 16000, 0.5), atol=1e-4)


def test_read_audio_espeak_clip(tmp_path):
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "one_two.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "one two"], check=True, capture_output=True)
    info = soundfile.info(str(path))
    out = read_audio(path)
    assert abs(len(out) - info.frames * SAMPLE_RATE / info.samplerate) <= 1
    assert np.abs(out).max() > 0.05


def test_read_audio_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.wav.*remove it from the manifest"):
        read_audio(tmp_path / "missing.wav")
    with pytest.raises(DataError, match=r"bad\.wav.*cannot read.*16-bit WAV or FLAC"):
        read_audio(corrupt(tmp_path / "bad.wav"))
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.wav.*0 bytes"):
        read_audio(tmp_path / "empty.wav")
    soundfile.write(tmp_path / "silent.wav", np.zeros(0), 16000)  # a header and no samples
    with pytest.raises(DataError, match=r"silent\.wav.*no audio samples"):
        read_audio(tmp_path / "silent.wav")


# -- read_manifest ---------------------------------------------------------------------------------------
@pytest.fixture
def clips(tmp_path):
    (tmp_path / "clips").mkdir()
    write_clip(tmp_path / "clips" / "a.wav", 22050, seconds=0.5)
    write_clip(tmp_path / "clips" / "b.flac", 16000, seconds=1.5)
    return tmp_path


def test_read_manifest_csv(clips):
    (clips / "train.csv").write_text('audio,text\nclips/a.wav,"Hello, world"\nclips/b.flac,one two\n')
    utts = read_manifest(str(clips / "train.csv"))
    assert [u.audio for u in utts] == [str(clips / "clips" / "a.wav"), str(clips / "clips" / "b.flac")]
    assert [u.text for u in utts] == ["Hello, world", "one two"]
    assert utts[0].where.endswith("train.csv, line 2") and utts[1].where.endswith("train.csv, line 3")
    assert utts[0].seconds == pytest.approx(0.5, abs=1e-4) and utts[1].seconds == pytest.approx(1.5)


def test_read_manifest_tsv_and_json_lines_with_absolute_and_renamed_columns(clips):
    rows = [
        {"path": "clips/a.wav", "sentence": "one"},
        {"path": str(clips / "clips/b.flac"), "sentence": "two"},
    ]
    (clips / "sub").mkdir()
    (clips / "sub" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"sub/dev\.jsonl, line 1: no such audio file .*sub/clips/a\.wav"):
        read_manifest(str(clips / "sub" / "dev.jsonl"), "path", "sentence")  # relative to the manifest
    rows[0]["path"] = "../clips/a.wav"
    (clips / "sub" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    utts = read_manifest(str(clips / "sub" / "dev.jsonl"), audio_column="path", text_column="sentence")
    assert [(u.audio, u.text) for u in utts] == [
        (str(clips / "clips" / "a.wav"), "one"),
        (str(clips / "clips" / "b.flac"), "two"),
    ]
    (clips / "test.tsv").write_text("audio\ttext\nclips/b.flac\tone, two\n")
    assert [u.text for u in read_manifest(str(clips / "test.tsv"))] == ["one, two"]


def test_read_manifest_folder(clips):
    (clips / "clips" / "a.txt").write_text("One two\n")
    (clips / "clips" / "nested").mkdir()
    write_clip(clips / "clips" / "nested" / "c.ogg", 16000)
    (clips / "clips" / "nested" / "c.txt").write_text("three")
    (clips / "clips" / "b.txt").write_text("four")
    (clips / "clips" / "notes.md").write_text("not audio")
    (clips / "clips" / "._a.wav").write_bytes(b"\x00\x05junk")  # a hidden file is not a clip
    utts = read_manifest(str(clips / "clips"))
    assert [u.audio.removeprefix(str(clips / "clips")) for u in utts] == [
        "/a.wav",
        "/b.flac",
        "/nested/c.ogg",
    ]
    assert [u.text for u in utts] == ["One two", "four", "three"]
    assert utts[0].where == str(clips / "clips" / "a.txt")


def test_read_manifest_folder_errors(clips):
    with pytest.raises(DataError, match=r"a\.wav: no transcript a\.txt next to it"):
        read_manifest(str(clips / "clips"))
    (clips / "clips" / "a.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"a\.txt: the transcript is empty"):
        read_manifest(str(clips / "clips"))
    (clips / "none").mkdir()
    with pytest.raises(DataError, match=r"none: no \.wav/\.flac/\.ogg files"):
        read_manifest(str(clips / "none"))
    (clips / "clips" / "a.txt").write_text("one")
    (clips / "clips" / "b.txt").write_text("two")
    corrupt(clips / "clips" / "c.wav")
    (clips / "clips" / "c.txt").write_text("three")
    with pytest.raises(DataError, match=r"c\.wav: soundfile cannot read .*c\.wav"):
        read_manifest(str(clips / "clips"))


@pytest.mark.parametrize(
    "body,message",
    [
        ("audio,text\nclips/missing.wav,hi\n", r"train\.csv, line 2: no such audio file .*missing\.wav"),
        ("audio,text\nclips,hi\n", r"train\.csv, line 2: .*clips is a folder, not an audio file"),
        ("audio,text\nclips/bad.wav,hi\n", r"train\.csv, line 2: soundfile cannot read .*bad\.wav.*FLAC"),
        ("audio,text\nclips/empty.wav,hi\n", r"train\.csv, line 2: .*empty\.wav is empty"),
        ("audio,text\nclips/a.wav,hi\nclips/b.flac, \n", r"train\.csv, line 3: column 'text' is empty"),
        ("audio,text\n,hi\n", r"train\.csv, line 2: column 'audio' is empty"),
        ("path,text\nclips/a.wav,hi\n", r"no column\(s\) audio \(it has path, text\); set --audio-column"),
        ("audio,words\nclips/a.wav,hi\n", r"no column\(s\) text .*; set --text-column"),
    ],
)
def test_read_manifest_errors(clips, body, message):
    corrupt(clips / "clips" / "bad.wav")
    (clips / "clips" / "empty.wav").write_bytes(b"")
    (clips / "train.csv").write_text(body)
    with pytest.raises(DataError, match=message):
        read_manifest(str(clips / "train.csv"))


def test_read_manifest_bad_paths(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_manifest(str(tmp_path / "nope.csv"))
    (tmp_path / "list.txt").write_text("a.wav\n")
    with pytest.raises(DataError, match=r"list\.txt: not a manifest"):
        read_manifest(str(tmp_path / "list.txt"))
    (tmp_path / "x.jsonl").write_text('{"audio": "a.wav", "text": 3}\n')
    with pytest.raises(DataError, match=r"x\.jsonl, line 1: column 'text' is empty or not text \(3\)"):
        read_manifest(str(tmp_path / "x.jsonl"))


def write_audio_dataset(folder, clips, texts, split: str = "train") -> None:
    """A `datasets` folder as the hub serves one: a parquet split with an Audio column holding each clip's
    bytes (built without decoding: datasets' own audio encoder needs FFmpeg)."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {"audio": [{"bytes": c.read_bytes(), "path": c.name} for c in clips], "sentence": texts}
    )
    ds = ds.cast(datasets.Features({"audio": datasets.Audio(), "sentence": datasets.Value("string")}))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


def test_read_manifest_datasets_name_reads_the_audio_column_undecoded(clips, tmp_path):
    source = [clips / "clips" / "a.wav", clips / "clips" / "b.flac"]
    write_audio_dataset(tmp_path / "ds", source, ["Hello, world", "one two"], split="test")
    cache = tmp_path / "cache"
    utts = read_manifest(str(tmp_path / "ds"), "audio", "sentence", split="test", cache_dir=cache)
    assert [u.text for u in utts] == ["Hello, world", "one two"]
    assert [u.where for u in utts] == [f"{tmp_path / 'ds'}[test] row {i}" for i in (0, 1)]
    assert [Path(u.audio).read_bytes() for u in utts] == [c.read_bytes() for c in source]
    assert Path(utts[1].audio).parent == cache / "test" and utts[1].audio.endswith(".flac")
    assert utts[1].seconds == pytest.approx(1.5)
    written = [Path(u.audio).stat().st_mtime_ns for u in utts]
    again = read_manifest(str(tmp_path / "ds"), "audio", "sentence", split="test", cache_dir=cache)
    assert again == utts and [Path(u.audio).stat().st_mtime_ns for u in again] == written  # not rewritten
    with pytest.raises(DataError, match=r"no column 'text' .* set --text-column"):
        read_manifest(str(tmp_path / "ds"), "audio", "text", split="test", cache_dir=cache)
    with pytest.raises(DataError, match="not a manifest, a folder of clips or a loadable `datasets` name"):
        read_manifest(str(tmp_path / "ds"), "audio", "sentence", split="validation", cache_dir=cache)


# -- check_durations -------------------------------------------------------------------------------------
def test_check_durations():
    utts = [
        Utterance(f"/c/{i}.wav", "x", f"m.csv, line {i + 2}", s) for i, s in enumerate([3.0, 25.0, 10.0, 31])
    ]
    assert check_durations(utts, 40.0) == (utts, 0)
    with pytest.raises(
        DataError, match=r"m\.csv, line 3: /c/1\.wav is 25\.0 s.*--max-seconds 20.*--skip-long"
    ):
        check_durations(utts, 20.0)
    kept, dropped = check_durations(utts, 20.0, skip=True)
    assert kept == [utts[0], utts[2]] and dropped == 2
    assert check_durations(utts, 25.0, skip=True) == ([utts[0], utts[1], utts[2]], 1)  # the limit is kept
    with pytest.raises(DataError, match="all 4 clips are longer"):
        check_durations(utts, 1.0, skip=True)


# -- transcripts, vocabulary, processor ------------------------------------------------------------------
def test_normalize_transcript():
    ignore = ',?.!-;:"'
    assert normalize_transcript('  Hello,  WORLD!\n "Yes" -- no. ', ignore) == "hello world yes no"
    assert normalize_transcript("It's Déjà-vu", ignore) == "it's déjàvu"
    assert normalize_transcript("a\tb", "") == "a b"
    assert normalize_transcript("?!", ignore) == ""


def test_build_vocab():
    vocab = build_vocab(["one two", "ten"])
    assert vocab == {"|": 0, "e": 1, "n": 2, "o": 3, "t": 4, "w": 5, UNK: 6, PAD: 7}
    assert build_vocab(["ten", "one two"]) == vocab  # order of transcripts does not matter
    assert build_vocab(["ba"]) == {
        WORD_DELIMITER: 0,
        "a": 1,
        "b": 2,
        UNK: 3,
        PAD: 4,
    }  # "|" even without spaces
    with pytest.raises(DataError, match="word delimiter"):
        build_vocab(["a|b"])


def test_make_processor_round_trip(tmp_path):
    from transformers import Wav2Vec2Processor

    vocab = build_vocab(["one two", "three"])
    processor = make_processor(vocab, tmp_path / "proc")
    tok = processor.tokenizer
    assert json.loads((tmp_path / "proc" / "vocab.json").read_text()) == vocab
    assert len(tok) == len(vocab) and tok.pad_token_id == vocab[PAD] and tok.unk_token_id == vocab[UNK]
    ids = tok("one two").input_ids
    assert ids == [vocab[c] for c in "one|two"]
    assert unseen_characters(tok, ["one two", "three"]) == [] and unseen_characters(tok, ["zero two"]) == [
        "z"
    ]
    assert tok.decode(ids) == "one two"
    assert tok.decode(tok("three").input_ids, group_tokens=False) == "three"  # labels keep the double e
    assert tok("oxe").input_ids == [vocab["o"], vocab[UNK], vocab["e"]]

    features = processor(audio=[np.zeros(1600, np.float32), np.ones(800, np.float32)], sampling_rate=16000,
                         padding=True, return_tensors="np")  # fmt: skip
    assert features["input_values"].shape == (2, 1600)
    assert features["attention_mask"].tolist() == [[1] * 1600, [1] * 800 + [0] * 800]

    again = Wav2Vec2Processor.from_pretrained(str(tmp_path / "proc"))
    assert again.tokenizer("one two").input_ids == ids and len(again.tokenizer) == len(vocab)
    assert again.feature_extractor.sampling_rate == SAMPLE_RATE and again.feature_extractor.do_normalize


# -- error rates -----------------------------------------------------------------------------------------
def test_edit_distance():
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([], list("abc")) == 3 and edit_distance(list("abc"), []) == 3
    assert edit_distance([], []) == 0
    assert edit_distance("the cat sat".split(), "the cat sat".split()) == 0
    assert edit_distance("a b c d".split(), "a x c".split()) == 2  # one substitution, one deletion
    assert edit_distance("a b".split(), "x a b y".split()) == 2  # two insertions


def test_error_counts_by_hand():
    assert error_counts("the cat sat", "the bat sat down") == (2, 3, 6, 11)  # c->b, then 5 inserted: " down"
    assert error_counts("one two", "one two") == (0, 2, 0, 7)
    assert error_counts("ab cd", "abcd") == (2, 2, 1, 5)  # two words became one; one space lost


PAIRS = [
    ("the cat sat on the mat", "the cat sat on mat"),
    ("hello world", "hello word"),
    ("one two three", "one too three four"),
    ("speech recognition", "speech wreck a nice beach"),
]


def test_error_counts_agree_with_jiwer():
    jiwer = pytest.importorskip("jiwer")
    refs, hyps = [r for r, _ in PAIRS], [h for _, h in PAIRS]
    counts = [error_counts(r, h) for r, h in PAIRS]
    for (r, h), (we, nw, ce, nc) in zip(PAIRS, counts):
        assert we / nw == pytest.approx(jiwer.wer(r, h))
        assert ce / nc == pytest.approx(jiwer.cer(r, h))
    assert sum(c[0] for c in counts) / sum(c[1] for c in counts) == pytest.approx(jiwer.wer(refs, hyps))
    assert sum(c[2] for c in counts) / sum(c[3] for c in counts) == pytest.approx(jiwer.cer(refs, hyps))
