"""The steps every finetuning loop shares (classification, instructions, DPO): its TrainConfig from
the command line, the learning rate of a step, one optimizer update, and the per-step records whose
numbers stay on the device until they are read together (a step does not wait for the device)."""
from __future__ import annotations

import math
import time

import torch

from lmspec.runtime.errors import TrainingError
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.divergence import divergence


def steps_per_epoch(n_examples: int, batch: int) -> int:
    return math.ceil(n_examples / batch)


def finetune_config(args, n_train: int, max_length: int, context: int) -> TrainConfig:
    """The TrainConfig of a finetune run on records: `args.epochs` passes over n_train examples in
    batches of args.batch, with the optimiser options of runtime/cli/lora_options.py and a single checkpoint."""
    steps = args.epochs * steps_per_epoch(n_train, args.batch)
    return TrainConfig(steps=steps, batch=args.batch, seq=max_length, lr=args.lr, min_lr=args.min_lr,
                       warmup=min(args.warmup, steps), weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       eval_every=args.eval_every, seed=args.seed, precision=args.precision,
                       schedule=args.schedule, decay_fraction=args.decay_fraction, keep=1).resolved(context)


def scheduled_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    """Set the learning rate of `step` (warm-up, then cfg.schedule over cfg.steps) and return it."""
    lr = cfg.learning_rate(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def loss_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """fp16's loss scaling (a no-op for fp32 and bf16): small gradients would flush to zero in fp16."""
    return torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")


def update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, cfg: TrainConfig,
           scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update from `loss` (backward, gradient clipping, step; through `scaler` under
    fp16, which skips a step whose gradients overflowed); returns the loss and the gradient norm
    before clipping, detached and still on the device: reading them now would make every step wait
    for the device (see StepRecords)."""
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
    else:
        loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
    else:  # measured all the same, for the metrics
        norm = torch.nn.utils.get_total_norm([p.grad for p in trained if p.grad is not None])
    if scaler is not None and scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), norm.detach()


def read_losses(losses: list[torch.Tensor], first_step: int, norms: list[torch.Tensor] = (),
                scaled: bool = False) -> list[float]:
    """Step losses (of steps first_step, first_step + 1, ...) as floats, read with the steps' gradient
    `norms` in one wait for the device; raises TrainingError naming the first step whose loss, or
    gradient norm where no GradScaler (`scaled`) skips its update, is not finite."""
    values = _read([*losses, *norms])
    losses_read, norms_read = values[:len(losses)], values[len(losses):] or [None] * len(losses)
    for step, (loss, norm) in enumerate(zip(losses_read, norms_read), first_step):
        if reason := divergence(step, loss=loss, grad_norm=norm, scaled=scaled):
            raise TrainingError(f"{reason}; try a lower --lr")
    return losses_read


class StepRecords:
    """The metrics records of the steps since they were last read, on their way to the run's log;
    their tensor values (the loss, the gradient norm, a DPO margin) stay on the device until `take`,
    which the loops call every cfg.log_every steps, before a validation and at the last step. Each
    record counts the tokens trained so far ("tokens"); the last one `take` returns also gets the
    tokens per second since the previous `write` and the device's peak memory."""

    def __init__(self, log, device: torch.device, scaled: bool = False):
        self.log, self.device, self.records, self.scaled = log, device, [], scaled  # scaled: fp16's GradScaler
        self.started, self.tokens_before = time.perf_counter(), 0
        self.losses_since_evaluation: list[float] = []

    def add(self, record: dict) -> None:
        """A step's record ("step", "loss" and "tokens" at least); its tensor values are read by `take`."""
        self.records.append(record)

    def take(self) -> list[dict]:
        """The records with every tensor read as a float (one wait for the device), emptied, for the
        loop to complete and `write`. A loss that is not finite: the records before it are written
        and TrainingError names its step."""
        from lmspec.runtime.train.throughput import peak_memory

        records, self.records = self.records, []
        places = [(r, key) for r in records for key, value in r.items() if isinstance(value, torch.Tensor)]
        for (record, key), value in zip(places, _read([record[key] for record, key in places])):
            record[key] = value
        for i, record in enumerate(records):
            if reason := divergence(record["step"], loss=record["loss"], grad_norm=record.get("grad_norm"),
                                    scaled=self.scaled):
                self.write(records[:i])
                raise TrainingError(f"{reason}; try a lower --lr")
            if record.get("grad_norm") is not None and not math.isfinite(record["grad_norm"]):
                record["grad_norm"] = None  # fp16 overflow: the scaler skipped the step
        self.losses_since_evaluation += [r["loss"] for r in records]
        if records:
            last = records[-1]
            last["tokens_per_s"] = (last["tokens"] - self.tokens_before) / max(time.perf_counter() - self.started, 1e-9)
            last["peak_memory_bytes"] = peak_memory(self.device)
        return records

    def end_step(self, step: int, cfg: TrainConfig, bar, evaluate) -> list[dict]:
        """What a loop does after its step `step`: at a logging step (cfg.log_every) or an evaluation
        (cfg.eval_every, and the last step), read the records, show the last on the progress `bar`,
        add `evaluate(step)`'s record to it and write them (the plot redrawn after an evaluation);
        returns the records written, none between logging steps. `evaluate` may read
        `losses_since_evaluation`, emptied after it."""
        evaluated = step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
        if not (evaluated or step % cfg.log_every == 0):
            return []
        records = self.take()
        bar.set_postfix(**self.progress(records), refresh=False)
        if evaluated:
            found = evaluate(step)
            for key in (k for k in found if k.endswith("_loss")):  # val_loss; dpo: train_loss, val_loss
                evaluated = "validation loss" if key == "val_loss" else f"evaluated {key.replace('_', ' ')}"
                if reason := divergence(step, val_loss=found[key], evaluated=evaluated):
                    self.write(records)
                    raise TrainingError(f"{reason}; try a lower --lr or --weight-decay")
            records[-1] |= found
            self.losses_since_evaluation = []
        self.write(records, redraw=evaluated)
        return records

    def write(self, records: list[dict], redraw: bool = False) -> None:
        """Append `records` to the log; `redraw` the plot after the last. The next window's speed is
        measured from here, so a validation does not count as training time."""
        for record in records:
            self.log.append(record, redraw=redraw and record is records[-1])
        self.started = time.perf_counter()
        if records:
            self.tokens_before = records[-1]["tokens"]

    def progress(self, records: list[dict]) -> dict:
        """The progress bar's figures of the last of `records`."""
        from lmspec.runtime.train.throughput import gigabytes

        last = records[-1]
        return {"loss": f"{last['loss']:.4f}", "tok_s": f"{last['tokens_per_s']:,.0f}",
                "mem": gigabytes(last["peak_memory_bytes"])}


def _read(values: list[torch.Tensor]) -> list[float]:
    return torch.stack([v.double() for v in values]).tolist() if values else []
