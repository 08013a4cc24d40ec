"""Train or fine-tune a GPT-2-style causal language model on your own text, then generate from it.

Features: plain-text files (documents separated by a blank line, or one per line), JSON lines with a text
field, or a `datasets` name; a byte-level BPE trained on the training documents when no tokenizer is given;
an end-of-text token between documents, packed into blocks of --block-size across the whole corpus (only
the final remainder is dropped, and counted), or --packing none (one row per document, padding out of the
loss); the loss is the mean over every predicted token of the step, across micro-batches and ranks;
evaluation reports loss per token and perplexity = exp(total NLL / total tokens) over the whole split and
generates continuations of --prompts (metrics.jsonl and a W&B table); any backend (--backend); an export
that `pipeline("text-generation")` loads, with its generation settings; a `predict` entry.

Launch:
    python recipes/causal_lm.py                                            # toy corpus, small GPT-2, 1 process
    torchrun --nproc_per_node=2 recipes/causal_lm.py                       # 2 ranks
    torchrun --nproc_per_node=8 recipes/causal_lm.py --model gpt2 --train-files my_corpus.txt --block-size 1024
    torchrun --nproc_per_node=8 recipes/causal_lm.py --backend fsdp --model gpt2-medium ...
    python recipes/causal_lm.py predict runs/causal_lm/export "Once the boat was rigged," --max-new-tokens 40
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import random
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from recipebox.checkpoints.export import check_export, saved_inputs
from recipebox.data.lm import read_corpus, tokenize_corpus
from recipebox.data.text import DataError
from recipebox.data.tokenizer import load_tokenizer, train_byte_bpe
from recipebox.kernels.collate import collate_padded
from recipebox.launch.config import (
    ConfigError,
    TrainConfig,
    check_choice,
    number,
    parse_config,
    validate_train_config,
)
from recipebox.launch.flops import flops_per_token_or_zero
from recipebox.launch.recipe import TRAINED_HERE, check_model_fits, run_main, run_recipe, saved_processor
from recipebox.launch.runtime import Runtime
from recipebox.launch.task import label_targets, model_inputs, no_padding_mask, text_sizes, token_loss_sum

TOY_CORPUS = Path(__file__).resolve().parent.parent / "data" / "toy" / "mlm_nsp" / "corpus.txt"
PROMPT_SEPARATOR = "|"


@dataclass
class CausalLMConfig(TrainConfig):
    train_files: str = str(TOY_CORPUS)  # comma-separated text / .jsonl files, or a `datasets` name
    validation_files: str = ""  # empty: hold out --eval-fraction of the training documents
    eval_fraction: float = 0.1  # share of documents held out when no --validation-files is given
    documents: str = "blank_line"  # blank_line: a blank line ends a document; line: every line is one
    text_key: str = "text"  # JSON lines / `datasets`: the field holding the text
    dataset_config: str = ""  # the `datasets` configuration name, when the files are a `datasets` name
    train_split: str = "train"  # a `datasets` name: the split to train on
    validation_split: str = "validation"  # a `datasets` name: the split to validate on (or --eval-fraction)
    model: str = ""  # folder or hub name of a causal LM; empty: a GPT-2 built from the sizes below
    tokenizer: str = (
        ""  # folder or hub name; empty: the model's, or a byte-level BPE trained on the documents
    )
    vocab_size: int = 2000  # byte-level BPE pieces to train when there is no tokenizer
    n_embd: int = 128  # model built from scratch: width
    n_layer: int = 2  # model built from scratch: transformer layers
    n_head: int = 2  # model built from scratch: attention heads
    dropout: float = 0.1  # model built from scratch: residual, embedding and attention dropout
    block_size: int = 128  # tokens per training row
    packing: str = "blocks"  # blocks: documents packed across row boundaries | none: one row per document
    prompts: str = "Then,|One morning at the|Later, the"  # evaluation's generation prompts, split at |
    max_new_tokens: int = 24  # evaluation's continuations (greedy), and the export's default
    temperature: float = 0.8  # the export's sampling defaults (predict, demo)
    top_p: float = 0.95  # nucleus sampling: the smallest set of tokens holding this much probability
    trust_remote_code: bool = False  # let a hub repository run its own model code
    epochs: float = 6.0
    batch_size: int = 16
    lr: float = 2e-3
    warmup_ratio: float = 0.05


def _validate(cfg: CausalLMConfig) -> None:
    validate_train_config(cfg)
    check_choice(cfg, "packing", ("blocks", "none"))
    check_choice(cfg, "documents", ("blank_line", "line"))
    if cfg.block_size < 8:
        raise ConfigError(f"--block-size must be at least 8, got {cfg.block_size}")
    if not cfg.model and cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    if not 0 <= cfg.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction must be in [0, 1), got {cfg.eval_fraction}")


def _files(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


def _setup_data(cfg: CausalLMConfig, rt: Runtime, run_dir: Path):
    options = dict(documents=cfg.documents, text_key=cfg.text_key, dataset_config=cfg.dataset_config)
    train_docs = read_corpus(_files(cfg.train_files), split=cfg.train_split, **options)
    if cfg.validation_files:
        eval_docs = read_corpus(_files(cfg.validation_files), split=cfg.validation_split, **options)
    else:  # whole documents held out, so no evaluation text was seen in training
        order = list(range(len(train_docs)))
        random.Random(cfg.seed).shuffle(order)
        held = set(order[: round(len(train_docs) * cfg.eval_fraction)])
        if len(held) == len(train_docs):
            raise DataError(
                f"{cfg.train_files}: --eval-fraction {cfg.eval_fraction} holds out all {len(train_docs)} "
                f"document(s), leaving none to train on; lower it, or give --validation-files"
            )
        eval_docs = [d for i, d in enumerate(train_docs) if i in held]
        train_docs = [d for i, d in enumerate(train_docs) if i not in held]
    tok = _setup_tokenizer(cfg, rt, run_dir, train_docs)
    cache = run_dir / "cache" / "tokenised"
    with rt.main_process_first():
        train, info = tokenize_corpus(train_docs, tok, cfg.block_size, packing=cfg.packing, cache_dir=cache,
                                      source=cfg.train_files)  # fmt: skip
        splits = {"train": train}
        if eval_docs:
            splits["validation"], _ = tokenize_corpus(
                eval_docs, tok, cfg.block_size, packing=cfg.packing, cache_dir=cache,
                source=cfg.validation_files or f"{cfg.train_files} (held-out documents)",
            )  # fmt: skip
    rt.print(
        f"data: {info['documents']} training documents, {info['tokens']} tokens in {info['blocks']} rows of "
        f"{cfg.block_size} ({info['dropped']} remainder tokens dropped); "
        f"{len(eval_docs)} held-out documents in {len(splits.get('validation', []))} rows"
    )
    lengths = list(train["length"]) if "length" in train.column_names else None
    splits = {k: d.remove_columns("length") if "length" in d.column_names else d for k, d in splits.items()}
    return tok, splits, lengths


def _setup_tokenizer(cfg: CausalLMConfig, rt: Runtime, run_dir: Path, docs: list[str]):
    """--tokenizer, the model's, or a byte-level BPE trained on the training documents; saved with the run."""
    source = cfg.tokenizer or cfg.model

    def make():
        if source:
            tok = load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)
        else:
            tok = train_byte_bpe(docs, vocab_size=cfg.vocab_size)
        if tok.eos_token_id is None:
            raise ConfigError(
                f"--tokenizer {source}: it has no end-of-text (eos) token to separate documents"
            )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token  # GPT-2 has none; padding never reaches the loss or the mask
        return tok

    made_from = source or TRAINED_HERE
    tok = saved_processor(rt, run_dir, make, lambda folder: load_tokenizer(str(folder)), made_from=made_from)
    tok.model_max_length = cfg.block_size
    return tok


