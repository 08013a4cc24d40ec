"""Summarisation: one text box, the summaries of one to three exports side by side, each labelled."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from demos.common import examples
from recipes import summarization

MAX_MODELS = 3


def summarize_all(exports: list[Path], text: str) -> list[str]:
    """Each export's summary of `text`, in the order the exports were given."""
    if not text.strip():
        gr.Warning("Paste a text to summarise, or pick a held-out document below.")
        return ["" for _ in exports]
    return [summarization.summarize_texts(e, [text])[0] for e in exports]


def build(*exports: Path) -> gr.Blocks:
    if not 1 <= len(exports) <= MAX_MODELS:
        raise ValueError(f"the summarisation app shows 1 to {MAX_MODELS} exports, got {len(exports)}")
    labels = [summarization.model_label(e) for e in exports]
    for e in exports:
        summarization.load(str(e))  # load before serving: the first click is not a model load
    with gr.Blocks(title="recipebox: summarisation") as blocks:
        gr.Markdown("# Summarisation\n" + " · ".join(f"**{n}** `{e}`" for n, e in zip(labels, exports)))
        text = gr.Textbox(label="Text to summarise", lines=8, elem_id="sum-text")
        run = gr.Button("Summarise", variant="primary")
        with gr.Row():
            outs = [gr.Textbox(label=name, lines=4, elem_id=f"sum-out-{i}") for i, name in enumerate(labels)]
        run.click(lambda t: summarize_all(list(exports), t), [text], outs, api_name="summarize")
        if found := examples(exports[0], "summarize"):
            gr.Examples(found, [text], label="Held-out documents")
    return blocks
