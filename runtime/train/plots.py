"""Runs drawn over each other for `lmspec plot`: the loss against steps or tokens trained (training as a
line, validation as markers of the same colour), the learning rate in a panel below, each run labelled
by its directory's name.

Tokens trained come from each metrics record's `tokens` (what `lmspec train` logs: step x batch x seq x
grad_accum x data-parallel ranks); a record without one, from a run logged before records carried it,
is placed at step x the tokens per step its latest checkpoint records. A finetuning run's steps hold
examples of any length, so it has no tokens axis and plots against steps only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmspec.runtime.atomic import atomic_file
from lmspec.runtime.checkpoint.layout import META_FILE, find_checkpoint
from lmspec.runtime.errors import UsageError
from lmspec.runtime.train.metrics import METRICS_FILE, read_metrics

AXES = ("steps", "tokens")  # --x


@dataclass
class RunMetrics:
    """One run's records, and what it is called in the legend."""
    path: Path
    label: str
    records: list[dict]

    def xs(self, axis: str) -> list[float]:
        """Each record's place on the x axis: its step, or the tokens trained by then."""
        if axis == "steps":
            return [r["step"] for r in self.records]
        per_step = None
        xs = []
        for r in self.records:
            if isinstance(r.get("tokens"), (int, float)):
                xs.append(r["tokens"])
                continue
            if per_step is None:
                per_step = _tokens_per_step(self.path)
            xs.append(r["step"] * per_step)
        return xs


def read_runs(paths: list[str | os.PathLike]) -> list[RunMetrics]:
    """The runs at `paths`, each a run directory holding metrics.jsonl with at least one record; a
    name two runs share is replaced by the paths as given."""
    runs = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise UsageError(f"{given}: no such run directory" if not path.exists() else
                             f"{given}: not a run directory (give the directory that holds {METRICS_FILE})")
        if not (path / METRICS_FILE).is_file():
            raise UsageError(f"{given}: not a run directory (no {METRICS_FILE} in it)")
        records = read_metrics(path / METRICS_FILE)
        if not records:
            raise UsageError(f"{path / METRICS_FILE}: no records yet")
        runs.append(RunMetrics(path, path.resolve().name, records))
    names = [run.label for run in runs]
    for run, given in zip(runs, paths):
        if names.count(run.label) > 1:
            run.label = str(given)
    return runs


def _tokens_per_step(run_dir: Path) -> float:
    """Tokens one step trains, from the run's latest checkpoint (tokens so far / its step)."""
    checkpoint = find_checkpoint(run_dir)
    meta = {}
    if checkpoint is not None and (checkpoint / META_FILE).is_file():
        try:
            meta = json.loads((checkpoint / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
    tokens = (meta.get("metrics") or {}).get("tokens") if isinstance(meta, dict) else None
    step = meta.get("step") if isinstance(meta, dict) else None
    if not (isinstance(tokens, (int, float)) and isinstance(step, int) and step > 0):
        raise UsageError(f"{run_dir}: its records do not say how many tokens a step trains (a finetuning run, "
                         f"or a run with no checkpoint yet); plot it with --x steps")
    return tokens / step


def plot_runs(runs: list[RunMetrics], png_path: str | os.PathLike, axis: str = "steps") -> None:
    """The runs' loss and learning rate against `axis` (steps or tokens) as one PNG, written atomically."""
    if axis not in AXES:
        raise UsageError(f"--x must be one of {', '.join(AXES)}, got {axis!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [(run, run.xs(axis)) for run in runs]  # every run's axis first: a bad one fails before drawing
    fig = Figure(figsize=(9, 7), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    for i, (run, xs) in enumerate(series):
        colour = f"C{i % 10}"
        for ax, key, val_key in ((loss_ax, "loss", "val_loss"), (lr_ax, "lr", None)):
            train = [(x, r[key]) for x, r in zip(xs, run.records) if isinstance(r.get(key), (int, float))]
            if train:
                ax.plot(*zip(*train), color=colour, linewidth=1.0, label=run.label)
            val = [(x, r[val_key]) for x, r in zip(xs, run.records)
                   if val_key and isinstance(r.get(val_key), (int, float))]
            if val:
                ax.plot(*zip(*val), color=colour, linestyle="none", marker="o", markersize=4,
                        markeredgecolor="black", markeredgewidth=0.5, label=f"{run.label} (validation)")
    loss_ax.set_ylabel("loss")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step" if axis == "steps" else "tokens trained")
    for ax in (loss_ax, lr_ax):
        ax.grid(True, alpha=0.3)
    if loss_ax.has_data():
        loss_ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_file(png_path) as f:
        fig.savefig(f, format="png")
