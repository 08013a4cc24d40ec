"""Named-entity recognition: the text with its entities highlighted, and the (word, tag) table."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from demos.common import examples
from recipes import ner

MAX_CHARS = 100_000  # every window of a text goes through the model in one batch


def spans(tagged: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """(text, entity type or None) pieces: the words of one entity (B-X, I-X ...) joined into one piece."""
    out: list[tuple[str, str | None]] = []
    for word, tag in tagged:
        kind = None if tag == "O" else tag.split("-", 1)[-1]
        if out and kind is not None and out[-1][1] == kind and not tag.startswith("B-"):
            out[-1] = (f"{out[-1][0]} {word}", kind)
        else:
            out.append((word, kind))
    return [(text + " ", kind) for text, kind in out]


def tag(export: Path, text: str) -> tuple[list, list[list[str]], str]:
    if not (text or "").strip():
        return [], [], "**Type a text.**"
    if len(text) > MAX_CHARS:
        return [], [], f"**The text has {len(text):,} characters; this app reads up to {MAX_CHARS:,}.**"
    tagged = ner.predict(str(export), text)
    tok = ner.load(str(export))[0]
    n = len(tok(text)["input_ids"])
    note = ""
    if n > tok.model_max_length:
        note = f"The text has {n} tokens: read in overlapping windows of {tok.model_max_length}, merged per word."
    return spans(tagged), [[w, t] for w, t in tagged], note


def build(export: Path) -> gr.Blocks:
    with gr.Blocks(title="recipebox: named entities") as blocks:
        gr.Markdown(f"# Named entities\n`{export}`")
        text = gr.Textbox(label="Text", lines=3, elem_id="ner-text")
        run = gr.Button("Tag", variant="primary")
        shown = gr.HighlightedText(label="Entities", elem_id="ner-entities")
        table = gr.Dataframe(headers=["word", "tag"], label="Tags", elem_id="ner-table")
        note = gr.Markdown(elem_id="ner-note")
        run.click(lambda t: tag(export, t), [text], [shown, table, note], api_name="tag")
        if found := examples(export, "tag"):
            gr.Examples(found, [text], label="Held-out sentences")
    return blocks
