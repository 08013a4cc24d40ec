"""Training curves for the model card: a small PNG drawn from a run's metrics.jsonl.

One panel each for the training loss, the learning rate and every headline evaluation metric ("eval/accuracy",
not "eval/f1/PER"); a test metric shares its evaluation metric's panel, as points (it is usually logged once,
at the end). The figure is drawn with matplotlib's Agg canvas directly (no pyplot, no global state).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TRAIN = {"train/loss": "train loss", "train/lr": "learning rate"}
SPLITS = ("eval", "test")
COUNTERS = {"examples", "sentences", "samples", "tokens", "steps", "runtime", "total"}  # sizes, not scores
MAX_PANELS = 8
COLUMNS = 4
PANEL_INCHES = (2.6, 1.9)  # width, height of one panel
DPI = 80


def read_curves(metrics_file: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of every finite number in metrics.jsonl; a step logged again (a resumed run
    appends) keeps its later value, and a line that is not a JSON object (a crash mid-write) is skipped."""
    curves: dict[str, dict[int, float]] = {}
    text = Path(metrics_file).read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                curves.setdefault(key, {})[record["step"]] = float(value)
    return curves


def panels(curves: dict[str, dict[int, float]]) -> list[tuple[str, dict[str, dict[int, float]]]]:
    """[(title, {series label: {step: value}})]: training loss, learning rate, then each headline metric
    (eval and test together) in the order the run first logged it; at most MAX_PANELS."""
    out = [(title, {key: curves[key]}) for key, title in TRAIN.items() if key in curves]
    grouped: dict[str, dict[str, dict[int, float]]] = {}
    for key, values in curves.items():
        split, _, name = key.partition("/")
        counter = name.rsplit("_", 1)[-1] in COUNTERS  # "examples", and QA's "total", "HasAns_total", ...
        if split in SPLITS and name and "/" not in name and not counter:
            grouped.setdefault(name, {})[split] = values
    # The loss first, then as logged, with breakdowns by subset last (QA's HasAns_f1, NoAns_exact, ...)
    for name in sorted(grouped, key=lambda name: (name != "loss", name[:1].isupper())):
        series = grouped[name]
        out.append((f"{' & '.join(series)} {name}", series))
    return out[:MAX_PANELS]


def plot_curves(metrics_file: Path, out_png: Path) -> bool:
    """Draws the run's curves into out_png; False, writing nothing, when the file is missing, holds nothing
    to plot, or matplotlib is not installed."""
    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        return False
    chosen = panels(read_curves(metrics_file))
    if not chosen:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:  # an environment without it (.venv-xla) still exports, with a card without curves
        return False

    rows = math.ceil(len(chosen) / COLUMNS)
    cols = math.ceil(len(chosen) / rows)  # 5 panels: 3 + 2, not 4 + 1
    fig = Figure(figsize=(cols * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, (title, series) in zip(axes, chosen):
        for label, values in series.items():
            steps = sorted(values)
            ys = [values[s] for s in steps]
            if label == "test":  # hollow, so an evaluation at the same point shows through
                ax.plot(steps, ys, "o", ms=7, mfc="none", mew=1.5, color="C3", label=label)
            else:  # a dot on each point too: an evaluation logged once is still visible
                ax.plot(steps, ys, marker="o" if len(steps) < 30 else None, ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True, min_n_ticks=1))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(chosen) :]:  # the grid's unused cells
        ax.set_visible(False)
    fig.supxlabel("step", fontsize=8)
    fig.savefig(out_png, dpi=DPI)
    return True
