"""The training loop: next-token cross-entropy, AdamW, a learning-rate schedule, checkpoints, exact resume.

Works for any module called as `model(tokens[B, T]) -> logits[B, T, V]` with an int `model.context`.

Exact resume: a run stopped at a checkpoint and resumed produces the same losses, to float
rounding, as one that never stopped. That holds because everything random is restored (the torch
RNG that drives dropout, the generator that picks batches), evaluation runs under a forked RNG and
fixed windows so it draws nothing, and the learning rate is a function of the step alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmspec.runtime.checkpoint.store import Checkpoint, CheckpointError, find_checkpoint, load_checkpoint
from lmspec.runtime.data.token_data import TokenData
from lmspec.runtime.distributed import world as distributed
from lmspec.runtime.distributed.device import device_name
from lmspec.runtime.distributed.materialise import is_on_meta
from lmspec.runtime.distributed.world import World
from lmspec.runtime.errors import ConfigError, TrainingError
from lmspec.runtime.train.config import TrainConfig, config_for_resume
from lmspec.runtime.train.divergence import divergence
from lmspec.runtime.train.metrics import METRICS_FILE, PLOT_FILE, plot_loss_curve
from lmspec.runtime.train.placement import Placement, place
from lmspec.runtime.train.random_state import restore_rng, rng_devices, rng_states
from lmspec.runtime.train.steps import (
    device_of,
    make_optimizer,
    optimizer_step,
    pipeline_step,
    pipeline_validation_loss,
    validation_loss,
)
from lmspec.runtime.train.throughput import (
    device_capacity,
    gigabytes,
    mfu,
    peak_flops,
    peak_memory,
    predicted_memory,
    training_flops_per_token,
)
from lmspec.runtime.train.watch import RunLog



def train(
    model: torch.nn.Module,
    tokenizer,
    data: TokenData,
    cfg: TrainConfig,
    run_dir,
    spec: dict,
    resume: bool = False,
    progress: bool = True,
    world: World = World(),
    tensor_parallel_plan=None,
    pipeline_stages=None,
    graph=None,
    device: torch.device | None = None,
    peak_tflops: float | None = None,
    log_to: str = "none",
    init_from: Checkpoint | None = None,
) -> dict:
    """Train `model` on `data`, writing checkpoints, metrics.jsonl and loss.png under `run_dir`.

    With resume=True, continue from the run's latest checkpoint exactly where it stopped. A fresh
    run refuses a run directory that already holds checkpoints; it starts from `init_from`'s weights
    when given (a fresh optimizer and schedule: continued pretraining), their validation loss logged
    as step 0. Ctrl-C stops at once and leaves the
    last complete checkpoint in place. Returns a summary of the run.

    In a world of several ranks (torchrun) the model is laid out as runtime/train/placement.py says:
    replicated (DDP) or sharded (FSDP2, cfg.strategy "fsdp"), split by a `tensor_parallel_plan`
    (compiler/tensor_parallel.py), cut into `pipeline_stages` (compiler/pipeline_stages.py, with the
    model's `graph`), or these composed. Each data-parallel replica takes its slice of every global
    batch, the logged loss is the mean over ranks, and only rank 0 writes metrics and plots;
    checkpoints keep the single-process layout, so a run resumes under any layout.

    A `model` built on `meta` (compiler/lower.build, with its `graph`) gets its weights once split,
    each rank only its share, on `device`; a model with weights computes where they are (`device`
    defaults to there). Each logged step records tokens/s, the gradient norm, the learning rate,
    peak device memory (the largest over ranks) and, where the device's peak FLOP/s is known (a
    table of GPUs, or `peak_tflops`), MFU; the summary sets the peak memory beside what `lmspec
    plan` predicted. loss.png is redrawn at each evaluation, and with log_to="tensorboard" every
    logged record also goes to TensorBoard's event files in RUN/tensorboard (runtime/train/watch.py)."""
    run_dir = Path(run_dir)
    tp = tensor_parallel_plan.tp if tensor_parallel_plan is not None else 1
    pp = len(pipeline_stages) if pipeline_stages else 1
    if is_on_meta(model) and graph is None:
        raise ValueError("a model built on meta needs its graph to be given its weights")
    cfg, checkpoint, changed_on_resume = _settle(cfg, model, tokenizer, data, run_dir, spec, resume, world,
                                                 tensor_parallel_plan, tp, pp)
    checkpointed = _checkpointed_blocks(model, cfg, pp)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else device_of(model)
    _check_vocab(model, tokenizer, device, graph)

    if checkpoint is not None:
        init_from = None  # a resumed run goes on from its own weights
    placed = place(model, cfg, world, device, graph=graph, checkpoint=checkpoint or init_from,
                   tensor_parallel_plan=tensor_parallel_plan, pipeline_stages=pipeline_stages,
                   checkpointed=tuple(checkpointed))
    optimizer = make_optimizer(placed.module, cfg)  # after sharding: FSDP's parameters are its shards
    # fp16's narrow range needs the loss scaled up (and the gradients back down) so that small
    # gradients do not flush to zero; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    batch_generator = torch.Generator()  # batches are drawn on the CPU, then moved to the device
    start_step, totals, log = _restore_or_start(checkpoint, placed, optimizer, batch_generator, device, scaler, cfg,
                                                run_dir, world, log_to)
    replicas = world.data_parallel(tp, pp)
    val_set = _validation_set(data, cfg, replicas)
    meter = _Meter.of(cfg, replicas, graph, device, peak_tflops, world)
    if world.main and meter.predicted is not None:
        print(f"memory: lmspec plan predicts {gigabytes(meter.predicted)} per {device.type.upper()} for this run"
              + (f" ({device_name(device)}: {gigabytes(device_capacity(device))})" if device.type == "cuda" else ""))
    if init_from is not None and val_set:  # where continued pretraining starts from
        _validate_start(placed, val_set, cfg, device, log, init_from)
    elapsed_before = float(totals.get("elapsed", 0.0))
    last_checkpoint = checkpoint.path if checkpoint is not None else None
    module = placed.module
    was_training = module.training
    module.train()

    bar = tqdm(total=cfg.steps, initial=min(start_step, cfg.steps), unit="step", desc="train",
               disable=None if progress and world.main else True, dynamic_ncols=True)
    try:
        window = _Window()
        for step in range(start_step + 1, cfg.steps + 1):
            window.add(step, *_train_step(step, placed, optimizer, data, cfg, batch_generator, device, scaler))
            last = step == cfg.steps
            validating = bool(val_set) and (last or bool(cfg.eval_every and step % cfg.eval_every == 0))
            logging = last or step % cfg.log_every == 0 or validating
            checkpointing = last or bool(cfg.ckpt_every and step % cfg.ckpt_every == 0)
            if not (logging or checkpointing):
                bar.update(1)
                continue
            # The steps' numbers are read only here: reading one waits for the device, and a GPU kept
            # waiting at every step would idle while the next step is prepared. A loss that went wrong
            # in between is still caught before any checkpoint is written.
            record = window.resolve(placed.world, device, meter, last_checkpoint, scaler.is_enabled())
            totals["loss"] = record["loss"]
            if validating:
                _validate(record, totals, placed, val_set, cfg, device, bar, last_checkpoint)
            totals["elapsed"] = record["elapsed"] = elapsed_before + meter.session_seconds()
            record["tokens"] = step * meter.tokens_per_step  # trained so far: `lmspec plot --x tokens`
            if logging:  # every rank: the maximum is collective
                record["peak_memory_bytes"] = int(distributed.maximum(world, peak_memory(device), device))
                if log is not None:
                    log.append(record, redraw="val_loss" in record)  # a plot up to date if stopped
            if checkpointing:
                last_checkpoint = placed.save(
                    run_dir, optimizer, step, rng=rng_states(batch_generator, device, scaler),
                    train_config=cfg.to_dict(), metrics=dict(totals, tokens=step * meter.tokens_per_step),
                    tokenizer=tokenizer.to_json(), spec=spec, keep=cfg.keep) or last_checkpoint
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                            **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}),
                            mem=gigabytes(peak_memory(device)), refresh=False)
            bar.update(1)
            window = _Window()  # its clock starts when the next step does
    finally:
        bar.close()
        module.train(was_training)
        if log is not None:
            log.close()
    distributed.barrier(world)  # the last checkpoint is written before any rank moves on

    if world.main and (run_dir / METRICS_FILE).exists():
        plot_loss_curve(run_dir / METRICS_FILE, run_dir / PLOT_FILE)
    return _summary(run_dir, cfg, start_step, totals, elapsed_before, meter, last_checkpoint, changed_on_resume,
                    world, device)


