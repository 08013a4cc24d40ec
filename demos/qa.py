"""Extractive question answering: a document and a question; the answer highlighted inside the document."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from demos.common import examples
from recipes import qa

MAX_CHARS = 100_000  # every window of a document goes through the model in one batch


def ask(export: Path, context: str, question: str) -> tuple[list, str]:
    """The document with the answer's span marked, and the answer with its probability and where it is."""
    if not (context or "").strip() or not (question or "").strip():
        return [], "**Paste a document and type a question.**"
    if len(context) > MAX_CHARS:
        return [], f"**The document has {len(context):,} characters; this app reads up to {MAX_CHARS:,}.**"
    try:
        found = qa.answer(str(export), question, context)
    except ValueError as err:  # a question too long for the window (data.qa's DataError)
        return [], f"**{err}**"
    if not found["answer"]:
        return [(context, None)], f"No answer in the document (p = {found['confidence']:.4f})."
    start, end = found["start"], found["end"]
    marked = [(context[:start], None), (context[start:end], "answer"), (context[end:], None)]
    note = f"Answer: **{found['answer']}** (p = {found['confidence']:.4f}, characters {start}-{end})"
    if found["windows"] > 1:
        size = qa.load(str(export))[0].model_max_length
        note += f"\n\nThe document is longer than one window: read in {found['windows']} overlapping windows of {size} tokens."
    return [piece for piece in marked if piece[0]], note


def answer(context: str, question: str, export: Path) -> dict:
    """{answer, start, end, confidence}: character offsets into the document (-1 when there is no answer)."""
    found = qa.answer(str(export), question, context)
    return {k: found[k] for k in ("answer", "start", "end", "confidence")}


def build(export: Path) -> gr.Blocks:
    with gr.Blocks(title="recipebox: question answering") as blocks:
        gr.Markdown(f"# Question answering\n`{export}`")
        context = gr.Textbox(label="Document", lines=8, elem_id="qa-context")
        question = gr.Textbox(label="Question", elem_id="qa-question")
        run = gr.Button("Answer", variant="primary")
        shown = gr.HighlightedText(label="Answer in the document", elem_id="qa-marked")
        note = gr.Markdown(elem_id="qa-note")
        run.click(lambda c, q: ask(export, c, q), [context, question], [shown, note], api_name="ask")

        def api_answer(context: str, question: str) -> dict:
            return answer(context, question, export)

        gr.api(api_answer, api_name="answer")
        if found := examples(export, "answer"):
            gr.Examples(found, [context, question], label="Held-out questions")
    return blocks
