"""The training log: one JSON object per line (step, loss, lr, tokens_per_s, tokens, elapsed, val_loss, ...),
and the loss-curve plot drawn from it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmspec.runtime.atomic import atomic_file, write_text_atomically

METRICS_FILE = "metrics.jsonl"  # in a run directory: the log
PLOT_FILE = "loss.png"  # and its plot


class MetricsLog:
    """Append-only JSONL log. Each record is written and flushed as one line, so a killed run
    leaves at most one partial last line, which readers skip."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def fresh(cls, path: str | os.PathLike) -> MetricsLog:
        """A new, empty log (a previous one at `path` is replaced)."""
        log = cls(path)
        write_text_atomically(log.path, "")
        return log

    @classmethod
    def resumed(cls, path: str | os.PathLike, step: int) -> MetricsLog:
        """The log of a run resumed at `step`: records after it are dropped, because the steps after
        the checkpoint are about to be trained again."""
        log = cls(path)
        kept = [r for r in read_metrics(log.path) if r["step"] <= step] if log.path.exists() else []
        write_text_atomically(log.path, "".join(json.dumps(r) + "\n" for r in kept))
        return log

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL log, skipping lines that are not complete records."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


@dataclass(frozen=True)
class Panel:
    """One plot of a metrics log: a training series and its validation twin against step."""
    key: str
    val_key: str
    ylabel: str


LOSS_PANEL = Panel("loss", "val_loss", "cross-entropy loss (nats/token)")


def plot_loss_curve(jsonl_path: str | os.PathLike, png_path: str | os.PathLike,
                    panels: tuple[Panel, ...] = (LOSS_PANEL,)) -> None:
    """Training and validation series against step, one panel above the other, as a PNG (replaced
    atomically): the loss by default."""
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(jsonl_path)
    fig = Figure(figsize=(8, 5 if len(panels) == 1 else 3.2 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        train = [(r["step"], r[panel.key]) for r in records if r.get(panel.key) is not None]
        val = [(r["step"], r[panel.val_key]) for r in records if r.get(panel.val_key) is not None]
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1.0)
        if val:
            ax.plot(*zip(*val), label="validation", marker="o", markersize=3, linewidth=1.5)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if train or val:
            ax.legend()
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    with atomic_file(png_path) as f:
        fig.savefig(f, format="png")