def _settle(cfg, model, tokenizer, data, run_dir: Path, spec: dict, resume: bool, world: World,
            tensor_parallel_plan, tp: int, pp: int) -> tuple[TrainConfig, Checkpoint | None, dict]:
    """The run's settings, checked (the resumed run's own where they shape what is trained), the
    checkpoint it resumes (or None), and the given settings the checkpoint overrode."""
    try:
        json.dumps(spec)
    except (TypeError, ValueError) as err:  # found now, not at the first checkpoint an hour in
        raise ConfigError(f"spec must be JSON-serialisable: {err}") from None
    if world.size % (tp * pp):
        raise ConfigError(f"{tp * pp} model-parallel ranks need a world whose size divides by them, got {world.size}")
    replicas = world.data_parallel(tp, pp)  # the ranks that draw different batches
    cfg = dataclasses.replace(cfg, world_size=replicas.size, tensor_parallel=tp, pipeline_parallel=pp)
    checkpoint, changed = None, {}
    if resume:
        checkpoint = load_checkpoint(run_dir)
        cfg, changed = config_for_resume(cfg, checkpoint)
        if json.loads(checkpoint.tokenizer) != json.loads(tokenizer.to_json()):
            raise CheckpointError(f"{checkpoint.path}: was trained with a different tokenizer")
    elif (existing := find_checkpoint(run_dir)) is not None:
        raise TrainingError(f"{run_dir} already holds a run (last checkpoint {existing.name}); "
                            f"resume it or choose another directory")
    cfg = cfg.resolved(int(model.context))
    data.check_seq(cfg.seq, validation=cfg.eval_batches > 0)
    if tensor_parallel_plan is not None and tensor_parallel_plan.sequence_parallel and cfg.seq % tp:
        raise ConfigError(f"sequence parallelism splits each sequence over {tp} ranks: --seq {cfg.seq} "
                          f"must divide by {tp}")
    return cfg, checkpoint, changed


