"""Training and measuring a classifier (a model rewritten by compiler/classify_head.py, called as
`model(tokens, lengths) -> class logits`): epochs of shuffled batches, cross-entropy, AdamW with
warm-up + cosine (train.py's optimizer, schedule and autocast), accuracy and confusion matrices.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmspec.runtime.atomic import atomic_file, write_text_atomically
from lmspec.runtime.distributed.device import to_device
from lmspec.runtime.finetune.classify_data import make_batch
from lmspec.runtime.finetune.steps import loss_scaler, read_losses, scheduled_lr, update
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.steps import autocast, make_optimizer
from lmspec.runtime.train.throughput import peak_memory
from lmspec.runtime.train.watch import RunLog

CONFUSION_FILE = "confusion.json"
CONFUSION_PLOT = "confusion.png"


@dataclass
class Encoded:
    """One split: token ids per text, and class indices."""
    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def train_classifier(model: torch.nn.Module, train: Encoded, val: Encoded, cfg: TrainConfig, epochs: int,
                     pad_id: int, run_dir: Path, progress: bool = True, log_to: str = "none") -> list[dict]:
    """Train in place for `epochs` epochs (cfg.steps must be epochs * steps_per_epoch); returns one
    record per epoch (loss, train and validation accuracy), also appended to RUN/metrics.jsonl (and,
    with log_to="tensorboard", to TensorBoard's event files in RUN/tensorboard)."""
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    scaler = loss_scaler(cfg, device)
    log = RunLog.fresh(run_dir, log_to, panels=None)  # a record per epoch is no curve: confusion.png instead
    order_rng = random.Random(cfg.seed)
    records, step, start = [], 0, time.time()
    bar = tqdm(total=cfg.steps, disable=not progress, file=sys.stderr, desc="finetune", unit="step")
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            order = list(range(len(train)))
            order_rng.shuffle(order)
            # the epoch's losses and gradient norms stay on the device until its end
            losses, norms, first_step = [], [], step + 1
            epoch_started, epoch_tokens = time.perf_counter(), 0
            for first in range(0, len(order), cfg.batch):
                rows = order[first:first + cfg.batch]
                tokens, lengths = make_batch([train.ids[i] for i in rows], pad_id)
                targets = to_device(torch.tensor([train.labels[i] for i in rows]), device)
                scheduled_lr(optimizer, cfg, step)
                with autocast(device, cfg.precision):
                    logits = model(to_device(tokens, device), to_device(lengths, device))
                step += 1
                epoch_tokens += int(lengths.sum())  # the texts, not their padding
                loss, norm = update(model, optimizer, F.cross_entropy(logits.float(), targets), cfg, scaler)
                losses.append(loss)
                norms.append(norm)
                bar.update(1)
            losses = read_losses(losses, first_step, norms, scaler.is_enabled())
            record = {"step": step, "epoch": epoch, "loss": sum(losses) / len(losses),
                      "tokens_per_s": epoch_tokens / max(time.perf_counter() - epoch_started, 1e-9),
                      "peak_memory_bytes": peak_memory(device),
                      "val_accuracy": (accuracy(predict(model, val.ids, cfg.batch, pad_id), val.labels)
                                       if len(val) else None),
                      "elapsed": time.time() - start}
            log.append(record)
            records.append(record)
            accuracy_read = record["val_accuracy"]
            val_text = f", validation accuracy {accuracy_read:.2%}" if accuracy_read is not None else ""
            bar.write(f"epoch {epoch}: loss {record['loss']:.4f}{val_text}", file=sys.stdout)
    finally:  # the bar ends before an error is printed, so that the error is the last line
        bar.close()
        log.close()
    return records


def predict(model: torch.nn.Module, ids: list[list[int]], batch: int, pad_id: int) -> torch.Tensor:
    """Class probabilities [len(ids), classes], in eval mode; texts of like length share a batch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[torch.Tensor | None] = [None] * len(ids)
    try:
        with torch.no_grad():
            for first in range(0, len(order), batch):
                rows = order[first:first + batch]
                tokens, lengths = make_batch([ids[i] for i in rows], pad_id)
                logits = model(to_device(tokens, device), to_device(lengths, device))
                probs = torch.softmax(logits.float(), dim=-1).cpu()  # kept per text, on the host
                for row, p in zip(rows, probs):
                    out[row] = p
    finally:
        model.train(was_training)
    return torch.stack(out) if out else torch.empty(0)


def score_split(model: torch.nn.Module, part: Encoded, classes: int, batch: int, pad_id: int) -> dict:
    """{"count", "accuracy" (None for no texts), "matrix"}: one split as confusion.json records it."""
    probs = predict(model, part.ids, batch, pad_id)
    return {"count": len(part), "accuracy": accuracy(probs, part.labels) if len(part) else None,
            "matrix": confusion_matrix(probs, part.labels, classes)}


def accuracy(probs: torch.Tensor, labels: list[int]) -> float:
    # counted in integers: a float32 mean would write 0.44999998807907104 for 18 of 40 into the JSON
    return int((probs.argmax(-1) == torch.tensor(labels, device=probs.device)).sum()) / len(labels)


def confusion_matrix(probs: torch.Tensor, labels: list[int], classes: int) -> list[list[int]]:
    """matrix[true][predicted]: how many texts of each class were predicted as each class."""
    matrix = [[0] * classes for _ in range(classes)]
    if not labels:  # an empty split (a small --limit) has no class axis to take the argmax over
        return matrix
    for truth, guess in zip(labels, probs.argmax(-1).tolist()):
        matrix[truth][guess] += 1
    return matrix


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    """The matrix as a text table: rows the true class, columns the predicted one."""
    width = max(8, *(len(n) for n in labels), *(len(str(v)) for row in matrix for v in row))
    lines = [" " * width + "  predicted: " + " ".join(f"{n:>{width}}" for n in labels)]
    for name, row in zip(labels, matrix):
        lines.append(f"{'true ' + name:>{width + 13}} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def write_confusion(run_dir: Path, labels: list[str], splits: dict[str, dict]) -> Path:
    """RUN/confusion.json: {"labels": [...], "splits": {name: {"count", "accuracy", "matrix"}}} (rows
    the true class, columns the predicted), and RUN/confusion.png of the test split when it has texts."""
    path = Path(run_dir) / CONFUSION_FILE
    write_text_atomically(path, json.dumps({"labels": labels, "rows": "true", "columns": "predicted",
                                            "splits": splits}, indent=2) + "\n")
    shown = next((name for name in ("test", "validation", "train") if splits.get(name, {}).get("count")), None)
    if shown is not None:
        _plot_confusion(Path(run_dir) / CONFUSION_PLOT, splits[shown]["matrix"], labels, shown)
    return path


def _plot_confusion(path: Path, matrix: list[list[int]], labels: list[str], split: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{split} split")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
