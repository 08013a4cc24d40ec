"""BERT MLM+NSP: fill the mask with the top-k tokens, and check whether B is the sentence after A."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from demos.common import examples
from recipes import mlm_nsp


def fill(export: Path, text: str, top_k: int) -> tuple[list[list], str]:
    """The top-k (token, probability) rows, and a note when the text is cut to the model's window."""
    tok = mlm_nsp.load(str(export))[0]
    try:
        guesses = mlm_nsp.fill_mask(str(export), text, int(top_k))
    except ValueError as err:
        return [], f"**{err}**"
    n = len(tok(text)["input_ids"])
    note = (
        f"The text has {n} tokens; the model reads the first {tok.model_max_length}."
        if n > tok.model_max_length
        else ""
    )
    return [[token, round(score, 4)] for token, score in guesses], note


def check(export: Path, a: str, b: str) -> tuple[dict, str]:
    """{"is next": p, "not next": 1 - p} and a one-line verdict (with a note when the pair is cut)."""
    if not a.strip() or not b.strip():
        return {}, "**Type both sentences.**"
    tok = mlm_nsp.load(str(export))[0]
    p = mlm_nsp.next_sentence(str(export), a, b)
    verdict = (
        f"p(B follows A) = {p:.4f}: {'B is the next sentence' if p >= 0.5 else 'B is not the next sentence'}"
    )
    n = len(tok(a, b)["input_ids"])
    if n > tok.model_max_length:
        verdict += f" (the pair has {n} tokens; the longer sentence was cut to fit {tok.model_max_length})"
    return {"is next": p, "not next": 1 - p}, verdict


def build(export: Path) -> gr.Blocks:
    mask = mlm_nsp.load(str(export))[0].mask_token
    with gr.Blocks(title="recipebox: BERT MLM+NSP") as blocks:
        gr.Markdown(f"# BERT MLM+NSP\n`{export}`")
        with gr.Tab("Fill the mask"):
            text = gr.Textbox(label=f"Text with one {mask}", elem_id="fill-text")
            top_k = gr.Slider(1, 20, value=5, step=1, label="Top k")
            run = gr.Button("Fill", variant="primary")
            table = gr.Dataframe(headers=["token", "probability"], label="Guesses", elem_id="fill-out")
            note = gr.Markdown(elem_id="fill-note")
            run.click(lambda t, k: fill(export, t, k), [text, top_k], [table, note], api_name="fill_mask")
            if found := examples(export, "fill_mask"):
                gr.Examples(found, [text], label="Held-out sentences")
        with gr.Tab("Next sentence?"):
            a = gr.Textbox(label="Sentence A", elem_id="nsp-a")
            b = gr.Textbox(label="Sentence B", elem_id="nsp-b")
            run = gr.Button("Check", variant="primary")
            label = gr.Label(label="Is B the next sentence after A?", elem_id="nsp-label")
            verdict = gr.Markdown(elem_id="nsp-verdict")
            run.click(lambda x, y: check(export, x, y), [a, b], [label, verdict], api_name="next_sentence")
            if found := examples(export, "next_sentence"):
                gr.Examples(found, [a, b], label="Held-out pairs (true next, then random)")
    return blocks
