"""The backend protocol checked on real ranks: run as `torchrun --nproc_per_node=2 tests/backend_checks.py OUT
[GROUP ...]` (or with plain python for one process); rank 0 writes OUT/results.json for tests/test_backends.py.

Groups:
- contract: for each backend, a step, accumulation without sync equal to one bigger batch, a checkpoint
  round trip that continues exactly, the full state dict on every rank, and the learning rate.
- generate: the loop's evaluation with `generate` in it (tiny GPT-2 and T5 built from configs), on uneven
  shards, under every backend that can run here; the generated ids per eval row.
- shard: FSDP2 on tiny BERT, GPT-2, T5, BART and wav2vec2: wrapped by their outermost layer lists, one step;
  and --check-replicas' check that every rank built the same weights.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from recipebox.checkpoints.sharded import load_checkpoint, save_checkpoint
from recipebox.launch.backends import BackendSettings, layer_lists, make_backend
from recipebox.launch.config import ConfigError, TrainConfig
from recipebox.launch.loop import Trainer, linear_schedule, make_adamw
from recipebox.launch.runtime import Runtime
from recipebox.launch.task import label_targets, model_inputs

VOCAB, PROMPT, NEW_TOKENS = 64, 6, 5


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, initializer_factor=3.0)  # fmt: skip
    return T5ForConditionalGeneration(cfg)


def rows(n: int, seed: int, seq2seq: bool) -> list[dict]:
    """Prompts of one length (no padding, so a row's generation cannot depend on its batch-mates)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (PROMPT,), generator=g).tolist()
        out.append(
            {
                "input_ids": ids,
                "labels": torch.randint(3, VOCAB, (4,), generator=g).tolist() if seq2seq else ids,
            }
        )
    return out


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


class LMTask:
    """A causal or seq2seq LM: token cross-entropy sums; evaluation records greedy continuations."""

    title, processor, lengths, max_length, examples, flops_per_token = "lm", None, None, 16, {}, 0.0

    def __init__(self, model, seq2seq: bool, n_train: int = 16, n_eval: int = 5, wrapped: bool = False):
        self.model = self.trained = model
        if wrapped:  # a task's own module around the HF model (as mlm_nsp's PretrainingObjective)
            self.trained = Wrapper(model)
        self.seq2seq = seq2seq
        self.splits = {"train": rows(n_train, 1, seq2seq), "validation": rows(n_eval, 2, seq2seq)}
        self.generated: list = []

    def collate(self, batch_rows, pad_to_length=None):
        from recipebox.kernels.collate import collate_padded

        return collate_padded(batch_rows, pad_id=0, pad_to_length=pad_to_length)

    def prepare(self, batch, generator):
        return batch

    def sizes(self, batch):
        return batch["input_ids"].shape[0], int(batch["attention_mask"].sum())

    def targets(self, batch):
        labels = batch["labels"] if self.seq2seq else batch["labels"][:, 1:]
        return {"lm": label_targets(labels)}

    def loss(self, model, batch):
        inputs = model_inputs(batch)
        labels = inputs.pop("labels")
        if self.seq2seq:
            logits = model(**inputs, labels=labels).logits
        else:
            logits, labels = model(**inputs).logits[:, :-1], labels[:, 1:]
        sums = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return {"lm": sums}, None

    def evaluate(self, model, batch, outputs, generate):
        if generate is None:
            return {}, []
        ids = generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip
        new = ids if self.seq2seq else ids[:, batch["input_ids"].shape[1] :]
        return {}, new.tolist()

    def summarize(self, records, means, split):
        self.generated = records
        return {"perplexity": math.exp(means["loss"])}

    def before_export(self, model):
        pass


def trainer(rt, backend: str, task, **cfg):
    options = dict(batch_size=4, eval_batch_size=2, max_steps=4, lr=1e-2, warmup_ratio=0.25, log_every=1)
    config = TrainConfig(**{**options, **cfg, "backend": backend})
    settings = BackendSettings(seed=config.seed, batch_size=config.batch_size, grad_accum=config.grad_accum,
                               max_grad_norm=config.max_grad_norm, lr=config.lr, zero_stage=cfg.get("zero_stage", 2),
                               buckets=[16])  # fmt: skip
    return Trainer(config, rt, make_backend(backend, rt, settings), task)


def fingerprint(state: dict) -> float:
    return sum(float(v.double().sum() + v.double().square().sum()) for k, v in sorted(state.items()))


def same_on_every_rank(value: float) -> bool:
    if not dist.is_initialized():
        return True
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return all(v == every[0] for v in every)


def contract(rt, backend: str, workdir: Path, **cfg) -> dict:
    """The members of launch.backends.Backend that the loop relies on, checked by what they must do."""
    t = trainer(rt, backend, LMTask(tiny_gpt2(), seq2seq=False), **cfg)
    before = fingerprint(t.backend.full_state_dict(every_rank=True))
    loss, norm, samples, tokens = t.train_step()
    after = fingerprint(t.backend.full_state_dict(every_rank=True))
    lrs = [t.backend.current_lr()]
    expected = linear_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.cfg.lr), 1, 4)
    expected.optimizer.step()
    expected.step()
    # Two micro-batches of 2 with the reduction only on the last equal one step on batches of 4.
    acc = trainer(rt, backend, LMTask(tiny_gpt2(), seq2seq=False), batch_size=2, grad_accum=2, **cfg)
    acc.train_step()
    acc_state = {k: v.float() for k, v in acc.backend.full_state_dict(every_rank=True).items()}
    one_state = {k: v.float() for k, v in t.backend.full_state_dict(every_rank=True).items()}
    accumulation_ok = all(torch.allclose(acc_state[k], one_state[k], rtol=1e-4, atol=1e-6) for k in one_state)
    # Save after step 1, take step 2; a fresh trainer two steps on (other weights, optimizer moments and
    # schedule than the checkpoint's) loads it, goes back to its data position and takes step 2 again.
    root = workdir / backend / f"zero{cfg.get('zero_stage', '')}"
    position = (t.state.epoch, t.state.consumed)  # what a checkpoint's rank state holds
    meta = {"step": 1, "world_size": rt.world_size, "scheduler": t.backend.scheduler.state_dict()}
    save_checkpoint(root, 1, state=t.backend.checkpoint_state(), rank_state={"x": torch.zeros(1)}, rank_meta={},
                    meta=meta)  # fmt: skip
    state = torch.get_rng_state()
    second, _, _, _ = t.train_step()
    continued = fingerprint(t.backend.full_state_dict(every_rank=True))
    lrs.append(t.backend.current_lr())
    again = trainer(rt, backend, LMTask(tiny_gpt2(), seq2seq=False), **cfg)
    again.train_step()
    again.train_step()
    stale = fingerprint(again.backend.full_state_dict(every_rank=True)) != after
    loaded_meta, _, _ = load_checkpoint(root / "step-000001", state=again.backend.checkpoint_state())
    again.backend.scheduler.load_state_dict(loaded_meta["scheduler"])
    again.state.epoch, again.state.consumed = position
    again._batches = None  # the next batch is drawn from the restored position, as a resumed run's is
    torch.set_rng_state(state)
    second_again, _, _, _ = again.train_step()
    full = t.backend.full_state_dict(every_rank=True)
    export_state = t.backend.full_state_dict()  # what the export reads: complete on rank 0
    result = {
        "loss": float(loss),
        "grad_norm": float(norm),
        "samples": samples,
        "tokens": tokens,
        "changed": after != before,
        "lr_after_1": lrs[0],
        "lr_expected_after_1": expected.get_last_lr()[0],
        "accumulation_equals_bigger_batch": accumulation_ok,
        "loaded_over_another_state": stale,
        "resumed_loss_equal": float(second) == float(second_again),
        "resumed_weights_equal": continued == fingerprint(again.backend.full_state_dict(every_rank=True)),
        "full_state_keys_match": sorted(full) == sorted(tiny_gpt2().state_dict()),
        "export_state_on_rank_0": sorted(export_state) == sorted(full) if rt.is_main else True,
        "full_state_same_on_every_rank": same_on_every_rank(fingerprint(full)),
    }
    for tr in (t, acc, again):
        tr.backend.close()
    return result


