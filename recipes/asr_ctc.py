r"""Fine-tune (or train from scratch) a wav2vec2 model for speech recognition with CTC; score WER and CER.

Features: a manifest (CSV/TSV/JSON lines: an audio path relative to the manifest, a transcript), a folder of
audio files with same-named .txt transcripts, or a `datasets` name with an audio column (read undecoded, its
clips written once into RUN/cache/audio; --dataset-config, --train-split, ...); audio read with soundfile (wav, flac, ogg), mixed to mono and
resampled to 16 kHz with scipy, every clip checked before training (missing, unreadable, corrupt, empty, an
empty transcript, longer than --max-seconds: `error: ...` naming the file, or --skip-long); transcripts
lowercased with --chars-to-ignore removed; a character vocabulary (a word delimiter, [UNK], [PAD] = the CTC
blank) in a Wav2Vec2Processor saved with the run, every checkpoint and the export; any `AutoModelForCTC`
(--model, its CTC head sized to the vocabulary, --freeze-feature-encoder) or a small wav2vec2 from the size
flags; batches grouped by audio length with attention masks; the CTC loss summed over the batch and divided
by the step's transcript characters over every rank; evaluation decodes greedily (each row cut at its real
frames) and reports WER and CER as summed edits over summed reference lengths, exact over ranks, with
RUN/predictions/<split>.jsonl and a table of samples; any backend (under --backend xla the audio is padded
to power-of-two buckets and the transcripts to buckets of their own; torch_xla does not lower the CTC loss,
which runs on the host between the forward and backward graphs); an export that
`pipeline("automatic-speech-recognition")` loads; a `predict` entry.

Launch:
    python recipes/asr_ctc.py                                          # toy speech, small wav2vec2, 1 process
    torchrun --nproc_per_node=2 recipes/asr_ctc.py
    torchrun --nproc_per_node=8 recipes/asr_ctc.py --model facebook/wav2vec2-base --train-manifest train.csv \
        --validation-manifest dev.csv --test-manifest "" --freeze-feature-encoder true
    python recipes/asr_ctc.py predict runs/asr_ctc/export clip.flac
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from recipebox.checkpoints.export import check_export, saved_inputs
from recipebox.checkpoints.sharded import CheckpointError
from recipebox.data.speech import (
    SAMPLE_RATE,
    build_vocab,
    check_durations,
    error_counts,
    make_processor,
    normalize_transcript,
    read_audio,
    read_manifest,
    unseen_characters,
)
from recipebox.data.text import DataError, content_key
from recipebox.kernels.buckets import bucket_lengths, pick_bucket
from recipebox.kernels.collate import collate_padded
from recipebox.launch.config import (
    ConfigError,
    TrainConfig,
    check_choice,
    parse_config,
    validate_train_config,
)
from recipebox.launch.flops import train_flops_per_token
from recipebox.launch.recipe import TRAINED_HERE, run_main, run_recipe, saved_processor
from recipebox.launch.runtime import Runtime
from recipebox.launch.task import as_is, label_targets, model_inputs

TOY = Path(__file__).resolve().parent.parent / "data" / "toy" / "speech"
FRAMES_PER_SECOND = 50  # wav2vec2's feature encoder: one frame per 320 samples at 16 kHz


@dataclass
class ASRConfig(TrainConfig):
    train_manifest: str = str(
        TOY / "train.csv"
    )  # .csv/.tsv/.jsonl, a folder of clips + .txt, a `datasets` name
    validation_manifest: str = str(TOY / "validation.csv")  # empty: no validation
    test_manifest: str = str(TOY / "test.csv")  # empty: none; evaluated once after training
    dataset_config: str = ""  # a `datasets` name given as a manifest: its config and split names
    train_split: str = "train"  # a `datasets` name: the split to train on
    validation_split: str = "validation"  # a `datasets` name: the split to validate on
    test_split: str = "test"  # a `datasets` name: the split to test on
    audio_column: str = "audio"  # the manifest column (or `datasets` field) holding the clip
    text_column: str = "text"  # the manifest column (or `datasets` field) holding the transcript
    chars_to_ignore: str = ",?.!-;:\"%'“”‘’"  # removed from transcripts (after lowercasing)
    max_seconds: float = 20.0  # longer clips stop the run before training (or --skip-long)
    skip_long: bool = False  # drop clips over --max-seconds (counted) instead of stopping
    check_audio: str = "full"  # full: decode every clip before training | header: headers only (faster)
    model: str = ""  # folder or hub name of a wav2vec2-style CTC model; empty: one from the sizes below
    trust_remote_code: bool = False  # let a hub repository run its own model code
    freeze_feature_encoder: bool = False  # pretrained models: no gradient through the conv front end
    conv_channels: int = 32  # 7 conv layers (strides 5,2,2,2,2,2,2: 20 ms frames)
    hidden_size: int = 128  # model built from scratch: width
    num_layers: int = 3  # model built from scratch: transformer layers
    num_heads: int = 4  # model built from scratch: attention heads
    intermediate_size: int = 256  # model built from scratch: feed-forward width
    dropout: float = 0.0  # model built from scratch: every dropout of the model
    layerdrop: float = 0.0  # > 0 only under --backend fsdp (other backends need every layer on every rank)
    mask_time_prob: float = 0.05  # SpecAugment; masks never longer than the shortest clip
    mask_time_length: int = 4  # SpecAugment: frames per time mask
    epochs: float = 16.0  # passes over the training clips (toy set: 608 steps on 2 ranks, WER ~0.27)
    batch_size: int = 8
    lr: float = 3e-3
    warmup_ratio: float = 0.1
    samples: int = 6  # evaluation transcripts shown in metrics.jsonl and the W&B table


def _validate(cfg: ASRConfig) -> None:
    validate_train_config(cfg)
    check_choice(cfg, "check_audio", ("full", "header"))
    if cfg.max_seconds <= 0:
        raise ConfigError(f"--max-seconds must be positive, got {cfg.max_seconds}")
    if not cfg.model and cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"--hidden-size {cfg.hidden_size} must be divisible by --num-heads {cfg.num_heads}")
    if cfg.layerdrop > 0 and cfg.backend != "fsdp":
        raise ConfigError(
            f"--layerdrop {cfg.layerdrop} needs --backend fsdp (DDP, DeepSpeed and XLA need every layer on "
            "every rank); use --layerdrop 0"
        )


def _read_splits(cfg: ASRConfig, rt: Runtime, run_dir: Path) -> dict:
    """Every split's clips and transcripts, checked before training; long clips stop the run or are dropped.
    A `datasets` split's clips are written once, by rank 0, into RUN/cache/audio/."""
    manifests = {
        "train": (cfg.train_manifest, cfg.train_split),
        "validation": (cfg.validation_manifest, cfg.validation_split),
        "test": (cfg.test_manifest, cfg.test_split),
    }
    splits = {}
    for name, (path, split) in manifests.items():
        if not path:
            continue
        with rt.main_process_first():
            utts = read_manifest(path, cfg.audio_column, cfg.text_column, split=split,
                                 dataset_config=cfg.dataset_config, cache_dir=run_dir / "cache" / "audio")  # fmt: skip
        utts, dropped = check_durations(utts, cfg.max_seconds, skip=cfg.skip_long)
        texts = [normalize_transcript(u.text, cfg.chars_to_ignore) for u in utts]
        for u, t in zip(utts, texts):
            if not t:
                raise DataError(
                    f"{u.where}: the transcript is empty once --chars-to-ignore is removed; fix it"
                )
        if cfg.check_audio == "full":
            for u in utts:  # decodes: a corrupt body stops the run here, not mid-training
                read_audio(u.audio, where=u.where)
        splits[name] = (utts, texts)
        rt.print(f"data: {len(utts)} {name} clips, {sum(u.seconds for u in utts) / 60:.1f} minutes"
                 + (f" ({dropped} over {cfg.max_seconds} s skipped)" if dropped else ""))  # fmt: skip
    return splits


