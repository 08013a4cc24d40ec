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
    if not (prompt or "").strip():
        return "", "**Type a prompt.**"
    try:
        kept, n, read = causal_lm.prompt_kept(str(export), prompt, int(max_new_tokens))
        text = causal_lm.generate_text(str(export), kept, max_new_tokens=int(max_new_tokens),
                                       temperature=float(temperature), top_p=float(top_p), seed=int(seed or 0))  # fmt: skip
    except causal_lm.ConfigError as err:  # no room for a prompt: fewer new tokens
        return "", f"**{err}**"
    window = causal_lm.model_window(causal_lm.load(str(export)).model)
    note = (f"The prompt has {n} tokens; with {int(max_new_tokens)} new ones in the model's {window}-token "
            f"window, it read the last {read}.") if kept != prompt else ""  # fmt: skip
    return text, note


def build(export: Path) -> gr.Blocks:
    defaults = causal_lm.load(str(export)).model.generation_config
    with gr.Blocks(title="recipebox: text generation") as blocks:
        gr.Markdown(f"# Text generation\n`{export}`")
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="lm-prompt")
        with gr.Row():
            # The run's settings, even where they pass a slider's usual end.
            new = defaults.max_new_tokens or 40
            max_new = gr.Slider(1, max(256, new), value=new, step=1, label="Max new tokens")
            t = 1.0 if defaults.temperature is None else defaults.temperature  # 0 (greedy) stays 0
            temperature = gr.Slider(0, max(2, t), value=t, step=0.05, label="Temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1, value=defaults.top_p or 1.0, step=0.05, label="Top-p")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=2**32 - 1, label="Seed")
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
