"""Text classification: every label's score; multi-label exports apply and show their fitted thresholds;
a sentence-pair export takes its two texts in two boxes."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from demos.common import examples
from recipes import text_classification as recipe


def classify(export: Path, text: str, second: str | None = None) -> tuple[dict, str]:
    """The label scores, and what the model decides: the top label, or each label against its threshold.
    `second`: the pair's second text, for a sentence-pair export."""
    texts = [text] if second is None else [text, second]
    if not all(t.strip() for t in texts):
        return {}, "**Type a text.**" if second is None else "**Type both texts.**"
    classify = recipe.load(str(export))
    tok, model = classify.tokenizer, classify.model
    (result,) = recipe.predict(str(export), [text if second is None else texts])
    if "label" in result:
        lines = [f"Label: **{result['label']}** (p = {result['score']:.4f})"]
    else:
        fitted = getattr(model.config, "label_thresholds", None) or {}
        chosen = ", ".join(result["labels"]) or "none"
        lines = [f"Labels: **{chosen}**", "", "| label | score | threshold | applies |", "|---|---|---|---|"]
        for name, p in result["scores"].items():
            t = fitted.get(name, recipe.DEFAULT_THRESHOLD)
            lines.append(f"| {name} | {p:.4f} | {t:.2f} | {'yes' if name in result['labels'] else 'no'} |")
    n = len(tok(*texts)["input_ids"])
    if n > tok.model_max_length:
        reads = (
            f"the first {tok.model_max_length}"
            if second is None
            else f"{tok.model_max_length} (the longer text is cut first)"
        )
        lines.append(f"\nThe {'text' if second is None else 'pair'} has {n} tokens; the model reads {reads}.")
    return result["scores"], "\n".join(lines)


def build(export: Path) -> gr.Blocks:
    multi = recipe.load(str(export)).model.config.problem_type == "multi_label_classification"
    kind = "multi-label, fitted thresholds" if multi else "multi-class"
    columns = recipe.text_columns(str(export))
    with gr.Blocks(title="recipebox: text classification") as blocks:
        gr.Markdown(f"# Text classification ({kind})\n`{export}`")
        if len(columns) == 2:  # a sentence pair: one box per column, named as in the training data
            boxes = [gr.Textbox(label=c, lines=3, elem_id=f"cls-text-{i}") for i, c in enumerate(columns)]
        else:
            boxes = [gr.Textbox(label="Text", lines=3, elem_id="cls-text")]
        run = gr.Button("Classify", variant="primary")
        # Multi-label: no single winner to headline; the decision below says which labels apply.
        scores = gr.Label(label="Scores", num_top_classes=10, show_heading=not multi, elem_id="cls-scores")
        decision = gr.Markdown(elem_id="cls-decision")
        run.click(lambda *t: classify(export, *t), boxes, [scores, decision], api_name="classify")
        if found := examples(export, "classify"):
            gr.Examples(found, boxes, label="Held-out texts" if len(boxes) == 1 else "Held-out pairs")
    return blocks