class AudioRows(torch.utils.data.Dataset):
    """Rows of one split, read from disk when asked: normalised 16 kHz samples, label ids, the row index."""

    def __init__(self, utts, texts, processor, offset: int):
        self.utts, self.processor, self.offset = utts, processor, offset
        self.labels = [processor.tokenizer(t).input_ids for t in texts]

    @functools.cached_property
    def fingerprint(self) -> str:
        """Clips and label ids: a resumed run must train on the same rows (launch.loop.training_data_key);
        worked out when a checkpoint asks, for the training split only."""
        return content_key([str(u.audio) for u in self.utts], self.labels)

    def __len__(self):
        return len(self.utts)

    def __getitem__(self, i):
        audio = read_audio(self.utts[i].audio, where=self.utts[i].where)
        values = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE).input_values[0]
        return {"input_values": torch.as_tensor(values), "labels": self.labels[i], "_ref": self.offset + i}


def _setup_processor(cfg: ASRConfig, rt: Runtime, run_dir: Path, train_texts: list[str]):
    """A character vocabulary from the training transcripts in a Wav2Vec2Processor, saved with the run; a
    pretrained model's feature-extractor settings are kept."""
    from transformers import AutoFeatureExtractor, Wav2Vec2Processor

    def make():
        processor = make_processor(build_vocab(train_texts), run_dir / "cache" / "processor")
        if cfg.model:
            try:
                extractor = AutoFeatureExtractor.from_pretrained(
                    cfg.model, trust_remote_code=cfg.trust_remote_code
                )
            except (OSError, ValueError) as err:
                raise ConfigError(f"--model {cfg.model}: cannot load its feature extractor ({err})") from None
            if extractor.sampling_rate != SAMPLE_RATE:
                raise ConfigError(f"--model {cfg.model}: it expects {extractor.sampling_rate} Hz; this recipe "
                                  f"resamples to {SAMPLE_RATE}")  # fmt: skip
            processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=processor.tokenizer)
        return processor

    return saved_processor(
        rt, run_dir, make, Wav2Vec2Processor.from_pretrained, made_from=cfg.model or TRAINED_HERE
    )