def _setup_model(cfg: CausalLMConfig, tok):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if cfg.model:
        try:
            return AutoModelForCausalLM.from_pretrained(
                cfg.model, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
            )
        except OSError as err:
            raise ConfigError(f"--model {cfg.model}: cannot load a safetensors causal LM ({err})") from None
    config = GPT2Config(
        vocab_size=len(tok), n_positions=max(cfg.block_size, 1024),
        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def left_padded(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    """Prompts for batched generation: padded on the left, so every continuation starts at the same column."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] or [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


@contextlib.contextmanager
def without_pad_id(config) -> Iterator[None]:
    """The config without its pad id for the duration of a forward. Given no attention mask (`prepare`),
    GPT-2 looks for that id in the ids at every forward, for a warning: a read from the device. The rows are
    padded on the right and the padding carries no label, so the forward does without it; the config keeps
    it everywhere else (the run's model_config, checkpoints, the export)."""
    saved, config.pad_token_id = config.pad_token_id, None
    try:
        yield
    finally:
        config.pad_token_id = saved


class CausalLMTask:
    """Next-token prediction over packed blocks; each evaluation's first batch also generates from --prompts."""

    def __init__(self, cfg: CausalLMConfig, tok, splits: dict, lengths, model):
        self.title = f"Causal language model ({cfg.name})"
        self.model = self.trained = model
        self.processor, self.splits, self.lengths, self.max_length = tok, splits, lengths, cfg.block_size
        self.cfg, self.prompts = cfg, [p for p in cfg.prompts.split(PROMPT_SEPARATOR) if p.strip()]
        self.examples = {"generate": [[p, cfg.max_new_tokens] for p in self.prompts]}
        self.samples: list[dict[str, str]] = []
        self.flops_per_token = flops_per_token_or_zero(model.config, seq_len=cfg.block_size)
        self._generate_next_eval = True  # set by every training step: one round of samples per evaluation
        self.collate = functools.partial(collate_padded, pad_id=tok.pad_token_id, pad_to_multiple_of=8)

    sizes = staticmethod(text_sizes)
    prepare = staticmethod(no_padding_mask)  # rows are padded on the right: the causal mask hides the padding

    def targets(self, batch):
        return {"loss": label_targets(batch["labels"], shift=True)}

    def loss(self, model, batch):
        """Cross-entropy summed over every predicted token; the labels are the inputs, shifted here once."""
        if model.training:
            self._generate_next_eval = True
        inputs = model_inputs(batch)
        labels = inputs.pop("labels")
        with without_pad_id(self.model.config):
            logits = model(**inputs).logits
        return {"loss": token_loss_sum(logits, labels, shift=True)}, None

    def evaluate(self, model, batch, outputs, generate):
        """No per-row records (the loss is the metric); the prompts' greedy continuations, once per
        evaluation, on every rank together (sharded backends generate in lockstep)."""
        if self._generate_next_eval and generate is not None and self.prompts:
            self._generate_next_eval = False
            tok = self.processor
            enc = {k: v.to(batch["input_ids"].device) for k, v in left_padded(tok, self.prompts).items()}
            ids = generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)  # fmt: skip
            texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            self.samples = [{"prompt": p, "continuation": t} for p, t in zip(self.prompts, texts)]
        return {}, []

    def summarize(self, records, means, split):
        """Perplexity from the split's exact mean loss per token; the samples as a table (W&B) and rows
        (metrics.jsonl)."""
        out = {"perplexity": math.exp(min(means["loss"], 700.0))}
        if self.samples:
            out["samples"], self.samples = self.samples, []
        return out

    def before_export(self, model):
        """Sampling defaults for `pipeline("text-generation")`, predict and the demo: generation_config.json."""
        from transformers import GenerationConfig

        tok, cfg = self.processor, self.cfg
        model.generation_config = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip


def _build(cfg: CausalLMConfig, rt: Runtime, run_dir: Path) -> CausalLMTask:
    tok, splits, lengths = _setup_data(cfg, rt, run_dir)
    model = _setup_model(cfg, tok)
    check_model_fits(model, tok, cfg.block_size, "--block-size")
    return CausalLMTask(cfg, tok, splits, lengths, model)


@functools.lru_cache(maxsize=4)
def load(export_dir: str):
    """The export's text-generation pipeline, loaded once per folder (demo apps reuse it)."""
    check_export(export_dir, "causal_lm")
    from transformers import pipeline

    return pipeline("text-generation", model=export_dir, model_kwargs={"use_safetensors": True})


_SEEDED = threading.Lock()  # torch's global generator: one seeded generation at a time (the demo runs two)


def model_window(model) -> int:
    """Positions the model reads (GPT-2's n_positions); 0 when its config does not say."""
    return (
        getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 0) or 0
    )


def prompt_kept(export_dir: str, prompt: str, max_new_tokens: int | None) -> tuple[str, int, int]:
    """The prompt as generation reads it, its token count before and after: the last tokens that leave room for
    `max_new_tokens` in the model's window (a longer prompt would run past its position table). The cut
    text is encoded again as generation will encode it (a cut inside a character, or a BOS token, can
    count more), and cut further until it fits."""
    generator = load(str(export_dir))
    tok = generator.tokenizer
    ids = tok(prompt)["input_ids"]
    window = model_window(generator.model)
    if not window or max_new_tokens is None or len(ids) + max_new_tokens <= window:
        return prompt, len(ids), len(ids)
    if max_new_tokens >= window:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {export_dir}'s "
                          f"{window}-token window; ask for fewer")  # fmt: skip
    keep = window - max_new_tokens
    while True:
        text = tok.decode(ids[len(ids) - keep :], skip_special_tokens=True)
        kept = len(tok(text)["input_ids"])
        if keep == 1 or kept + max_new_tokens <= window:
            return text, len(ids), kept
        keep -= 1


