"""Text classification: every label's score; multi-label exports apply and show their fitted thresholds."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from demos.common import examples
from recipes import text_classification as recipe


def classify(export: Path, text: str) -> tuple[dict, str]:
    """The label scores, and what the model decides: the top label, or each label against its threshold."""
    if not text.strip():
        return {}, "**Type a text.**"
    classify = recipe.load(str(export))
    tok, model = classify.tokenizer, classify.model
    (result,) = recipe.predict(str(export), [text])
    if "label" in result:
        lines = [f"Label: **{result['label']}** (p = {result['score']:.4f})"]
    else:
        fitted = getattr(model.config, "label_thresholds", None) or {}
        chosen = ", ".join(result["labels"]) or "none"
        lines = [f"Labels: **{chosen}**", "", "| label | score | threshold | applies |", "|---|---|---|---|"]
        for name, p in result["scores"].items():
            t = fitted.get(name, recipe.DEFAULT_THRESHOLD)
            lines.append(f"| {name} | {p:.4f} | {t:.2f} | {'yes' if name in result['labels'] else 'no'} |")
    n = len(tok(text)["input_ids"])
    if n > tok.model_max_length:
        lines.append(f"\nThe text has {n} tokens; the model reads the first {tok.model_max_length}.")
    return result["scores"], "\n".join(lines)


def build(export: Path) -> gr.Blocks:
    multi = recipe.load(str(export)).model.config.problem_type == "multi_label_classification"
    kind = "multi-label, fitted thresholds" if multi else "multi-class"
    with gr.Blocks(title="recipebox: text classification") as blocks:
        gr.Markdown(f"# Text classification ({kind})\n`{export}`")
        text = gr.Textbox(label="Text", lines=3, elem_id="cls-text")
        run = gr.Button("Classify", variant="primary")
        # Multi-label: no single winner to headline; the decision below says which labels apply.
        scores = gr.Label(label="Scores", num_top_classes=10, show_heading=not multi, elem_id="cls-scores")
        decision = gr.Markdown(elem_id="cls-decision")
        run.click(lambda t: classify(export, t), [text], [scores, decision], api_name="classify")
        if found := examples(export, "classify"):
            gr.Examples(found, [text], label="Held-out texts")
    return blocks