def _checkpointed_blocks(model: torch.nn.Module, cfg: TrainConfig, pp: int) -> list[str]:
    """The blocks whose activations are recomputed in the backward pass; rewritten now, except in a
    pipeline, which checkpoints its own stage's blocks once the stage is cut (build_pipeline)."""
    if not cfg.activation_checkpointing:
        return []
    from lmspec.compiler.checkpointing import checkpoint_blocks, select_blocks
    try:
        return (select_blocks(model, cfg.activation_checkpointing) if pp > 1 else
                checkpoint_blocks(model, cfg.activation_checkpointing))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _restore_or_start(checkpoint, placed: Placement, optimizer, batch_generator, device, scaler, cfg: TrainConfig,
                      run_dir: Path, world: World, log_to: str = "none") -> tuple[int, dict, RunLog | None]:
    """(the step to continue from, the running totals, the metrics log): the checkpoint's optimizer
    state, RNG states and log up to its step, or a fresh start from cfg.seed."""
    if checkpoint is not None:
        placed.load_optimizer(checkpoint, optimizer)
        restore_rng(checkpoint.rng_states(), batch_generator, device, checkpoint.path, scaler)
        totals = {"elapsed": 0.0, "loss": None, "val_loss": None, "best_val_loss": None} | checkpoint.metrics
        log = RunLog.resumed(run_dir, checkpoint.step, log_to) if world.main else None
        return checkpoint.step, totals, log
    torch.manual_seed(cfg.seed)  # dropout and anything else drawn from torch's default RNG
    # Its own seed so that batch positions and dropout masks are not the same random stream.
    batch_generator.manual_seed(cfg.seed + 1)
    totals = {"elapsed": 0.0, "loss": None, "val_loss": None, "best_val_loss": None}
    return 0, totals, RunLog.fresh(run_dir, log_to) if world.main else None