def generation(rt, backend: str, **cfg) -> dict:
    """The loop's evaluate with generation in it; uneven shards (5 rows over 2 ranks, eval batches of 2)."""
    out = {}
    families = (
        ("gpt2", tiny_gpt2(), False, False),
        ("t5", tiny_t5(), True, False),
        ("gpt2_wrapped", tiny_gpt2(), False, True),
    )
    for name, model, seq2seq, wrapped in families:
        task = LMTask(model, seq2seq, wrapped=wrapped)
        t = trainer(rt, backend, task, **cfg)
        metrics = t.evaluate()
        out[name] = {"generated": task.generated, "perplexity": metrics.get("eval/perplexity")}
        t.backend.close()
    # One eval row over every rank: a rank with nothing to evaluate still joins the collective forwards.
    task = LMTask(tiny_gpt2(), seq2seq=False, n_eval=1)
    t = trainer(rt, backend, task, **cfg)
    metrics = t.evaluate()
    out["one_row"] = {"generated": task.generated, "perplexity": metrics.get("eval/perplexity")}
    t.backend.close()
    return out


def shard(rt) -> dict:
    """FSDP2 over each family's outermost layer lists: which lists, and one finite training step."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        BertForMaskedLM,
        Wav2Vec2Config,
        Wav2Vec2ForCTC,
    )  # fmt: skip

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32))  # fmt: skip
    bart = BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32))  # fmt: skip
    w2v = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, mask_time_prob=0.0, pad_token_id=0, ctc_loss_reduction="sum"))  # fmt: skip
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(rt.rank))
    batches = {
        "bert": (bert, {"input_ids": ids, "labels": ids}),
        "gpt2": (tiny_gpt2(), {"input_ids": ids, "labels": ids}),
        "t5": (tiny_t5(), {"input_ids": ids, "labels": ids[:, :4].contiguous()}),
        "bart": (bart, {"input_ids": ids, "labels": ids[:, :4].contiguous()}),
        "wav2vec2": (w2v, {"input_values": torch.randn(2, 800), "labels": torch.randint(1, 12, (2, 3))}),
    }
    out = {}
    for name, (model, batch) in batches.items():
        settings = BackendSettings(lr=1e-2)
        backend = make_backend("fsdp", rt, settings)
        wrapped = [type(layers[0]).__name__ for layers in layer_lists(model)]
        backend.setup(model, lambda m: make_adamw(m, 1e-2, 0.0), lambda o: linear_schedule(o, 0, 10))
        before = fingerprint(backend.full_state_dict(every_rank=True))
        loss = backend.model(**batch).loss
        backend.backward(loss)
        norm = backend.step(1.0)
        out[name] = {"wrapped": wrapped, "loss": float(loss), "grad_norm": float(norm),
                     "changed": fingerprint(backend.full_state_dict(every_rank=True)) != before}  # fmt: skip
    return out


def xla_generation_refused(rt) -> dict:
    t = trainer(rt, "xla", LMTask(tiny_gpt2(), seq2seq=False))
    try:
        t.backend.generate(input_ids=torch.zeros(1, 2, dtype=torch.long))
        refused = ""
    except ConfigError as err:
        refused = str(err)
    metrics = t.evaluate()
    return {"static_shapes": t.backend.static_shapes, "refused": refused, "metrics": sorted(metrics)}


def built_alike(rt) -> dict:
    """--check-replicas' first check: a model built under one seed passes; one drawn per rank is named."""
    from recipebox.launch.loop import check_built_alike

    torch.manual_seed(0)
    check_built_alike(rt, torch.nn.Linear(8, 8))
    torch.manual_seed(rt.rank)  # a build step that draws differently on each rank
    try:
        check_built_alike(rt, torch.nn.Linear(8, 8))
        return {"refused": ""}
    except RuntimeError as err:
        return {"refused": str(err)}


