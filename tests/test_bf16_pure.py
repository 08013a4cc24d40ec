"""--precision bf16-pure on the ddp backend: the recipe's module, cast to bf16 (the twin), runs the forward
and backward; an fp32 copy made first holds the master weights that the optimizer steps, checkpoints save and
the export writes. In this process:
what is bf16 and what is fp32, and the first step against fp32. As a user runs it (torchrun, 2 ranks): the
replicas agree, a lost checkpoint resumes bit for bit, and checkpoints and export hold fp32 weights."""

from __future__ import annotations

import json
import math
import time

import pytest
import recipe_runs
import torch
from test_host_sync import count_step_reads, recipe_trainer, steps_under_sync_detection


def test_the_twin_computes_in_bf16_and_the_step_lands_on_fp32_masters(tmp_path, tokenizer_dir):
    options = ("--tokenizer", str(tokenizer_dir), "--max-length", "32", "--batch-size", "8", "--dropout", "0")
    torch.manual_seed(0)  # the weights' draw (a run seeds in Runtime.start; this builds the task directly)
    pure = recipe_trainer("mlm_nsp", tmp_path / "pure", "cpu", *options, "--precision", "bf16-pure")
    backend = pure.backend
    twin, masters = backend.compute_model, backend.raw_model
    assert twin is pure.task.trained and backend.model is twin  # one process: no DDP wrapper
    assert masters is not twin
    assert {p.dtype for p in twin.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in masters.parameters()} == {torch.float32}
    embeddings = twin.model.get_input_embeddings().weight
    assert twin.model.get_output_embeddings().weight is embeddings  # tied weights stay tied in the twin
    assert not any(p is embeddings for p in masters.parameters())
    # No autocast: layer norms take and give bf16 (autocast would run them, and the residual stream, in fp32).
    norms = []
    first_norm = next(m for m in twin.modules() if isinstance(m, torch.nn.LayerNorm))
    first_norm.register_forward_hook(lambda m, args, out: norms.append((args[0].dtype, out.dtype)))
    assert not backend.autocast().__enter__()  # a null context

    before = {n: p.detach().clone() for n, p in masters.named_parameters()}
    loss, norm, *_ = pure.train_step()
    assert norms and set(norms) == {(torch.bfloat16, torch.bfloat16)}, norms
    assert all(p.grad is None for p in twin.parameters()) and all(
        p.grad is None for p in masters.parameters()
    )
    moved = [n for n, p in masters.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before), set(before) - set(moved)
    for low, master in zip(twin.parameters(), masters.parameters()):
        assert torch.equal(low, master.to(torch.bfloat16))  # the stepped masters, copied back
    state = backend.optimizer.state[next(masters.parameters())]
    assert state["exp_avg"].dtype == torch.float32

    # The same first step in fp32 (the same weights, no dropout): the same loss and gradient norm, to bf16's
    # precision.
    torch.manual_seed(0)
    full = recipe_trainer("mlm_nsp", tmp_path / "fp32", "cpu", *options, "--precision", "fp32")
    loss32, norm32, *_ = full.train_step()
    assert abs(loss.item() - loss32.item()) < 0.002 * loss32.item(), (loss.item(), loss32.item())
    assert abs(norm.item() - norm32.item()) < 0.01 * norm32.item(), (norm.item(), norm32.item())


def pure_backend(model, rank: int = 0, world: int = 1, **adamw):
    """The ddp backend under bf16-pure around `model`, as a recipe sets it up (AdamW, a constant schedule)."""
    from recipebox.launch.backends import BackendSettings, DDPBackend
    from recipebox.launch.runtime import Runtime

    backend = DDPBackend(Runtime(rank=rank, world_size=world), BackendSettings(precision="bf16-pure"))
    backend.setup(
        model,
        lambda m: torch.optim.AdamW(m.parameters(), **adamw),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0),
    )
    return backend


