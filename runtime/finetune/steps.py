"""The steps every finetuning loop shares (classification, instructions, DPO): its TrainConfig from
the command line, the learning rate of a step, and one optimizer update."""
from __future__ import annotations

import math

import torch

from lmspec.runtime.errors import TrainingError
from lmspec.runtime.train.config import TrainConfig


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
           step: int, scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimizer update from `loss` (backward, gradient clipping, step; through `scaler` under
    fp16, which skips a step whose gradients overflowed); returns the loss's value, raising
    TrainingError if it is not finite. `step` is the count after this update."""
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
    else:
        loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    if scaler is not None and scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingError(f"the loss became {value} at step {step}; try a lower --lr")
    return value
