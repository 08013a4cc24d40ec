"""Metrics go to `metrics.jsonl` in the run folder always, and to Weights & Biases from rank 0.

W&B runs offline (files under the run folder, no network) unless the user set WANDB_API_KEY or WANDB_MODE,
so a laptop or an air-gapped node never hangs on a login.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        use_wandb: bool,
        project: str,
        name: str,
        config: dict[str, Any],
        run_id: str | None = None,
    ):
        self.enabled = enabled  # only rank 0 writes
        self.run = None
        self.run_id = run_id
        self._file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        if use_wandb:
            os.environ.setdefault("WANDB_SILENT", "true")
            if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
                os.environ["WANDB_MODE"] = "offline"
            import wandb

            self.run = wandb.init(
                project=project,
                name=name,
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow",
            )
            self.run_id = self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log({k: self._wandb_value(v) for k, v in metrics.items()}, step=step)

    @staticmethod
    def _wandb_value(value):
        """Rows of text ({column: text}, e.g. a causal LM's {prompt, continuation}) become a W&B table."""
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            import wandb

            columns = list(value[0])
            return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in value])
        return value

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(scalars(metrics))

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics dict (what a console line, a summary or a model card shows); text rows such as
    generated samples stay in metrics.jsonl and W&B."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