class Rotary(torch.nn.Module):
    """A layer with a float buffer, as rotary frequencies are: bf16 would round them."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(4) / 4))

    def forward(self, x):
        return self.proj(x) * self.inv_freq


def test_masters_are_fp32_whatever_the_model_was_loaded_in_and_buffers_keep_their_dtype():
    """A --model saved in bf16 loads in bf16 (transformers' dtype "auto"): its masters are fp32 all the same.
    Float buffers stay as they are in the twin, and a checkpoint's buffers reach it on load."""
    model = Rotary()
    model.proj.to(torch.bfloat16)  # weights loaded in bf16, the buffer in fp32 as a model keeps it
    backend = pure_backend(model)
    assert {p.dtype for p in backend.raw_model.parameters()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32 and torch.equal(
        model.inv_freq, 1.0 / 10000 ** (torch.arange(4) / 4)
    )
    backend.raw_model.inv_freq.fill_(2.0)  # as a checkpoint's load leaves it
    backend.refresh_twin(buffers=True)
    assert torch.equal(model.inv_freq, torch.full((4,), 2.0))


class OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class Strided(torch.nn.Module):
    """A column-major parameter (strides (1, 8)) among row-major ones, and a layer no forward reaches."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(8, 8)
        self.cols = torch.nn.Parameter(torch.randn(5, 8).t())
        self.unused = torch.nn.Linear(8, 2)

    def forward(self, x):
        return (self.used(x) @ self.cols).float().square().sum()


def test_gradients_reach_the_masters_in_one_copy_and_an_unused_parameter_gets_none():
    """The twin's bf16 gradients become fp32 ones in one foreach copy (not a cast per parameter), exactly
    their values and laid out as their masters (fused AdamW wants a gradient's strides to be its
    parameter's); a parameter the forward never reached gets no gradient, so clipping and AdamW leave it as
    they would without the twin."""
    torch.manual_seed(0)
    model = Strided()
    backend = pure_backend(model, lr=0.1, fused=True)
    assert model.cols.stride() == (1, 8) and backend.raw_model.cols.stride() == (1, 8)
    backend.backward(model(torch.randn(4, 8, dtype=torch.bfloat16)))
    twin_grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    assert {n for n, g in twin_grads.items() if g is None} == {"unused.weight", "unused.bias"}
    with OpNames() as ops:
        backend._grads_to_masters()
    assert ops.names.count("_foreach_copy_") == 1 and "_to_copy" not in ops.names, ops.names
    masters = dict(backend.raw_model.named_parameters())
    for name, master in masters.items():
        if twin_grads[name] is None:
            assert master.grad is None
        else:
            assert master.grad.dtype == torch.float32 and torch.equal(master.grad, twin_grads[name].float())
            assert master.grad.stride() == master.stride(), name
    assert all(p.grad is None for p in model.parameters())
    unused_before = {n: masters[n].detach().clone() for n in ("unused.weight", "unused.bias")}
    backend.step(max_grad_norm=1.0)
    assert all(torch.equal(masters[n], before) for n, before in unused_before.items())
    assert all(p.grad is None for p in masters.values())


class Accumulating(torch.nn.Module):
    """The used weight's gradient is the row given, exactly, and so is the column-major `cols`' (as 64 x 64,
    strides (1, 64)); the "early" layer (when there is one) is reached only when asked."""

    def __init__(self, early: bool):
        super().__init__()
        self.used = torch.nn.Linear(4096, 1, bias=False)
        self.cols = torch.nn.Parameter(torch.zeros(64, 64).t())
        self.early = torch.nn.Linear(4, 1) if early else None

    def forward(self, row, reach_early=False):
        out = self.used(row.unsqueeze(0)).float().sum() + (self.cols * row.view(64, 64)).float().sum()
        if reach_early:
            out = out + self.early(torch.ones(1, 4, dtype=row.dtype)).float().sum()
        return out


def _micro_steps(backend, rows: torch.Tensor) -> None:
    """One micro-step per row, the last one synchronising; the first also reaches the early layer, if any."""
    early = backend.compute_model.early is not None
    for i, row in enumerate(rows):
        with backend.accumulating(sync=i == len(rows) - 1):
            backend.backward(backend.model(row, reach_early=early and i == 0))


def _reduce_three_ranks(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3)
    model = Accumulating(early=False)  # DDP wants every parameter in every synchronising backward
    backend = pure_backend(model, rank, 3)
    _micro_steps(backend, _rank_gradients()[rank])
    if rank == 0:
        torch.save(torch.stack([model.used.weight.grad.squeeze(0), model.cols.grad.flatten()]), out)
    backend.close()  # the DDP wrapper goes while the group lives (its reducer can hang gloo at exit)
    dist.destroy_process_group()


def _rank_gradients() -> torch.Tensor:
    """Three ranks' bf16 gradients over two micro-steps each: one large, the rest small, the case where
    rounding at each step of a sum loses the small ones."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(4096, generator=gen)
    small = big * 0.004 * torch.rand(5, 4096, generator=gen)
    return torch.stack([big, *small]).to(torch.bfloat16).view(3, 2, 4096)


def test_micro_steps_add_up_in_fp32_on_one_process():
    """With accumulation the twin's bf16 gradients are summed in fp32 across micro-steps (held as fp32 sums
    until the step), not added in bf16 at each: the masters get the exact fp32 sum. A parameter that only
    an earlier micro-step reached keeps its gradient; one never reached gets none."""
    torch.manual_seed(0)
    model = Accumulating(early=True)
    backend = pure_backend(model)
    rows = _rank_gradients().view(6, 4096)
    _micro_steps(backend, rows)
    backend._grads_to_masters()
    used, early_weight, early_bias = (dict(backend.raw_model.named_parameters())[n] for n in
                                      ("used.weight", "early.weight", "early.bias"))  # fmt: skip
    assert torch.equal(used.grad.squeeze(0), rows.float().sum(0))
    cols = backend.raw_model.cols
    assert cols.grad.stride() == cols.stride() == (1, 64)
    assert torch.equal(cols.grad, rows.float().sum(0).view(64, 64))
    in_bf16 = rows[0]
    for row in rows[1:]:
        in_bf16 = in_bf16 + row
    assert (in_bf16.float() != used.grad.squeeze(0)).sum() > 100
    assert torch.equal(early_weight.grad, torch.ones(1, 4)) and torch.equal(early_bias.grad, torch.ones(1))
    assert not backend.earlier and all(p.grad is None for p in model.parameters())


def test_ranks_and_micro_steps_add_up_in_fp32_rounded_once(tmp_path):
    """Under DDP the twin's bf16 gradients, with the fp32 sums of a step's earlier micro-steps, are averaged
    across ranks in fp32 and rounded to bf16 once (FSDP2 here reduces in fp32 too), not divided and summed in
    bf16: on 3 ranks (gloo, in-process workers) of 2 micro-steps each, the averaged gradient is the fp32
    mean rounded, where bf16 arithmetic would differ in many elements."""
    import torch.multiprocessing as mp

    out = tmp_path / "grad.pt"
    ranks = mp.start_processes(
        _reduce_three_ranks, args=(str(tmp_path / "store"), str(out)), nprocs=3, join=False
    )
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=5):  # True once all have exited; raises if one failed
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            pytest.fail("the 3 ranks did not finish within 120 s")
    grads = _rank_gradients()
    expected = (grads.float().sum((0, 1)) / 3).to(torch.bfloat16)
    per_rank = grads[:, 0] + grads[:, 1]  # bf16 at every step, as without the fp32 sums and hook
    in_bf16 = (per_rank[0] / 3 + per_rank[1] / 3) + per_rank[2] / 3
    ulp = torch.ldexp(torch.ones(4096), torch.frexp(expected.float())[1] - 8)
    for got in torch.load(out, weights_only=True):  # the row-major weight's, then the column-major one's
        assert got.dtype == torch.bfloat16
        # The ranks add in gloo's order, not this one: an fp32 sum can land on the other side of a bf16
        # rounding midpoint, one unit in the last place apart, in an element or two of 4096.
        off = got != expected
        assert off.sum() <= 3, off.sum()
        assert torch.all((got.float() - expected.float()).abs()[off] <= ulp[off])
        assert (in_bf16 != got).sum() > 100


def test_the_pure_step_reads_nothing_from_the_device(tmp_path, tokenizer_dir):
    """The gradients' move to the masters and the copy back are device work only: no value comes back to the
    host inside a step (test_host_sync.py's counter), with accumulation over two micro-steps."""
    options = ("--tokenizer", str(tokenizer_dir), "--grad-accum", "2", "--precision", "bf16-pure")
    assert not count_step_reads(recipe_trainer("mlm_nsp", tmp_path, "cpu", *options), steps=2)


@pytest.mark.parametrize(
    "name", ["text_classification", "ner", "qa", "causal_lm", "summarization", "asr_ctc"]
)
def test_every_recipe_trains_and_evaluates_on_the_twin(name, tmp_path):
    """The task's own references (summarization's output head, causal_lm's config, asr_ctc's audio values)
    are the twin's: each recipe trains two steps and evaluates (generation included) in bf16."""
    trainer = recipe_trainer(name, tmp_path, "cpu", "--precision", "bf16-pure")
    assert {p.dtype for p in trainer.task.trained.parameters()} == {torch.bfloat16}
    losses = [trainer.train_step()[0].item() for _ in range(2)]
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval/loss"]) and metrics["eval/loss"] > 0, metrics


def test_two_ranks_agree_resume_exactly_and_save_fp32(tmp_path, tokenizer_dir):
    """DDP on 2 ranks, 2 micro-steps a step (summed in fp32, averaged across ranks in fp32 by the comm
    hook, over gloo): the replicas' weights agree (--check-replicas),
    the last checkpoint lost, the same command resumes and logs step 3 again bit for bit, and what is saved
    and exported is fp32."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    out = tmp_path / "run"
    flags = ["--precision", "bf16-pure", "--batch-size", "8", "--grad-accum", "2", "--save-every", "1"]
    cmd = recipe_runs.command(out, tokenizer_dir, *flags, "--max-steps", "3", nproc=2)
    logged = recipe_runs.lose_last_checkpoint_then_rerun(cmd, out)
    losses = [r["train/loss"] for r in logged]
    assert all(0 < x < 20 for x in losses), losses
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    sums = [r["replica_param_sums"] for r in records if "replica_param_sums" in r]
    assert sums and all(len(set(s)) == 1 for s in sums), sums
    saved = FileSystemReader(out / "checkpoints" / "step-000003" / "state").read_metadata()
    weights = {k: m for k, m in saved.state_dict_metadata.items() if k.startswith("model.")}
    assert weights and {m.properties.dtype for m in weights.values()} == {torch.float32}
    exported = load_file(out / "export" / "model.safetensors")
    assert exported and {t.dtype for t in exported.values()} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pure_step_on_cuda_never_synchronises(tmp_path, tokenizer_dir):
    """On a GPU, torch's sync detection in "error" mode around bf16-pure steps of full rows (accumulating
    over two micro-steps): the gradients' move to the masters, clipping, AdamW and the copy back never wait."""
    options = ("--tokenizer", str(tokenizer_dir), "--grad-accum", "2", "--max-length", "16")
    trainer = recipe_trainer("mlm_nsp", tmp_path, "cuda", *options, "--precision", "bf16-pure")
    assert {p.dtype for p in trainer.backend.compute_model.parameters()} == {torch.bfloat16}
    steps_under_sync_detection(trainer, "error")
    torch.cuda.synchronize()
    trainer.backend.close()
