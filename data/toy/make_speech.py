"""Write the bundled toy speech-recognition set: short spoken commands synthesised with espeak-ng.

Writes data/toy/speech/{train,validation,test}.csv with columns audio,text (audio is a path relative to the
manifest, e.g. clips/train/0001.flac) and the clips as 16 kHz mono 8-bit FLAC. Each utterance is 1-3 spoken
digits ("seven two nine"), spoken by espeak-ng with an English accent, a voice variant, a speed and a pitch
drawn at random; leading and trailing silence is cut off, the peak is normalised and the 22,050 Hz output
resampled to 16 kHz. The task is sized so that a small wav2vec2 from scratch learns it in a few CPU-minutes:
with the 29-word vocabulary of digits, colours, directions and commands in 1-4 word utterances, the same
budget left the word error rate above 0.5 (see docs/speech.md).

Validation and test are spoken by voices that training never hears: their voice variants are left out of
training entirely, so a model has to recognise the words, not the speakers. Deterministic (fixed seeds;
espeak-ng's output is a function of its arguments). Needs espeak-ng
(Debian/Ubuntu: apt-get install espeak-ng), soundfile and scipy. Run from anywhere:
    python data/toy/make_speech.py
"""

from __future__ import annotations

import csv
import random
import shutil
import subprocess
import sys
import tempfile
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

HERE = Path(__file__).resolve().parent
OUT = HERE / "speech"
RATE = 16_000
ESPEAK_RATE = 22_050
SUBTYPE = "PCM_S8"  # FLAC sample format: a third of PCM_16's size (3.8 against 10.7 MB), the same WER
SEEDS = {"train": 21, "validation": 22, "test": 23}
COUNTS = {"train": 600, "validation": 40, "test": 80}

VOCABULARY = "zero one two three four five six seven eight nine".split()
MAX_WORDS = 3

# espeak-ng accents ("en" is British English; "en-gb+VARIANT" silently ignores the variant) and voice variants
# (files in espeak-ng-data/voices/!v that change pitch range, formants, breathiness). Robots, whispers, croaks
# and the Klatt-synthesised or tone-filtered variants are left out: they made the set slower to learn.
ACCENTS = "en en-us en-gb-scotland en-gb-x-gbclan en-gb-x-rp en-gb-x-gbcwmd en-029 en-us-nyc".split()
VARIANTS = (
    "m1 m2 m3 m4 m5 m6 m7 f1 f2 f3 f4 f5 Andy Annie Alex Andrea belinda grandma grandpa linda max rob robert "
    "aunty victor".split()
)
HELDOUT = {  # split: voices (accent+variant) whose variants training never uses
    "validation": ["en-gb-x-rp+f4", "en-us-nyc+m6"],
    "test": ["en-us+f3", "en-gb-scotland+m4"],
}
SPEED = (150, 210)  # words per minute
PITCH = (30, 70)  # 0-99, espeak-ng's default is 50
TRIM_DB = 40  # silence: 10 ms frames more than this far below the loudest frame
PAD_S = 0.02  # silence kept before and after the speech
PEAK = 0.9


def voices(split: str) -> list[str]:
    if split != "train":
        return HELDOUT[split]
    unseen = {v.split("+")[1] for vs in HELDOUT.values() for v in vs}
    return [f"{a}+{v}" for a in ACCENTS for v in VARIANTS if v not in unseen]


def utterance(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, MAX_WORDS)))


def speak(text: str, voice: str, speed: int, pitch: int, tmp: Path) -> np.ndarray:
    """espeak-ng's waveform for text, as float in [-1, 1] at 22,050 Hz."""
    wav = tmp / "out.wav"
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text]
    subprocess.run(cmd, check=True, capture_output=True)
    audio, rate = sf.read(wav, dtype="float64")
    assert rate == ESPEAK_RATE and audio.ndim == 1, (rate, audio.shape)
    return audio


def trim(audio: np.ndarray, rate: int) -> np.ndarray:
    """Cut leading and trailing silence, keeping PAD_S seconds either side of the speech."""
    frame = rate // 100
    n = len(audio) // frame
    rms = np.sqrt((audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1))
    loud = np.nonzero(rms > rms.max() * 10 ** (-TRIM_DB / 20))[0]
    pad = int(PAD_S * rate)
    return audio[max(0, loud[0] * frame - pad) : min(len(audio), (loud[-1] + 1) * frame + pad)]


def to_16k(audio: np.ndarray) -> np.ndarray:
    g = gcd(RATE, ESPEAK_RATE)  # 160/441
    audio = resample_poly(audio, RATE // g, ESPEAK_RATE // g)
    return np.clip(audio * (PEAK / np.abs(audio).max()), -1.0, 1.0)


def make_split(split: str, n: int, out: Path, subtype: str, tmp: Path) -> list[dict]:
    rng = random.Random(SEEDS[split])
    pool = voices(split)
    (out / "clips" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(1, n + 1):
        text, voice = utterance(rng), pool[(i - 1) % len(pool)] if split != "train" else rng.choice(pool)
        speed, pitch = rng.randint(*SPEED), rng.randint(*PITCH)
        audio = to_16k(trim(speak(text, voice, speed, pitch, tmp), ESPEAK_RATE))
        path = f"clips/{split}/{i:04d}.flac"
        sf.write(out / path, audio, RATE, format="FLAC", subtype=subtype)
        rows.append({"audio": path, "text": text, "voice": voice, "seconds": len(audio) / RATE})
    return rows


def main(out: Path = OUT, counts: dict[str, int] = COUNTS, subtype: str = SUBTYPE) -> None:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: install it (Debian/Ubuntu: apt-get install espeak-ng) and run again")
    train_variants = {v.split("+")[1] for v in voices("train")}
    assert not train_variants & {v.split("+")[1] for vs in HELDOUT.values() for v in vs}
    if (out / "clips").exists():
        shutil.rmtree(out / "clips")  # no stale clips from a larger set
    with tempfile.TemporaryDirectory() as tmp:
        for split, n in counts.items():
            rows = make_split(split, n, out, subtype, Path(tmp))
            with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=["audio", "text"], extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            seconds = sum(r["seconds"] for r in rows)
            n_voices = len({r["voice"] for r in rows})
            print(f"{split}: {n} clips, {seconds / 60:.1f} min of audio, {n_voices} voices")
    size = sum(p.stat().st_size for p in (out / "clips").rglob("*.flac"))
    print(f"clips: {size / 1e6:.1f} MB ({subtype} FLAC)")


if __name__ == "__main__":
    main()