def main(out: Path, groups: list[str]) -> None:
    rt = Runtime.start(seed=0)
    work = Path(tempfile.mkdtemp(prefix="backend-checks-")) if rt.is_main else None
    if rt.distributed:
        shared = [str(work)]
        dist.broadcast_object_list(shared, src=0)
        work = Path(shared[0])
    results = {}
    multi = rt.world_size > 1
    backends = [("ddp", {}), *([("fsdp", {})] if multi else []),
                *[("deepspeed", {"zero_stage": s}) for s in (1, 2, 3)]]  # fmt: skip
    if "contract" in groups:
        for name, cfg in backends:
            results[f"contract/{name}{cfg.get('zero_stage', '')}"] = contract(rt, name, work, **cfg)
    if "generate" in groups:
        for name, cfg in [("ddp", {}), *([("fsdp", {})] if multi else []), ("deepspeed", {"zero_stage": 3})]:
            results[f"generate/{name}{cfg.get('zero_stage', '')}"] = generation(rt, name, **cfg)
    if "shard" in groups:
        results["shard"] = shard(rt)
        results["built_alike"] = built_alike(rt)
    if "xla" in groups:
        results["contract/xla"] = contract(rt, "xla", work)
        results["generate/xla"] = xla_generation_refused(rt)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    rt.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["contract", "generate", "shard"])
