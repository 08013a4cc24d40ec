"""Screenshots of the demo apps for the docs: each app served from an export, its first saved example run,
the page captured by the same headless Chromium the browser tests drive.

    python demos/screenshots.py runs/quickstart/export runs/toxic/export runs/ner/export runs/qa/export
                                                                  # -> docs/demos/*.png
Summarisation exports given together share one page, side by side (as `demos/app.py` serves them).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demos.common import REPO, app_for, find_export, quiet_environment  # noqa: E402

# Per app, per picture: (tab to open, endpoint whose first example fills the inputs, input elem ids, button,
# output elem id, and what it shows once answered: "table" (a first cell), "value" (a filled text box), else a
# regular expression).
SCENES = {
    "mlm_nsp": [
        ("Fill the mask", "fill_mask", ["fill-text"], "Fill", "fill-out", "table"),
        ("Next sentence?", "next_sentence", ["nsp-a", "nsp-b"], "Check", "nsp-verdict", "p\\(B follows A\\)"),
    ],
    "text_classification": [(None, "classify", ["cls-text"], "Classify", "cls-decision", "Labels?:")],
    "ner": [(None, "tag", ["ner-text"], "Tag", "ner-table", "table")],
    "qa": [(None, "answer", ["qa-context", "qa-question"], "Answer", "qa-note", "Answer:|No answer")],
    "causal_lm": [(None, "generate", ["lm-prompt"], "Generate", "lm-out", "value")],
    "summarization": [(None, "summarize", ["sum-text"], "Summarise", "sum-out-0", "value")],
    "asr_ctc": [(None, "transcribe", [], "Transcribe", "asr-out", "value")],
}
FILES = {"asr_ctc": ["asr-audio"]}  # per app: file inputs (paths relative to the export), after the text ones
ANSWERED = """([id, ready]) => { const e = document.getElementById(id);
  if (ready === "table") return !!e.querySelector('[data-testid="cell-0-0"]')?.innerText.trim();
  if (ready === "value") return e.querySelector("textarea").value.length > 0;
  return new RegExp(ready).test(e.innerText); }"""


def shoot(exports: list[Path], out_dir: Path, browser) -> list[Path]:
    import importlib

    from PIL import Image

    from demos.common import launch

    export, name = exports[0], app_for(exports[0])
    blocks = launch(importlib.import_module(f"demos.{name}").build(*exports), host="127.0.0.1", port=None,
                    share=False, concurrency=1, block=False)  # fmt: skip
    examples = json.loads((export / "examples.json").read_text(encoding="utf-8"))
    saved = []
    try:
        for i, (tab, endpoint, inputs, button, output, ready) in enumerate(SCENES[name]):
            page = browser.new_page(viewport={"width": 960, "height": 640})
            page.goto(blocks.local_url)
            if tab:
                page.get_by_role("tab", name=tab).click()
            example = examples[endpoint][0]
            if name == "text_classification" and len(example) == 2:  # a sentence pair: a box per text
                inputs = ["cls-text-0", "cls-text-1"]
            for elem_id, value in zip(inputs, example):  # text inputs come first
                page.locator(f"#{elem_id} textarea").fill(str(value))
            for elem_id, value in zip(FILES.get(name, []), example[len(inputs) :]):
                page.locator(f"#{elem_id} input[type=file]").set_input_files(str(export / value))
            page.get_by_role("button", name=button, exact=True).click()
            page.wait_for_function(ANSWERED, arg=[output, ready], timeout=60_000)
            png = page.screenshot(full_page=True)
            path = out_dir / f"{name}{'' if i == 0 else f'_{endpoint}'}.png"
            Image.open(io.BytesIO(png)).convert("RGB").quantize(64).save(path, optimize=True)  # small files
            saved.append(path)
            page.close()
    finally:
        blocks.close()
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("exports", nargs="+", help="export folders (RUN/export) or run folders")
    parser.add_argument("--out", default=str(REPO / "docs" / "demos"), help="where the PNGs go")
    args = parser.parse_args(argv)
    exports = [find_export(e) for e in args.exports]
    quiet_environment()
    from playwright.sync_api import sync_playwright

    from demos import browser as chromium

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = chromium.launch(playwright)
        together = [e for e in exports if app_for(e) == "summarization"]
        groups = [[e] for e in exports if e not in together] + ([together] if together else [])
        for group in groups:
            for path in shoot(group, out, browser):
                print(f"{path} ({path.stat().st_size // 1024} KB)")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
