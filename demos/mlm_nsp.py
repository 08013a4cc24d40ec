"""Show what an exported MLM+NSP model predicts: a fill-mask example and an is-next / not-next pair.

    python demos/mlm_nsp.py runs/quickstart                      # examples from the run's held-out documents
    python demos/mlm_nsp.py runs/quickstart/export --text "The bees made [MASK] all summer." \
        --pair "Martha opened the hive." "The queen was laying eggs."
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def held_out_examples(run_dir: Path) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """A sentence to fill in and two pairs (true next, random) from documents the run never trained on."""
    import yaml

    from data.nsp import split_documents
    from data.text import read_documents

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    files = [f for f in cfg["train_files"].split(",") if f]
    docs = read_documents(files, documents=cfg["documents"], cache_dir=str(run_dir / "cache" / "text"))
    _, held = split_documents(docs, cfg["eval_fraction"], cfg["seed"])
    held = [d for d in held if len(d) >= 2] or [d for d in docs if len(d) >= 2]
    rng = random.Random(0)
    doc = rng.choice(held)
    others = [d for d in held if d is not doc] or [d for d in docs if d is not doc]
    return doc[0], (doc[0], doc[1]), (doc[0], rng.choice(rng.choice(others)))


def mask_a_word(sentence: str, mask_token: str) -> str:
    """Mask the longest word: it carries the most meaning, so the guess says more about the model."""
    words = sentence.split()
    target = max(range(len(words)), key=lambda i: len(words[i].strip(".,;:!?\"'")))
    core = words[target].strip(".,;:!?\"'")
    words[target] = words[target].replace(core, mask_token)
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="a run folder (uses its export/) or an export folder")
    parser.add_argument("--text", help="a sentence with the tokenizer's mask token, e.g. [MASK]")
    parser.add_argument(
        "--pair", nargs=2, metavar=("A", "B"), help="two sentences: is B the next one after A?"
    )
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoTokenizer, BertForNextSentencePrediction, pipeline

    transformers.logging.set_verbosity_error()  # the NSP model skips the MLM head by design: no load report

    path = Path(args.path)
    export = path / "export" if (path / "export" / "config.json").exists() else path
    if not (export / "config.json").exists():
        print(f"error: {path} holds no exported model (config.json); train first or pass the export folder")
        return 2
    tok = AutoTokenizer.from_pretrained(export)
    if args.text or args.pair:
        text = args.text or f"The {tok.mask_token} is here."
        pairs = [tuple(args.pair)] if args.pair else []
    else:
        sentence, true_pair, random_pair = held_out_examples(path)
        text, pairs = mask_a_word(sentence, tok.mask_token), [true_pair, random_pair]

    fill = pipeline("fill-mask", model=str(export), tokenizer=tok, top_k=5)
    print(f"fill-mask: {text}")
    for guess in fill(text):
        print(f"  {guess['token_str']:>15s}  {guess['score']:.3f}")

    nsp = BertForNextSentencePrediction.from_pretrained(export).eval()
    for a, b in pairs:
        enc = tok(a, b, return_tensors="pt", return_token_type_ids=True, truncation=True)
        with torch.no_grad():
            p_next = nsp(**enc).logits.softmax(-1)[0, 0].item()
        verdict = "is next" if p_next >= 0.5 else "not next"
        print(f"next sentence? p={p_next:.3f} -> {verdict}\n  A: {a}\n  B: {b}")
    return 0


if __name__ == "__main__":
    code = main()
    gc.freeze()  # spares the exit's garbage collections a walk over torch's objects (about a second)
    sys.exit(code)