def generate_text(export_dir: str, prompt: str, *, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, seed: int = 0) -> str:  # fmt: skip
    """The continuation of `prompt` (without it), sampled with the export's defaults unless given; a fixed
    `seed` gives the same text every time. temperature 0 means greedy. A prompt longer than the window
    leaves for the new tokens is read from its end (prompt_kept)."""
    generator = load(str(export_dir))
    defaults = generator.model.generation_config
    options = {"max_new_tokens": max_new_tokens or defaults.max_new_tokens}
    prompt = prompt_kept(export_dir, prompt, options["max_new_tokens"])[0]
    if temperature is None:  # the export's: a recipe's samples; one without sampling settings is greedy,
        sampling = defaults.do_sample or top_p is not None  # unless --top-p asks to sample
        temperature = (1.0 if defaults.temperature is None else defaults.temperature) if sampling else 0.0
    if temperature <= 0:
        options["do_sample"] = False
    else:
        options.update(
            do_sample=True, temperature=temperature, top_p=defaults.top_p if top_p is None else top_p
        )
    with _SEEDED:
        torch.manual_seed(seed)
        return generator(prompt, return_full_text=False, **options)[0]["generated_text"]


def predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="causal_lm.py predict", description="Continue a prompt.")
    parser.add_argument("export", help="an export folder (RUN/export)")
    parser.add_argument("prompt", nargs="?", help="default: the export's evaluation prompts")
    parser.add_argument("--max-new-tokens", type=number(), default=None, help="default: the export's")
    parser.add_argument("--temperature", type=number(float, 0), help="0: greedy; default: the export's")
    parser.add_argument("--top-p", type=number(float, 0, 1), default=None, help="default: the export's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        parser.error("the prompt is empty; give a text to continue (none: the export's evaluation prompts)")
    prompts = [args.prompt] if args.prompt else saved_inputs(args.export, "generate", "give a prompt")
    for prompt in prompts:
        text = generate_text(args.export, prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)  # fmt: skip
        print(prompt + text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        return predict(argv[1:])
    cfg = parse_config(CausalLMConfig, argv, description=__doc__)
    _validate(cfg)
    return run_recipe(cfg, _build, "causal_lm")


if __name__ == "__main__":
    run_main(main)