def _setup_model(cfg: ASRConfig, processor, shortest_frames: int):
    from transformers import AutoModelForCTC, Wav2Vec2Config, Wav2Vec2ForCTC

    tok = processor.tokenizer
    head = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, ctc_zero_infinity=True,
                ctc_loss_reduction="sum", layerdrop=cfg.layerdrop)  # fmt: skip
    # SpecAugment never asks for a span longer than the shortest clip has frames.
    mask = dict(
        mask_time_prob=cfg.mask_time_prob, mask_time_length=max(1, min(cfg.mask_time_length, shortest_frames))
    )
    if cfg.model:
        try:
            model = AutoModelForCTC.from_pretrained(
                cfg.model, trust_remote_code=cfg.trust_remote_code, use_safetensors=True,
                ignore_mismatched_sizes=True, **head, **mask,
            )  # fmt: skip
        except (OSError, ValueError) as err:
            raise ConfigError(f"--model {cfg.model}: cannot load a safetensors CTC model ({err})") from None
        if cfg.freeze_feature_encoder:
            model.freeze_feature_encoder()
        return model
    config = Wav2Vec2Config(
        conv_dim=(cfg.conv_channels,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        feat_extract_norm="layer", do_stable_layer_norm=True, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout,
        activation_dropout=cfg.dropout, feat_proj_dropout=cfg.dropout, final_dropout=cfg.dropout,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, **head, **mask,
    )  # fmt: skip
    return Wav2Vec2ForCTC(config)


def greedy_decode(processor, logits: torch.Tensor, frames: torch.Tensor) -> list[str]:
    """Best path per row, cut at the row's real frames (padding decodes to junk), repeats merged, blanks
    dropped, the word delimiter turned into spaces."""
    ids = logits.argmax(-1).cpu()
    return [processor.tokenizer.decode(row[:n]) for row, n in zip(ids, frames.tolist())]


class ASRTask:
    """CTC on characters; evaluation decodes greedily and counts word and character edits per row."""

    def __init__(self, cfg: ASRConfig, processor, splits: dict, model, run_dir: Path):
        self.title = f"Speech recognition ({cfg.name})"
        self.model = self.trained = model
        self.processor, self.cfg, self.predictions_dir = processor, cfg, run_dir / "predictions"
        self.references, self.clips, self.splits, offset = [], [], {}, 0
        for name, (utts, texts) in splits.items():
            self.splits[name] = AudioRows(utts, texts, processor, offset)
            self.references += texts
            self.clips += [u.audio for u in utts]
            offset += len(utts)
        train = splits["train"][0]
        self.lengths = [round(u.seconds * SAMPLE_RATE) for u in train]
        self.max_length = round(cfg.max_seconds * SAMPLE_RATE)
        held = splits.get("test", splits.get("validation", splits["train"]))[0]
        self.examples = {"transcribe": [[Path(u.audio)] for u in held[:3]]}  # copied into the export
        seconds = sum(u.seconds for u in train) / len(train)
        try:  # per output frame: sizes() counts frames
            self.flops_per_token = train_flops_per_token(
                model.config, seq_len=max(1, round(seconds * FRAMES_PER_SECOND)),
                frozen_feature_encoder=cfg.freeze_feature_encoder,
            )  # fmt: skip
        except ValueError:
            self.flops_per_token = 0.0
        # Transcripts have at most one character per output frame: their own buckets, far below the audio's.
        self.label_buckets = bucket_lengths(max(1, round(cfg.max_seconds * FRAMES_PER_SECOND)))
        # The conv front end's receptive field (400 samples, 25 ms, in wav2vec2): a batch of shorter clips only
        # (a lone short clip in an evaluation split) is padded up to it, so the model runs and gives the clip
        # no frame (an empty transcript, its words counted as errors) instead of stopping the run.
        self.min_samples = 1
        for kernel, stride in zip(reversed(model.config.conv_kernel), reversed(model.config.conv_stride)):
            self.min_samples = (self.min_samples - 1) * stride + kernel

    def collate(self, rows: list[dict], pad_to_length: int | None = None) -> dict[str, torch.Tensor]:
        """Audio padded with 0 and an attention mask, labels with -100; with `pad_to_length` (static-shape
        backends) the audio goes to that bucket and the labels to one of their own."""
        fixed = None
        if pad_to_length is not None:
            labels = pick_bucket(max(len(r["labels"]) for r in rows), self.label_buckets)
            fixed = {"input_values": pad_to_length, "labels": labels}
        elif max(len(r["input_values"]) for r in rows) < self.min_samples:
            fixed = {"input_values": self.min_samples}
        return collate_padded(rows, pad_id=self.processor.tokenizer.pad_token_id, pad_to_length=fixed)

    prepare = staticmethod(as_is)

    def frames(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each row's real output frames, from its real samples."""
        return self.model._get_feat_extract_output_lengths(attention_mask.sum(-1)).long()

    def sizes(self, batch):
        return batch["input_values"].shape[0], int(self.frames(batch["attention_mask"]).sum())

    def targets(self, batch):
        return {"loss": label_targets(batch["labels"])}

    def loss(self, model, batch):
        """The CTC negative log-likelihood summed over the batch's rows (blank = [PAD], infinities zeroed,
        fp32 log-probabilities), as the model's own loss computes it with reduction "sum"."""
        inputs = model_inputs(batch)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        frames = self.frames(inputs["attention_mask"])
        log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
        # Padded 2-D targets (the padding is never read past each row's length): static shapes, no selection.
        with torch.backends.cudnn.flags(enabled=False):
            total = F.ctc_loss(log_probs, labels.clamp(min=0), frames, (labels >= 0).sum(-1),
                               blank=self.processor.tokenizer.pad_token_id, reduction="sum",
                               zero_infinity=True)  # fmt: skip
        return {"loss": total}, (logits, frames)

    def evaluate(self, model, batch, outputs, generate):
        """Greedy transcripts of this rank's rows; word and character edits against the references."""
        logits, frames = outputs
        hyps = greedy_decode(self.processor, logits, frames)
        refs = batch["_ref"].tolist()
        counts = torch.tensor(
            [error_counts(self.references[r], h) for r, h in zip(refs, hyps)], dtype=torch.float64
        )
        sums = counts.sum(0)
        return {"wer": sums[[0, 1]], "cer": sums[[2, 3]]}, list(zip(refs, hyps))

    def summarize(self, records, means, split):
        """RUN/predictions/<split>.jsonl (audio path, reference, transcript); the first --samples as a table."""
        self.predictions_dir.mkdir(parents=True, exist_ok=True)
        with open(self.predictions_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for ref, hyp in records:
                row = {"audio": self.clips[ref], "reference": self.references[ref], "transcript": hyp}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        shown = [
            {"clip": Path(self.clips[r]).name, "reference": self.references[r], "transcript": h}
            for r, h in records[: self.cfg.samples]
        ]
        return {"samples": shown} if shown else {}

    def before_export(self, model):
        """The export runs on every layer and keeps the model's CTC settings; nothing else is learnt."""
        model.config.layerdrop = 0.0


def _without_untrainable(rt: Runtime, utts, texts, processor, model) -> tuple[list, list]:
    """The training clips that CTC can align: a clip needs a frame per character, and one more between two
    equal ones ("ll"). A shorter one (a manifest row with another clip's transcript, a clip cut short) has an
    infinite loss, which the model's CTC setting would zero: it is dropped here, counted and named instead."""
    frames = model._get_feat_extract_output_lengths(
        torch.tensor([round(u.seconds * SAMPLE_RATE) for u in utts])
    )
    ids = processor.tokenizer(texts).input_ids
    need = [len(i) + sum(a == b for a, b in zip(i, i[1:])) for i in ids]
    keep = [n <= f for n, f in zip(need, frames.tolist())]
    if all(keep):
        return utts, texts
    first = keep.index(False)
    if not any(keep):
        raise DataError(f"every training clip is shorter than its transcript needs (first: {utts[first].where}); "
                        f"check that the manifest pairs each clip with its own transcript")  # fmt: skip
    rt.print(f"data: {keep.count(False)} train clip(s) too short for their transcripts left out (first: "
             f"{utts[first].where}: {frames[first]} frames, its transcript needs {need[first]})")  # fmt: skip
    return [u for u, k in zip(utts, keep) if k], [t for t, k in zip(texts, keep) if k]


def _build(cfg: ASRConfig, rt: Runtime, run_dir: Path) -> ASRTask:
    splits = _read_splits(cfg, rt, run_dir)
    processor = _setup_processor(cfg, rt, run_dir, splits["train"][1])
    tok = processor.tokenizer
    for name, (_, texts) in splits.items():  # characters the vocabulary lacks read as [UNK]: always an error
        if unseen := unseen_characters(tok, texts):
            rt.print(f"warning: the {name} transcripts hold characters the run's vocabulary (made from the "
                     f"training transcripts) lacks, {' '.join(unseen)}: they read as {tok.unk_token} and count "
                     f"as errors; normalise the transcripts or train on clips that hold them")  # fmt: skip
    shortest = min(u.seconds for u in splits["train"][0])
    model = _setup_model(cfg, processor, int(shortest * FRAMES_PER_SECOND))
    splits["train"] = _without_untrainable(rt, *splits["train"], processor, model)
    return ASRTask(cfg, processor, splits, model, run_dir)


# -- inference: predict and the demo --------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load(export_dir: str):
    """The export's automatic-speech-recognition pipeline, loaded once per folder."""
    check_export(export_dir, "asr_ctc")
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=export_dir, model_kwargs={"use_safetensors": True})


def transcribe(export_dir, audio_path) -> str:
    """The transcript of one clip: read with soundfile, mono, 16 kHz, through the export's pipeline."""
    samples = read_audio(audio_path, drop="give another clip")  # not a manifest's: nothing to remove
    return load(str(export_dir))({"raw": samples, "sampling_rate": SAMPLE_RATE})["text"]


def saved_clip(export: Path, name: str) -> Path | None:
    """A held-out clip an export carries (examples.json names it relative to the export); None for a name
    that leads outside it: an export someone shared never points predict or the demo at other files."""
    path = export / name
    return path if path.resolve().is_relative_to(export.resolve()) else None


def predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="asr_ctc.py predict", description="Transcribe audio files.")
    parser.add_argument("export", help="an export folder (RUN/export)")
    parser.add_argument(
        "audio", nargs="*", help="wav, flac or ogg files; default: the export's held-out clips"
    )
    args = parser.parse_args(argv)
    export, clips = Path(args.export), args.audio
    for name in [] if clips else saved_inputs(export, "transcribe", "give audio files"):
        if (clip := saved_clip(export, name)) is None:
            raise CheckpointError(
                f"{export / 'examples.json'} names {export / name}, outside the export; give audio files instead"
            )
        clips.append(str(clip))
    for path in clips:
        text = transcribe(args.export, path)
        print(f"{path}\t{text}" if len(clips) > 1 else text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        return predict(argv[1:])
    cfg = parse_config(ASRConfig, argv, description=__doc__)
    _validate(cfg)
    return run_recipe(cfg, _build, "asr_ctc")


if __name__ == "__main__":
    run_main(main)
