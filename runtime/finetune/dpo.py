"""Direct Preference Optimization (Rafailov et al. 2023): a policy learns to prefer each record's
`chosen` answer over its `rejected` one, measured against a frozen reference (the starting model),
with no reward model and no sampling.

A preference record is an instruction record (Alpaca `{instruction, input}` or chat `{messages}`
ending with the user's turn) plus two answers, `chosen` and `rejected`. Each answer is formatted
and tokenized by instruction tuning's template machinery as if it were the record's output, so the
prompt, the masking (only the answer and its end token count) and the length limits are exactly
instruction tuning's.

Per pair, with log p the SUM of the answer tokens' log-probabilities (prompt and padding masked):

    margin = beta * ((log p_policy(chosen) - log p_ref(chosen)) - (log p_policy(rejected) - log p_ref(rejected)))
    loss   = -log sigmoid(margin)

The margin is the difference of the implicit rewards; its mean and the share of pairs where it is
positive (reward accuracy) are what an evaluation reports. With policy == reference (step 0) every
margin is 0 and the loss log 2.
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
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.distributed.device import to_device
from lmspec.runtime.finetune.instruct_data import Example, check_record, collate, length_buckets, tokenize_records
from lmspec.runtime.finetune.instruct_train import masked_loss
from lmspec.runtime.finetune.lora import trainable_weights
from lmspec.runtime.finetune.steps import StepRecords, loss_scaler, scheduled_lr, steps_per_epoch, update
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.metrics import LOSS_PANEL, METRICS_FILE, PLOT_FILE, Panel, plot_loss_curve
from lmspec.runtime.train.steps import autocast, make_optimizer
from lmspec.runtime.train.watch import RunLog

ANSWERS = ("chosen", "rejected")


# ------------------------------------------------------------------------------------------ records

def check_preference_record(record: object, where: str) -> None:
    """A record with string `chosen` and `rejected` answers whose prompt part is a valid
    instruction record (read_records' check for preference data)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be an object with instruction (or messages), chosen and rejected")
    for key in ANSWERS:
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: " + (f"'{key}' must be a string" if key in record
                                            else f"has no '{key}' answer (preference data needs chosen and rejected)"))
    check_record(with_answer(record, record["chosen"]), where)


def with_answer(record: dict, answer: str) -> dict:
    """The instruction record whose answer is `answer`: the Alpaca output, or the assistant's last turn."""
    if "messages" in record:
        return {"messages": list(record["messages"]) + [{"role": "assistant", "content": answer}]}
    return {k: v for k, v in record.items() if k not in ANSWERS} | {"output": answer}


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example

    def __len__(self) -> int:  # the longer answer's example sets the batch width
        return max(len(self.chosen), len(self.rejected))


def tokenize_pairs(records: list[dict], template, max_length: int) -> tuple[list[Pair | None], int]:
    """One Pair per record (None where either answer's example was left out: no answer token within
    max_length + 1, or characters the vocabulary lacks), and how many examples were cut to fit."""
    sides = [tokenize_records([with_answer(r, r[key]) for r in records], template, max_length) for key in ANSWERS]
    pairs = [Pair(c, r) if c is not None and r is not None else None
             for c, r in zip(sides[0].examples, sides[1].examples)]
    return pairs, sides[0].truncated + sides[1].truncated


# --------------------------------------------------------------------------------------------- loss

def answer_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B]: the sum of log p(target) over each row's trained targets; prompt and padding targets
    are IGNORE and add exactly 0."""
    return -masked_loss(logits, targets, reduction="none").view(targets.shape).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair margins) from per-pair answer log-probs (the module docstring's formula)."""
    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(margins).mean(), margins


def pair_logprobs(model: torch.nn.Module, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] chosen, [B] rejected) answer log-probs, both answers of every pair in one forward pass
    (right padding: under causal attention it changes no real position)."""
    device = next(model.parameters()).device
    x, y = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    logp = answer_logprobs(model(to_device(x, device)), to_device(y, device))
    return logp[:len(pairs)], logp[len(pairs):]


def batch_loss(policy, reference, pairs: list[Pair], pad_id: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, margins) of a batch; the reference runs without gradients."""
    with torch.no_grad():
        reference_chosen, reference_rejected = pair_logprobs(reference, pairs, pad_id)
    return dpo_loss(*pair_logprobs(policy, pairs, pad_id), reference_chosen, reference_rejected, beta)


def evaluate_pairs(policy, reference, pairs: list[Pair], batch: int, pad_id: int, beta: float,
                   precision: str = "fp32") -> dict:
    """{loss, margin, accuracy} over all of `pairs`, in eval mode: mean loss, mean margin, and the
    share of pairs with a positive margin."""
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    losses, margins = [], []
    try:
        with torch.no_grad(), autocast(device, precision):
            for indices in length_buckets([len(p) for p in pairs], batch, seed=0, epoch=0):
                loss, m = batch_loss(policy, reference, [pairs[i] for i in indices], pad_id, beta)
                losses.append(loss)
                margins.append(m.float())
    finally:
        policy.train(was_training)
    m = torch.cat(margins)
    # read off the device at the end, not once per batch
    batch_losses = torch.stack(losses).tolist()
    margin, accuracy = torch.stack([m.mean(), (m > 0).float().mean()]).tolist()
    total = sum(loss * len(batch_margins) for loss, batch_margins in zip(batch_losses, margins))
    return {"loss": total / len(m), "margin": margin, "accuracy": accuracy}


