"""Causal language model: a prompt, the sampling settings, and the model's continuation."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from demos.common import examples
from recipes import causal_lm


def continue_text(
    export: Path, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int
):
    """The continuation (the prompt left out), and a note when the prompt is longer than the model reads."""
    if not prompt.strip():
        return "", "**Type a prompt.**"
    text = causal_lm.generate_text(str(export), prompt, max_new_tokens=int(max_new_tokens),
                                   temperature=float(temperature), top_p=float(top_p), seed=int(seed))  # fmt: skip
    model = causal_lm.load(str(export)).model
    window = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 0)
    n = len(causal_lm.load(str(export)).tokenizer(prompt)["input_ids"])
    note = f"The prompt has {n} tokens; the model reads at most {window}." if window and n > window else ""
    return text, note


def build(export: Path) -> gr.Blocks:
    defaults = causal_lm.load(str(export)).model.generation_config
    with gr.Blocks(title="recipebox: text generation") as blocks:
        gr.Markdown(f"# Text generation\n`{export}`")
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="lm-prompt")
        with gr.Row():
            max_new = gr.Slider(1, 256, value=defaults.max_new_tokens or 40, step=1, label="Max new tokens")
            temperature = gr.Slider(
                0, 2, value=defaults.temperature or 1.0, step=0.05, label="Temperature (0: greedy)"
            )
            top_p = gr.Slider(0.05, 1, value=defaults.top_p or 1.0, step=0.05, label="Top-p")
            seed = gr.Number(value=0, precision=0, label="Seed")
        run = gr.Button("Generate", variant="primary")
        out = gr.Textbox(label="Continuation", lines=4, elem_id="lm-out")
        note = gr.Markdown(elem_id="lm-note")
        run.click(
            lambda p, m, t, tp, s: continue_text(export, p, m, t, tp, s),
            [prompt, max_new, temperature, top_p, seed], [out, note], api_name="generate",
        )  # fmt: skip
        if found := examples(export, "generate"):
            gr.Examples(found, [prompt, max_new], label="Prompts from the run's configuration")
    return blocks
