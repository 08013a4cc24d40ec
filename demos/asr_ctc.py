"""Speech recognition: upload a clip (or record one where the browser offers a microphone), get its transcript."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import soundfile

from demos.common import examples
from recipebox.data.text import DataError
from recipes import asr_ctc

MAX_SECONDS = 600  # the whole clip goes through the model at once


def transcribe(export: Path, audio: str | None) -> tuple[str, str]:
    """(transcript, note) of an uploaded or recorded file; a file soundfile cannot read gets a note instead."""
    if not audio:
        return "", "**Upload or record a clip.**"
    try:
        seconds = soundfile.info(audio).duration
    except (RuntimeError, TypeError):  # soundfile cannot open it: read_audio below says why
        seconds = 0.0
    if seconds > MAX_SECONDS:
        return (
            "",
            f"**The clip is {seconds / 60:.1f} minutes long; this app transcribes up to {MAX_SECONDS // 60} minutes.**",
        )
    try:
        return asr_ctc.transcribe(export, audio), ""
    except DataError as err:
        return "", f"**Cannot read this clip:** {err}"
    except RuntimeError as err:  # e.g. shorter than the model's convolutions take (about 25 ms)
        return "", f"**Cannot transcribe this clip:** {str(err).splitlines()[0]}"


def build(export: Path) -> gr.Blocks:
    asr_ctc.load(str(export))  # load before serving: the first click is not a model load
    with gr.Blocks(title="recipebox: speech recognition") as blocks:
        gr.Markdown(f"# Speech recognition\n`{export}`")
        audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Clip", elem_id="asr-audio")
        run = gr.Button("Transcribe", variant="primary")
        out = gr.Textbox(label="Transcript", lines=2, elem_id="asr-out")
        note = gr.Markdown(elem_id="asr-note")
        run.click(lambda a: transcribe(export, a), [audio], [out, note], api_name="transcribe")
        inside = [asr_ctc.saved_clip(export, row[0]) for row in examples(export, "transcribe")]
        inside = [p for p in inside if p is not None and p.is_file()]
        if inside:  # only files the export carries: examples.json never points the page elsewhere
            gr.Examples([[str(p)] for p in inside], [audio], label="Held-out clips")
    return blocks