def freeze(reference: torch.nn.Module) -> torch.nn.Module:
    """The reference as DPO needs it: eval mode (no dropout), no parameter takes a gradient."""
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


# --------------------------------------------------------------------------------------------- loop

# loss.png of a DPO run: its loss is per pair, not per token, and the reward margin is what moves.
DPO_PANELS = (Panel(LOSS_PANEL.key, LOSS_PANEL.val_key, "DPO loss (nats/pair)"),
              Panel("margin", "val_margin", "reward margin"))


@dataclass
class DPOSetup:
    """What the run needs besides its TrainConfig (of which `steps` is filled in from the epochs)."""
    template: str
    pad_id: int
    beta: float = 0.1
    epochs: int = 1
    eval_pairs: int = 64  # training pairs scored at each evaluation (validation is scored whole)
    trainable_only: bool = False  # save only the parameters that train (LoRA adapters)
    extra: dict | None = None  # more facts for the checkpoint's train_config (data, split, lora)


def finetune_dpo(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer, train_set: list[Pair],
                 val_set: list[Pair], cfg: TrainConfig, setup: DPOSetup, run_dir, spec: dict,
                 progress: bool = True, log_to: str = "none") -> dict:
    """Train the policy against the frozen reference; evaluate at step 0, every `eval_every` steps
    and at the end (train sample and validation: loss, margin, accuracy); write metrics.jsonl,
    loss.png (loss and reward margin, redrawn at each evaluation), TensorBoard's event files with
    log_to="tensorboard", and the final checkpoint under `run_dir`. Returns the last evaluation and a summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(policy.parameters()).device
    freeze(reference)
    per_epoch = steps_per_epoch(len(train_set), cfg.batch)
    optimizer = make_optimizer(policy, cfg)
    scaler = loss_scaler(cfg, device)
    torch.manual_seed(cfg.seed)  # dropout
    log = RunLog.fresh(run_dir, log_to, DPO_PANELS)
    scored = {"train": train_set[:setup.eval_pairs], "val": val_set}  # the train split is shuffled already
    start = time.perf_counter()
    last: dict = {}

    def evaluate(step: int) -> dict:
        """train_loss, train_margin, …, val_accuracy of this step, printed."""
        record = {}
        for split, pairs in scored.items():
            if pairs:
                found = evaluate_pairs(policy, reference, pairs, cfg.batch, setup.pad_id, setup.beta, cfg.precision)
                record |= {f"{split}_{k}": v for k, v in found.items()}
        bar.write(f"step {step} (epoch {step / per_epoch:.2f}): " + ", ".join(
            f"{split} loss {record[f'{split}_loss']:.4f} margin {record[f'{split}_margin']:+.4f} "
            f"accuracy {record[f'{split}_accuracy']:.2f}" for split in scored if scored[split]))
        sys.stdout.flush()
        last.update(record)
        return record

    policy.train()
    bar = tqdm(total=cfg.steps, unit="step", desc="dpo", disable=None if progress else True, dynamic_ncols=True)
    step, tokens = 0, 0
    try:
        log.append({"step": 0, "epoch": 0.0, **evaluate(0)}, redraw=True)
        pending = StepRecords(log, device, scaler.is_enabled())  # its clock starts after step 0's validation
        for epoch in range(setup.epochs):
            for indices in length_buckets([len(p) for p in train_set], cfg.batch, cfg.seed, epoch):
                lr = scheduled_lr(optimizer, cfg, step)
                pairs = [train_set[i] for i in indices]
                with autocast(device, cfg.precision):
                    loss, margins = batch_loss(policy, reference, pairs, setup.pad_id, setup.beta)
                step += 1
                tokens += sum(len(p.chosen) + len(p.rejected) - 2 for p in pairs)  # the policy's inputs
                loss, grad_norm = update(policy, optimizer, loss, cfg, scaler)
                pending.add({"step": step, "epoch": step / per_epoch, "loss": loss,
                             "margin": margins.detach().mean(), "accuracy": (margins > 0).float().mean(), "lr": lr,
                             "grad_norm": grad_norm, "tokens": tokens, "elapsed": time.perf_counter() - start})
                bar.update(1)
                pending.end_step(step, cfg, bar, evaluate)
    finally:
        bar.close()
        log.close()
    policy.eval()

    train_config = {"finetune": "dpo", "template": setup.template, "beta": setup.beta, "epochs": setup.epochs,
                    "chat_template": builtin_chat_template(setup.template, tokenizer),  # what chat and serve render
                    "train": cfg.to_dict()} | (setup.extra or {})
    checkpoint = save_checkpoint(run_dir, step=step, model=None if setup.trainable_only else policy,
                                 optimizer=None, rng=None, train_config=train_config, tokenizer=tokenizer.to_json(),
                                 spec=spec, metrics=dict(last), keep=cfg.keep,
                                 weights=trainable_weights(policy) if setup.trainable_only else None)
    plot_loss_curve(run_dir / METRICS_FILE, run_dir / PLOT_FILE, DPO_PANELS)
    return last | {"steps": step, "checkpoint": str(checkpoint), "metrics": str(run_dir / METRICS_FILE),
                   "plot": str(run_dir / PLOT_FILE), "elapsed": time.perf_counter() - start}
