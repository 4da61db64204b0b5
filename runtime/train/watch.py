"""What a training loop writes for someone watching it: metrics.jsonl always, TensorBoard's event files
under RUN/tensorboard when asked (`--log tensorboard`), and loss.png redrawn at each evaluation.

    log = RunLog.fresh(run_dir, "tensorboard")        # or RunLog.resumed(run_dir, step, ...)
    log.append(record, redraw=evaluated); ...; log.close()

TensorBoard gets every number of a record under its metrics.jsonl name (loss, val_loss, lr, grad_norm,
tokens_per_s, mfu, peak_memory_bytes, ...) at the record's step. A resumed run's writer starts with
TensorBoard's purge step, the first step it trains again, so the steps the first session logged past
its checkpoint are dropped there as they are from metrics.jsonl.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from lmspec.runtime.errors import UsageError
from lmspec.runtime.train.interrupt import interrupt_after
from lmspec.runtime.train.metrics import LOSS_PANEL, METRICS_FILE, PLOT_FILE, MetricsLog, Panel, plot_loss_curve

LOGS = ("none", "tensorboard")  # --log's choices
TENSORBOARD_DIR = "tensorboard"  # in a run directory, beside metrics.jsonl
TENSORBOARD_MISSING = "--log tensorboard needs the tensorboard package: pip install tensorboard"
# Seconds between the writer's flushes: a watched run shows up within them, not minutes later (torch: 120).
FLUSH_SECONDS = 10


def require_tensorboard():
    """torch's SummaryWriter, or a UsageError saying what to install; imported only when asked, so a
    run without --log tensorboard never needs the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(TENSORBOARD_MISSING) from None
    return SummaryWriter


def check_log(log: str) -> None:
    """--log's value, and what it needs installed, checked before any work starts."""
    if log not in LOGS:
        raise UsageError(f"--log must be one of {', '.join(LOGS)}, got {log!r}")
    if log == "tensorboard":
        require_tensorboard()


class TensorBoardLog:
    """Metrics records as TensorBoard scalars in one directory; `purge_step` is the first step this
    writer logs, and TensorBoard hides what earlier writers there logged from it on."""

    def __init__(self, directory: str | os.PathLike, purge_step: int):
        writer = require_tensorboard()
        self.writer = writer(log_dir=str(directory), purge_step=purge_step, flush_secs=FLUSH_SECONDS)

    def append(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            # bool is an int too, but no curve; None is a value that was not measured (fp16's skipped step)
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """A run's metrics.jsonl, its TensorBoard scalars (or none), and its loss plot (or none), written
    together; only the process that writes the run (rank 0) holds one."""

    def __init__(self, run_dir: str | os.PathLike, metrics: MetricsLog, tensorboard: TensorBoardLog | None,
                 panels: tuple[Panel, ...] | None):
        self.run_dir = Path(run_dir)
        self.metrics, self.tensorboard, self.panels = metrics, tensorboard, panels

    @classmethod
    def fresh(cls, run_dir: str | os.PathLike, log: str = "none",
              panels: tuple[Panel, ...] | None = (LOSS_PANEL,)) -> RunLog:
        """A new log; TensorBoard purges from step 0, so a directory reused after a run that died before
        its first checkpoint shows this run alone."""
        run_dir = Path(run_dir)
        metrics = MetricsLog.fresh(run_dir / METRICS_FILE)
        return cls(run_dir, metrics, _tensorboard(run_dir, log, 0), panels)

    @classmethod
    def resumed(cls, run_dir: str | os.PathLike, step: int, log: str = "none",
                panels: tuple[Panel, ...] | None = (LOSS_PANEL,)) -> RunLog:
        """The log of a run resumed at `step`: what was logged after it is dropped (trained again)."""
        run_dir = Path(run_dir)
        metrics = MetricsLog.resumed(run_dir / METRICS_FILE, step)
        return cls(run_dir, metrics, _tensorboard(run_dir, log, step + 1), panels)

    def append(self, record: dict, redraw: bool = False) -> None:
        """One record into each log; with `redraw` (an evaluation) the plot is drawn again and TensorBoard
        flushed, so that a run stopped at any point has both up to its last evaluation. A Ctrl-C while
        they are written is raised once they are whole (runtime/train/interrupt.py)."""
        with interrupt_after():
            self.metrics.append(record)
            if self.tensorboard is not None:
                self.tensorboard.append(record)
            if redraw:
                self.draw()
                if self.tensorboard is not None:
                    self.tensorboard.flush()

    def draw(self) -> None:
        if self.panels is not None:
            plot_loss_curve(self.metrics.path, self.run_dir / PLOT_FILE, self.panels)

    def close(self) -> None:
        if self.tensorboard is not None:
            with interrupt_after():
                self.tensorboard.close()


def _tensorboard(run_dir: Path, log: str, purge_step: int) -> TensorBoardLog | None:
    check_log(log)
    return TensorBoardLog(run_dir / TENSORBOARD_DIR, purge_step) if log == "tensorboard" else None