def _validation_set(data, cfg: TrainConfig, replicas: World) -> list:
    """The windows of the global batch, each rank evaluating its slice: the mean over ranks is the
    validation loss one process computes with the same global batch."""
    if not cfg.eval_batches:
        return []
    mine = slice(replicas.rank * cfg.batch, (replicas.rank + 1) * cfg.batch)
    return [(x[mine], y[mine]) for x, y in data.val_batches(cfg.batch * replicas.size, cfg.seq, cfg.eval_batches)]


@dataclass
class _Meter:
    """What a step's numbers are measured against: tokens per step, the model's training FLOPs per
    token, the devices' peak, the plan's predicted memory, and the session's clock."""
    tokens_per_step: int
    flops_per_token: float | None
    peak: float | None
    predicted: float | None
    devices: int
    started: float

    @classmethod
    def of(cls, cfg: TrainConfig, replicas: World, graph, device, peak_tflops, world: World) -> _Meter:
        flops = training_flops_per_token(graph, cfg.seq) if graph is not None else None
        return cls(cfg.batch * cfg.seq * cfg.grad_accum * replicas.size, flops,
                   peak_flops(device, peak_tflops) if flops else None,
                   predicted_memory(graph, cfg, world.size) if graph is not None else None, world.size,
                   time.perf_counter())

    def mfu(self, tokens_per_s: float | None) -> float | None:
        return mfu(tokens_per_s, self.flops_per_token, self.peak, self.devices) if tokens_per_s else None

    def session_seconds(self) -> float:
        return time.perf_counter() - self.started


