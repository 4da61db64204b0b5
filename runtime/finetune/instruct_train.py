"""The instruction-tuning loop: epochs of length-bucketed batches, cross-entropy on the answer
tokens only, AdamW with warm-up + cosine (train.py's optimizer, schedule and autocast), validation
loss at step 0, every `eval_every` steps and at the end, one checkpoint at the end.

Unlike `lmspec train` it does not resume: a finetuning run is short, and its data order is a
function of (seed, epoch) alone, so a stopped run is simply run again.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmspec.runtime.checkpoint.store import save_checkpoint
from lmspec.runtime.data.chat_template import builtin_chat_template
from lmspec.runtime.distributed.device import to_device
from lmspec.runtime.finetune.instruct_data import IGNORE, Example, collate, length_buckets
from lmspec.runtime.finetune.lora import trainable_weights
from lmspec.runtime.finetune.steps import StepRecords, loss_scaler, scheduled_lr, steps_per_epoch, update
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.metrics import METRICS_FILE, PLOT_FILE, plot_loss_curve
from lmspec.runtime.train.steps import autocast, make_optimizer
from lmspec.runtime.train.watch import RunLog


@dataclass
class InstructSetup:
    """What the run needs besides its TrainConfig (of which `steps` is filled in from the epochs)."""
    template: str
    pad_id: int
    epochs: int = 2
    trainable_only: bool = False  # save only the parameters that train (LoRA adapters)
    extra: dict | None = None  # more facts for the checkpoint's train_config (data, split, lora)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the targets that are not IGNORE: the answers and their end tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


def evaluate_examples(model: torch.nn.Module, examples: list[Example], batch: int, pad_id: int,
                      precision: str = "fp32") -> float:
    """Mean loss per trained token over all of `examples` (batched by length, in eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, count = [], 0
    try:
        with torch.no_grad(), autocast(device, precision):
            for indices in length_buckets([len(e) for e in examples], batch, seed=0, epoch=0):
                x, y = collate([examples[i] for i in indices], pad_id)
                count += int((y != IGNORE).sum())  # counted on the host, before the copy
                sums.append(masked_loss(model(to_device(x, device)), to_device(y, device), reduction="sum"))
    finally:
        model.train(was_training)
    # read off the device once, then summed in order as one read per batch did
    return sum(torch.stack(sums).tolist()) / max(count, 1) if sums else 0.0


def finetune_instruct(model: torch.nn.Module, tokenizer, train_set: list[Example], val_set: list[Example],
                      cfg: TrainConfig, setup: InstructSetup, run_dir, spec: dict, progress: bool = True,
                      log_to: str = "none") -> dict:
    """Train, writing metrics.jsonl, loss.png (redrawn at each evaluation), TensorBoard's event files with
    log_to="tensorboard", and the final checkpoint under `run_dir`; returns a summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    per_epoch = steps_per_epoch(len(train_set), cfg.batch)
    optimizer = make_optimizer(model, cfg)
    scaler = loss_scaler(cfg, device)
    torch.manual_seed(cfg.seed)  # dropout
    log = RunLog.fresh(run_dir, log_to)
    lengths = [len(e) for e in train_set]
    start = time.perf_counter()
    summary = {"loss": None, "val_loss": None, "best_val_loss": None}

    def validate(step: int, recent: list[float] = ()) -> dict:
        """The validation record of this step (empty without a validation set), printed with the
        mean of the `recent` steps' train losses."""
        if not val_set:
            return {}
        val_loss = evaluate_examples(model, val_set, cfg.batch, setup.pad_id, cfg.precision)
        summary["val_loss"] = val_loss
        summary["best_val_loss"] = min(val_loss, summary["best_val_loss"] or val_loss)
        shown = f"train loss {sum(recent) / len(recent):.4f}, " if recent else ""
        bar.write(f"step {step} (epoch {step / per_epoch:.2f}): {shown}val loss {val_loss:.4f}")
        sys.stdout.flush()
        return {"val_loss": val_loss}

    model.train()
    bar = tqdm(total=cfg.steps, unit="step", desc="finetune", disable=None if progress else True, dynamic_ncols=True)
    step, tokens = 0, 0
    try:
        log.append({"step": 0, "epoch": 0.0, **validate(0)}, redraw=True)
        pending = StepRecords(log, device, scaler.is_enabled())  # its clock starts after step 0's validation
        for epoch in range(setup.epochs):
            for indices in length_buckets(lengths, cfg.batch, cfg.seed, epoch):
                lr = scheduled_lr(optimizer, cfg, step)
                x, y = collate([train_set[i] for i in indices], setup.pad_id)
                with autocast(device, cfg.precision):
                    logits = model(to_device(x, device))
                step += 1
                tokens += sum(lengths[i] - 1 for i in indices)  # the inputs, not their padding
                loss, grad_norm = update(model, optimizer, masked_loss(logits, to_device(y, device)), cfg, scaler)
                pending.add({"step": step, "epoch": step / per_epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                             "tokens": tokens, "elapsed": time.perf_counter() - start})
                bar.update(1)
                if written := pending.end_step(step, cfg, bar, lambda s: validate(s, pending.losses_since_evaluation)):
                    summary["loss"] = written[-1]["loss"]
    finally:
        bar.close()
        log.close()
    model.eval()

    trained = trainable_weights(model) if setup.trainable_only else None
    train_config = {"finetune": "instruct", "template": setup.template, "epochs": setup.epochs,
                    "chat_template": builtin_chat_template(setup.template, tokenizer),  # what chat and serve render
                    "train": cfg.to_dict()} | (setup.extra or {})
    checkpoint = save_checkpoint(run_dir, step=step, model=None if setup.trainable_only else model, optimizer=None,
                                 rng=None, train_config=train_config, tokenizer=tokenizer.to_json(), spec=spec,
                                 metrics={k: v for k, v in summary.items() if v is not None},
                                 keep=cfg.keep, weights=trained)
    plot_loss_curve(run_dir / METRICS_FILE, run_dir / PLOT_FILE)
    return summary | {"steps": step, "checkpoint": str(checkpoint), "metrics": str(run_dir / METRICS_FILE),
                      "elapsed": time.perf_counter() - start}
