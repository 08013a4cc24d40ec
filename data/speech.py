"""Speech recognition data: audio files and transcripts -> checked utterances, 16 kHz samples, a character
vocabulary and a wav2vec2 CTC processor; word and character error counts for WER/CER.

A manifest is a CSV/TSV or JSON lines file with an audio path (relative to the manifest's folder, or absolute)
and a transcript per row, a folder of audio files each with a same-named .txt transcript next to it, or a
`datasets` name whose audio column is read undecoded (its clips are written to a cache folder). Every
clip is checked before training (it exists, soundfile can open it, it holds samples, its transcript is not
empty); the message names the file or line and the fix. Audio is read with soundfile, mixed to mono and
resampled with scipy's polyphase filter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

from recipebox.data.classification import check_columns, read_table
from recipebox.data.text import DataError

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
WORD_DELIMITER, UNK, PAD = "|", "[UNK]", "[PAD]"

_CONVERT = "convert it to 16-bit WAV or FLAC (e.g. ffmpeg -i IN -ac 1 -ar 16000 OUT.wav)"
MANIFEST_FIX = "remove it from the manifest"


@dataclass
class Utterance:
    audio: str  # absolute path
    text: str  # the transcript as given
    where: str  # "train.csv, line 3", for messages
    seconds: float  # from the file's header


# -- audio -----------------------------------------------------------------------------------------------
def _info(path: Path, where: str, drop: str = MANIFEST_FIX):
    """soundfile.info of an existing, non-empty audio file; otherwise a DataError naming it and the fix."""
    import soundfile

    if path.is_dir():
        raise DataError(f"{where}: {path} is a folder, not an audio file; name one clip in it or {drop}")
    if not path.is_file():
        raise DataError(f"{where}: no such audio file {path}; fix the path or {drop}")
    if path.stat().st_size == 0:
        raise DataError(f"{where}: {path} is empty (0 bytes); re-export the clip or {drop}")
    try:
        info = soundfile.info(str(path))
    except (soundfile.SoundFileError, RuntimeError) as err:
        reason = getattr(err, "error_string", None) or str(err)
        raise DataError(f"{where}: soundfile cannot read {path} ({reason}); {_CONVERT}, or {drop}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise DataError(f"{where}: {path} holds no audio samples; {drop}")
    return info


def read_audio(
    path: str | Path, rate: int = SAMPLE_RATE, drop: str = MANIFEST_FIX, where: str = ""
) -> np.ndarray:
    """float32 mono samples at `rate`: channels averaged, then resampled (polyphase) from the file's rate.
    `drop` ends a message on a file that cannot be used: what else the user can do (a manifest's clip: remove it);
    `where` (a manifest's "train.csv, line 3") starts it."""
    import soundfile
    from scipy.signal import resample_poly

    path = Path(path)
    _info(path, where or str(path), drop)
    named = f"{where}: {path}" if where else str(path)
    try:
        samples, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as err:  # a header that opens, data that does not
        reason = getattr(err, "error_string", None) or str(err)
        raise DataError(f"{named}: soundfile cannot decode it ({reason}); {_CONVERT}, or {drop}") from None
    if samples.shape[0] == 0:
        raise DataError(f"{named}: holds no audio samples; {drop}")
    mono = samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise DataError(f"{named}: has NaN or infinite samples; {_CONVERT}, or {drop}")
    if file_rate != rate:
        g = gcd(rate, file_rate)
        mono = resample_poly(mono, rate // g, file_rate // g)
    return np.asarray(mono, dtype=np.float32)


# -- manifests -------------------------------------------------------------------------------------------
def read_manifest(
    path: str,
    audio_column: str = "audio",
    text_column: str = "text",
    *,
    split: str = "train",
    dataset_config: str = "",
    cache_dir: str | Path | None = None,
) -> list[Utterance]:
    """Utterances from a CSV/TSV/JSON lines manifest, a folder of audio files with .txt transcripts, or a
    `datasets` name (hub or local folder of parquet/arrow files; `split`, `dataset_config`) whose audio
    column is read undecoded and written once into `cache_dir`.

    Every clip's header is read (soundfile.info, no decoding), so a missing, unreadable or empty clip stops
    here, before training.
    """
    source = Path(path)
    if source.is_dir() and not _holds_dataset(source):
        return _read_folder(source)
    if source.is_dir() or (not source.exists() and not source.suffix):
        return _read_dataset(path, dataset_config, split, audio_column, text_column, cache_dir)
    if not source.exists():
        raise DataError(
            f"{path}: no such file or folder; give a .csv/.tsv/.jsonl manifest, a folder of clips or a "
            f"`datasets` name"
        )
    if source.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(
            f"{path}: not a manifest; give a .csv/.tsv/.jsonl file with {audio_column!r} and {text_column!r} "
            f"columns, or a folder of {'/'.join(AUDIO_SUFFIXES)} files with same-named .txt transcripts"
        )
    table = read_table(str(source))
    check_columns(table, [audio_column], "--audio-column")
    check_columns(table, [text_column], "--text-column")
    folder = source.resolve().parent
    utts = []
    for row, where in zip(table.rows, table.where):
        audio, text = row[audio_column], row[text_column]
        if not isinstance(audio, str) or not audio.strip():
            raise DataError(f"{where}: column {audio_column!r} is empty or not a path ({audio!r}); fill it")
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{where}: column {text_column!r} is empty or not text ({text!r}); fill in the transcript "
                f"or drop the row"
            )
        clip = (folder / Path(audio.strip()).expanduser()).resolve()
        info = _info(clip, where)
        utts.append(Utterance(str(clip), text, where, info.frames / info.samplerate))
    return utts


def _holds_dataset(folder: Path) -> bool:
    """A folder that `datasets` loads (parquet or arrow files, as saved or downloaded), not one of clips."""
    return any(p.suffix in (".parquet", ".arrow") for p in folder.rglob("*"))


def _read_dataset(name, config, split, audio_column, text_column, cache_dir) -> list[Utterance]:
    """A `datasets` split: its audio column undecoded (decoding there needs FFmpeg), each clip's bytes written
    once to cache_dir/<split>/ (or its own path used), then checked as a manifest's clips are."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # the hub, a missing split or a missing folder: all the user's to fix
        raise DataError(
            f"{name}: not a manifest, a folder of clips or a loadable `datasets` name with split {split!r} "
            f"({err})"
        ) from None
    for column, flag in ((audio_column, "--audio-column"), (text_column, "--text-column")):
        if column not in ds.column_names:
            raise DataError(f"{name}[{split}]: no column {column!r} (it has {ds.column_names}); set {flag}")
    if isinstance(ds.features[audio_column], datasets.Audio):
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    if cache_dir is None:
        raise DataError(f"{name}: a `datasets` split needs a folder to write its clips to")
    folder = Path(cache_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    utts = []
    for i, row in enumerate(ds):
        where, audio = f"{name}[{split}] row {i}", row[audio_column]
        if isinstance(audio, dict) and audio.get("bytes"):
            clip = folder / f"{i:06d}{Path(audio.get('path') or '').suffix.lower() or '.wav'}"
            if not clip.is_file() or clip.stat().st_size != len(audio["bytes"]):
                clip.write_bytes(audio["bytes"])
        elif isinstance(audio, dict | str) and (audio.get("path") if isinstance(audio, dict) else audio):
            clip = Path(audio["path"] if isinstance(audio, dict) else audio)
        else:
            raise DataError(
                f"{where}: column {audio_column!r} holds no audio ({str(audio)[:60]!r}); fix the row"
            )
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: column {text_column!r} is empty or not text ({text!r}); fill it in")
        info = _info(clip, where)
        utts.append(Utterance(str(clip.resolve()), text, where, info.frames / info.samplerate))
    if not utts:
        raise DataError(f"{name}[{split}]: no examples; give a split with at least one row")
    return utts


def _read_folder(folder: Path) -> list[Utterance]:
    """Every audio file under `folder` (sorted, hidden names skipped), each with its same-named .txt."""
    clips = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in AUDIO_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not clips:
        raise DataError(
            f"{folder}: no {'/'.join(AUDIO_SUFFIXES)} files in it; give a folder of clips, each with a "
            f"same-named .txt transcript, or a .csv/.jsonl manifest"
        )
    utts = []
    for clip in clips:
        clip = clip.resolve()
        transcript = clip.with_suffix(".txt")
        if not transcript.is_file():
            raise DataError(
                f"{clip}: no transcript {transcript.name} next to it; write one (the words spoken) or remove "
                f"the clip"
            )
        try:
            text = transcript.read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            raise DataError(f"{transcript}: not UTF-8; re-encode the file as UTF-8") from None
        if not text:
            raise DataError(
                f"{transcript}: the transcript is empty; write the words spoken or remove the clip"
            )
        info = _info(clip, str(clip))
        utts.append(Utterance(str(clip), text, str(transcript), info.frames / info.samplerate))
    return utts


def check_durations(
    utts: list[Utterance], max_seconds: float, *, skip: bool = False
) -> tuple[list[Utterance], int]:
    """(kept, dropped): clips over max_seconds are a DataError, or with `skip` dropped and counted."""
    long = [u for u in utts if u.seconds > max_seconds]
    if long and not skip:
        u = long[0]
        raise DataError(
            f"{u.where}: {u.audio} is {u.seconds:.1f} s, longer than --max-seconds {max_seconds:g} "
            f"({len(long)} clip(s) are); raise --max-seconds, cut the clips, or pass --skip-long to drop them"
        )
    kept = [u for u in utts if u.seconds <= max_seconds]
    if utts and not kept:
        raise DataError(
            f"all {len(utts)} clips are longer than --max-seconds {max_seconds:g}; raise --max-seconds"
        )
    return kept, len(long)


# -- transcripts and vocabulary --------------------------------------------------------------------------
def normalize_transcript(text: str, chars_to_ignore: str) -> str:
    """Lower case, without the characters in chars_to_ignore, whitespace collapsed to single spaces."""
    return " ".join(text.lower().translate({ord(c): None for c in chars_to_ignore}).split())


def build_vocab(transcripts: list[str]) -> dict[str, int]:
    """Character ids: the sorted characters (" " as WORD_DELIMITER, always present), then UNK, then PAD."""
    chars = set().union(*map(set, transcripts))
    if WORD_DELIMITER in chars:
        raise DataError(
            f"a transcript contains {WORD_DELIMITER!r}, the word delimiter; add it to the characters to ignore"
        )
    tokens = [WORD_DELIMITER if c == " " else c for c in sorted(chars | {" "})]
    return {t: i for i, t in enumerate([*tokens, UNK, PAD])}


def unseen_characters(tokenizer, transcripts: list[str]) -> list[str]:
    """The characters of `transcripts` that the CTC tokenizer's vocabulary lacks (each reads as its UNK),
    from the characters themselves as build_vocab takes them, not a tokenisation of every transcript."""
    chars = {WORD_DELIMITER if c == " " else c for c in set().union(*map(set, transcripts))}
    return sorted(chars - set(tokenizer.get_vocab()))


def make_processor(vocab: dict[str, int], folder: str | Path, *, rate: int = SAMPLE_RATE):
    """A Wav2Vec2Processor over `vocab`, saved into `folder`; len(processor.tokenizer) == len(vocab)."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(
        str(folder / "vocab.json"),
        unk_token=UNK,
        pad_token=PAD,
        word_delimiter_token=WORD_DELIMITER,
        bos_token=None,  # CTC needs no sentence markers; without them the tokenizer is exactly `vocab`
        eos_token=None,
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=rate,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )
    processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    chars = [t for t in vocab if t not in (UNK, PAD, WORD_DELIMITER)]
    for c in chars:  # each character must encode to its own id, or training labels would be wrong
        if tokenizer(c).input_ids != [vocab[c]]:
            raise DataError(
                f"the character {c!r} does not encode to one id; add it to the characters to ignore"
            )
    sample = " ".join(chars)
    decoded = tokenizer.decode(tokenizer(sample).input_ids, group_tokens=False)
    if decoded != sample or len(tokenizer) != len(vocab):
        raise DataError(f"the tokenizer does not round-trip the vocabulary ({sample!r} -> {decoded!r})")
    processor.save_pretrained(str(folder))
    return processor


# -- error rates -----------------------------------------------------------------------------------------
def edit_distance(ref: list, hyp: list) -> int:
    """Levenshtein distance: substitutions, insertions and deletions each cost 1."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def error_counts(reference: str, hypothesis: str) -> tuple[int, int, int, int]:
    """(word edits, reference words, char edits, reference chars); chars include the spaces, as jiwer.cer.

    WER and CER over a set are sums of edits over sums of reference lengths, not means of per-pair rates.
    """
    ref_words, hyp_words = reference.split(), hypothesis.split()
    ref_chars, hyp_chars = reference.strip(), hypothesis.strip()
    return (
        edit_distance(ref_words, hyp_words),
        len(ref_words),
        edit_distance(list(ref_chars), list(hyp_chars)),
        len(ref_chars),
    )