def _train_step(step: int, placed: Placement, optimizer, data, cfg: TrainConfig, batch_generator, device, scaler):
    """One optimizer step at the step's learning rate: (the learning rate, the mean loss, the
    gradient norm), the last two possibly still being computed on the device."""
    lr = cfg.learning_rate(step - 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if placed.pipe is not None:
        loss, grad_norm = pipeline_step(placed.pipe, optimizer, data, cfg, batch_generator, placed.replica_mesh)
    else:
        loss, grad_norm = optimizer_step(placed.forward, placed.deferred_sync(), placed.module, optimizer, scaler,
                                         data, cfg, batch_generator, device, placed.sharded, placed.replica_mesh,
                                         placed.loss)
    return lr, loss, grad_norm


class _Window:
    """The steps trained since their numbers were last read, and when the first of them started."""

    def __init__(self):
        self.started = time.perf_counter()
        self.steps: list[tuple[int, float, object, object]] = []  # (step, lr, loss, gradient norm)

    def add(self, step: int, lr: float, loss, grad_norm) -> None:
        self.steps.append((step, lr, loss, grad_norm))

    def resolve(self, world: World, device, meter: _Meter, last_checkpoint, scaled: bool) -> dict:
        """The last step's metrics record, tokens/s and MFU over the whole window; raises TrainingError
        naming the first step whose loss or gradient norm (the means over ranks, so that every rank
        stops) is not finite, a gradient norm only where no GradScaler (`scaled`) skips its update."""
        n = len(self.steps)
        means = distributed.means(world, [float(loss) for _, _, loss, _ in self.steps]
                                  + [float(norm) for _, _, _, norm in self.steps], device)
        losses = means[:n]
        tokens_per_s = n * meter.tokens_per_step / max(time.perf_counter() - self.started, 1e-9)
        for (step, _, _, _), loss, norm in zip(self.steps, losses, means[n:]):
            if reason := divergence(step, loss=loss, grad_norm=norm, scaled=scaled):
                raise TrainingError(f"{reason}; try a lower learning rate ({_resume_from(last_checkpoint)})")
        step, lr, _, grad_norm = self.steps[-1]
        grad_norm = float(grad_norm)
        record = {"step": step, "loss": losses[-1], "lr": lr, "tokens_per_s": tokens_per_s,
                  "grad_norm": grad_norm if math.isfinite(grad_norm) else None}  # fp16 overflow: skipped
        if (utilisation := meter.mfu(tokens_per_s)) is not None:
            record["mfu"] = utilisation
        return record


def _validation_loss(placed: Placement, val_set: list, cfg: TrainConfig, device) -> float:
    """The mean validation loss over every rank's slice of the validation set."""
    loss = (pipeline_validation_loss(placed.pipe, val_set) if placed.pipe is not None
            else validation_loss(placed.module, val_set, cfg.precision, device))
    val_loss = distributed.mean(placed.world, loss, device)
    if placed.sharded:  # FSDP keeps the root gathered after a forward that has no backward
        placed.module.reshard()
    return val_loss


def _resume_from(last_checkpoint) -> str:
    return f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"


def _validate(record: dict, totals: dict, placed: Placement, val_set: list, cfg: TrainConfig, device, bar,
              last_checkpoint) -> None:
    """The validation loss, into the step's record and the totals (the best so far too); one that is
    not finite ends the run before its weights are checkpointed."""
    val_loss = _validation_loss(placed, val_set, cfg, device)
    if reason := divergence(record["step"], val_loss=val_loss):
        raise TrainingError(f"{reason}; try a lower learning rate or weight decay ({_resume_from(last_checkpoint)})")
    record["val_loss"] = totals["val_loss"] = val_loss
    if totals["best_val_loss"] is None or val_loss < totals["best_val_loss"]:
        totals["best_val_loss"] = val_loss
    if placed.world.main:
        bar.write(f"step {record['step']}: train loss {record['loss']:.4f}, val loss {val_loss:.4f}")
    sys.stdout.flush()  # visible as it happens when stdout is a pipe or a log file


def _validate_start(placed: Placement, val_set: list, cfg: TrainConfig, device, log, init_from: Checkpoint) -> None:
    """Step 0's validation loss, of the weights a run starts from (--init-from), into the log."""
    val_loss = _validation_loss(placed, val_set, cfg, device)
    if log is not None:
        log.append({"step": 0, "val_loss": val_loss, "tokens": 0})
        print(f"step 0: val loss {val_loss:.4f} (the weights of {init_from.path})")
        sys.stdout.flush()


def _summary(run_dir: Path, cfg: TrainConfig, start_step: int, totals: dict, elapsed_before: float, meter: _Meter,
             last_checkpoint, changed_on_resume: dict, world: World, device) -> dict:
    session_steps = max(0, cfg.steps - start_step)
    session_time = meter.session_seconds()
    final_step = max(start_step, cfg.steps)
    session_rate = session_steps * meter.tokens_per_step / session_time if session_steps else None
    return {
        "run_dir": str(run_dir),
        "start_step": start_step,
        "steps": final_step,
        "loss": totals.get("loss"),
        "val_loss": totals.get("val_loss"),
        "best_val_loss": totals.get("best_val_loss"),
        "tokens": final_step * meter.tokens_per_step,
        "elapsed": elapsed_before + session_time,
        "tokens_per_s": session_rate,
        "mfu": meter.mfu(session_rate),
        "peak_memory_bytes": int(distributed.maximum(world, peak_memory(device), device)),
        "predicted_memory_bytes": meter.predicted,
        "device": device_name(device),
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "metrics": str(run_dir / METRICS_FILE),
        "plot": str(run_dir / PLOT_FILE),
        "config": cfg.to_dict(),
        "config_from_checkpoint": changed_on_resume,
    }


def _check_vocab(model: torch.nn.Module, tokenizer, device: torch.device, graph=None) -> None:
    """The model must score every token id the tokenizer can produce. The graph knows its vocabulary;
    without one, ask the model about one token (forked RNG, no grad: the run's state is untouched)."""
    if graph is not None:
        _, logits = graph.outputs[0]
        vocab = logits.shape[-1] if logits.shape and isinstance(logits.shape[-1], int) else None
        if vocab is not None and vocab < tokenizer.vocab_size:
            raise ConfigError(f"the model predicts {vocab} tokens but the tokenizer has {tokenizer.vocab_size}; "
                              f"set the model's vocab to at least {tokenizer.vocab_size}")
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices(device)):
            vocab = model(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1]
    finally:
        model.train(was_training)
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"the model predicts {vocab} tokens but the tokenizer has {tokenizer.vocab_size}; "
                          f"set the model's vocab to at least {tokenizer.vocab_size}")
