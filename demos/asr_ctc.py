"""Speech recognition: upload a clip (or record one where the browser offers a microphone), get its transcript."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from data.text import DataError
from demos.common import examples
from recipes import asr_ctc


def transcribe(export: Path, audio: str | None) -> tuple[str, str]:
    """(transcript, note) of an uploaded or recorded file; a file soundfile cannot read gets a note instead."""
    if not audio:
        return "", "**Upload or record a clip.**"
    try:
        return asr_ctc.transcribe(export, audio), ""
    except DataError as err:
        return "", f"**Cannot read this clip:** {err}"


def build(export: Path) -> gr.Blocks:
    asr_ctc.load(str(export))  # load before serving: the first click is not a model load
    with gr.Blocks(title="recipebox: speech recognition") as blocks:
        gr.Markdown(f"# Speech recognition\n`{export}`")
        audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Clip", elem_id="asr-audio")
        run = gr.Button("Transcribe", variant="primary")
        out = gr.Textbox(label="Transcript", lines=2, elem_id="asr-out")
        note = gr.Markdown(elem_id="asr-note")
        run.click(lambda a: transcribe(export, a), [audio], [out, note], api_name="transcribe")
        if found := examples(export, "transcribe"):
            gr.Examples([[str(export / row[0])] for row in found], [audio], label="Held-out clips")
    return blocks
