"""A run where something fails or happens on some ranks only, for tests/test_launch.py: run as `torchrun
--nproc_per_node=2 tests/rank_failures.py OUT FAILURE`. The job must end, with the failure in its output,
instead of leaving the other ranks waiting in a collective.

FAILURE:
- signal_in_eval: rank 0 alone gets SIGUSR1 (a stop) during the first batch of the evaluation after step 1
  of 2, whose validation split is 3 batches on rank 0; every rank must leave it, save step 1 and exit 75.
  `none` then runs the same command to the end.
- build: every rank finds bad input inside `main_process_first` (rank 0 first, then the others), as a
  corpus smaller than one block is found while rank 0 builds the tokenised cache.
- test_split: rank 0 alone fails while it summarises the test evaluation (a full disk while it writes the
  predictions); the other ranks are already waiting for the stop vote that follows it.
- one_row: a training split of one row for two ranks: every rank stops with the same message.
- bad_row: rank 1 alone reads a training row that turns out unreadable at its third read (a clip that no
  longer decodes); rank 0 is already waiting in that step's collective.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from backend_checks import LMTask, tiny_gpt2

from recipebox.data.text import DataError
from recipebox.launch.config import TrainConfig
from recipebox.launch.recipe import run_main, run_recipe


class RowsGoneBad(list):
    """Training rows, the third read of which on rank 1 finds bad input."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        if FAILURE == "bad_row" and os.environ["RANK"] == "1" and self.reads == 3:
            raise DataError(f"{OUT}/clip-{i}.flac: soundfile cannot decode it; replace or remove that row")
        return super().__getitem__(i)


class FailingTask(LMTask):
    evaluated = 0  # batches this rank evaluated

    def evaluate(self, model, batch, outputs, generate):
        self.evaluated += 1
        if FAILURE == "signal_in_eval" and self.evaluated == 1 and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().evaluate(model, batch, outputs, generate)

    def summarize(self, records, means, split):
        if FAILURE == "test_split" and split == "test":
            raise OSError(28, "No space left on device (rank 0 writing the test predictions)")
        return super().summarize(records, means, split)


FAILURE = sys.argv[2] if __name__ == "__main__" else ""
OUT = sys.argv[1] if __name__ == "__main__" else ""


def main() -> int:
    out, failure = Path(sys.argv[1]), FAILURE
    tasks = []

    def build(cfg, rt, run_dir):
        with rt.main_process_first():
            if failure == "build":
                raise DataError(f"{run_dir}/corpus.txt: 10 tokens, fewer than one block of 64")
        task = FailingTask(tiny_gpt2(), seq2seq=False)
        task.splits["test"] = task.splits["validation"]
        if failure == "one_row":
            task.splits["train"] = task.splits["train"][:1]
        task.splits["train"] = RowsGoneBad(task.splits["train"])
        (run_dir / "processor").mkdir(parents=True, exist_ok=True)
        tasks.append(task)
        return task

    cfg = TrainConfig(output_dir=str(out), tracker="none", max_steps=2, batch_size=4, export=False,
                      eval_every=1, eval_batch_size=1)  # fmt: skip
    code = run_recipe(cfg, build, "rank_failures")
    print(f"rank {os.environ['RANK']} evaluated {tasks[0].evaluated} batches" if tasks else "", flush=True)
    return code


if __name__ == "__main__":
    run_main(main)
