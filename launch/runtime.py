"""Who am I: rank, world size and device, read from torchrun, Slurm (srun) or nothing (one process).

`Runtime.start()` sets up the process group (nccl on CUDA, gloo on CPU) and one seed for every rank
(`seed_ranks` parts them once the model is built); `close()` shuts it down with a barrier first, because a
process that exits with a live gloo group sometimes aborts.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


def _slurm_master_addr() -> str:
    """The first node of this srun step (of the job, outside a step): where rank 0 runs."""
    env = os.environ
    nodelist = (
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    )
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def slurm_port() -> int:
    """One port per job and srun step, so two jobs on a node, or two steps of one job, do not collide; in
    20000-31999, under Linux's ephemeral ports (32768 up), which any connection may hold."""
    env = os.environ
    step = env.get("SLURM_STEP_ID", "0")
    step = int(step) if step.isdigit() and int(step) < 1_000_000 else 0  # the batch shell's is a big marker
    return 20000 + (int(env.get("SLURM_JOB_ID", "0") or 0) + 1009 * step) % 12000


def launched_world_size() -> int:
    """How many processes the launcher started: torchrun's WORLD_SIZE, else srun's SLURM_NTASKS, else 1.
    Read without changing anything, so validation can ask before the process group (read_environment)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env:
        return int(env.get("SLURM_NTASKS", "1"))
    return 1


def read_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else Slurm's (srun), else one process.

    Under srun the variables torch.distributed needs are filled in from Slurm's, so `srun python recipe.py`
    needs no wrapper.
    """
    env, world = os.environ, launched_world_size()
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0))
    if world > 1:  # srun's tasks
        rank, local = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(slurm_port()))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return rank, world, local
    return 0, 1, 0


def bf16_native() -> bool:
    """bf16 in the GPU's hardware (Ampere and later), not emulated: V100/T4 would run it slowly. Where no
    GPU answers (a config built ahead of the run), taken as yes."""
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)


def ignore_signals(names: tuple[str, ...], _worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: the rank's stop signals are the rank's to act on. Slurm signals
    every process of a job step (scancel, preemption), and torch's workers die of SIGTERM, which ended the
    rank with "DataLoader worker ... exited unexpectedly" instead of a save. A worker still ends with its
    rank: it leaves once the rank is gone, or when the rank shuts its loader down."""
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA generators too
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stop_requested: bool = False  # set by SIGTERM; the loop stops at the next step boundary
    host_group: Any = None  # gloo group for host-side votes when the default group is nccl; else None
    stop_signals: tuple[str, ...] = ()  # the signals that ask this rank to stop (`ignore_signals` in workers)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @classmethod
    def start(cls, seed: int, device: str = "auto", stop_signals: str = "SIGTERM") -> Runtime:
        rank, world, local = read_environment()
        if device == "auto":
            # Slurm may bind one GPU per task (--gpus-per-task, --gpu-bind): then each rank sees only its own.
            device = f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        rt = cls(rank=rank, world_size=world, local_rank=local, device=dev)
        # Before the rendezvous, which can wait: a stop signal there is a stop (exit 75), not the default
        # action (SIGUSR1's kills the process).
        rt._install_signal_handlers([s.strip() for s in stop_signals.split(",") if s.strip()])
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(
                backend=backend, rank=rank, world_size=world, device_id=dev if dev.type == "cuda" else None
            )
        if world > 1 and dev.type == "cuda":  # votes on host flags must not wait for the GPU
            rt.host_group = dist.new_group(backend="gloo")
        # The same seed on every rank while the model is built: FSDP2 and XLA replicas keep each rank's own
        # new weights (DDP and DeepSpeed copy rank 0's), so they must be drawn alike. `seed_ranks` parts them.
        seed_everything(seed)
        return rt

    def seed_ranks(self, seed: int) -> None:
        """After the model is built: a seed per rank for the global generators, so dropout differs by rank."""
        seed_everything(seed + self.rank)

    def _install_signal_handlers(self, names: list[str]) -> None:
        self.stop_signals = tuple(names)
        first = []

        def request_stop(signum, _frame):
            # A second signal means "now", unless it is the same stop seen twice: Slurm signals every
            # process of a step and torchrun forwards it again, a moment apart.
            if self.stop_requested and time.monotonic() - first[0] > 5:
                raise KeyboardInterrupt
            if self.stop_requested:
                return
            first.append(time.monotonic())
            self.stop_requested = True
            # Straight to the file: a print() here could re-enter a write that the signal interrupted.
            if self.is_main:
                note = f"received {signal.Signals(signum).name}: stopping at the next step boundary\n"
                with contextlib.suppress(OSError):
                    os.write(1, note.encode())

        for name in names:
            with contextlib.suppress(ValueError):  # not the main thread (e.g. inside a test runner)
                signal.signal(getattr(signal, name), request_stop)

    def requeue_slurm_job(self) -> None:
        """After a preemption save: put this Slurm job back in the queue (rank 0 asks, once)."""
        job = os.environ.get("SLURM_JOB_ID")
        if not self.is_main or not job:
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        self.print(f"requeue of job {job}: " + ("done" if result.returncode == 0 else result.stderr.strip()))

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_process_first(self):
        """Rank 0 runs the block first (e.g. builds a cache), the others follow and reuse it. Rank 0 lets them
        go even when its block fails: they meet the same bad input (the same error, and every rank stops
        together) or go on to a collective that rank 0's exit ends, instead of waiting for it for ever."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank (a stop request seen by one rank stops all).

        A host-side vote (gloo, host memory): the loop asks at every step, and a vote through an nccl tensor
        would make the host wait for every kernel queued before it. One process has no one to ask: its group
        may hold no CPU backend at all (DeepSpeed's own one-rank nccl group on a GPU)."""
        if not self.distributed or self.world_size == 1:
            return flag
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def close(self, clean: bool = True) -> None:
        """Leave the process group; after a failure skip the barrier, which the other ranks may never reach."""
        if self.distributed:
            if clean:
                dist.barrier()
            dist.destroy_process_group()
        sys.stdout.flush()
