"""The training loop: next-token cross-entropy, AdamW, warm-up + cosine, checkpoints, exact resume.

Works for any module called as `model(tokens[B, T]) -> logits[B, T, V]` with an int `model.context`.

Exact resume: a run stopped at a checkpoint and resumed produces the same losses, to float
rounding, as one that never stopped. That holds because everything random is restored (the torch
RNG that drives dropout, the generator that picks batches), evaluation runs under a forked RNG and
fixed windows so it draws nothing, and the learning rate is a function of the step alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmspec.runtime.distributed import world as distributed
from lmspec.runtime.checkpoint import sharded as sharded_store
from lmspec.runtime.checkpoint.store import (
    MODEL_FILE,
    Checkpoint,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_sharded_optimizer,
    read_optimizer_by_name,
    save_checkpoint,
)
from lmspec.runtime.data.token_data import TokenData
from lmspec.runtime.train.loss import next_token_loss
from lmspec.runtime.distributed.device import device_name, to_device
from lmspec.runtime.distributed.world import World
from lmspec.runtime.distributed.materialise import is_on_meta, materialise_from_file, materialise_initial
from lmspec.runtime.train.metrics import MetricsLog, plot_loss_curve
from lmspec.runtime.train.schedule import learning_rate
from lmspec.runtime.train.throughput import (
    device_capacity,
    gigabytes,
    mfu,
    peak_flops,
    peak_memory,
    predicted_memory,
    training_flops_per_token,
)
from lmspec.runtime.errors import ConfigError, TrainingError  # noqa: F401  (raised here, and imported from here)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class TrainConfig:
    steps: int = 500
    batch: int = 12
    seq: int | None = None  # None: the model's context
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batches: int = 20  # 0: never evaluate
    ckpt_every: int = 100  # 0: checkpoint only at the end
    keep: int = 3
    seed: int = 1337
    log_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast's compute dtype (fp16 with loss scaling)
    activation_checkpointing: str | None = None  # None, "all", or block names / patterns
    compile: bool = False  # torch.compile the training forward
    world_size: int = 1  # ranks the run trained on; `batch` is per rank, the global batch batch * world_size
    strategy: str = "ddp"  # with several ranks: ddp (replicated weights) or fsdp (sharded, FSDP2)
    cpu_offload: bool = False  # fsdp: sharded weights, gradients and AdamW state live in host memory
    tensor_parallel: int = 1  # ranks each layer is split over (DTensor); the data-parallel ranks are world / this
    pipeline_parallel: int = 1  # pipeline stages, one rank each (torch.distributed.pipelining)
    micro_batches: int = 0  # a pipeline's micro-batches per batch (0: as many as stages)
    pipeline_schedule: str = "1f1b"  # 1f1b | gpipe

    PRECISIONS = ("fp32", "bf16", "fp16")
    STRATEGIES = ("ddp", "fsdp")
    # Settings that shape what is trained; on resume they come from the checkpoint, because a
    # different value would make the continued run a different run. The others (steps, eval,
    # checkpoint and log cadence) may change on resume, e.g. to extend a run.
    TRAJECTORY = ("batch", "seq", "lr", "min_lr", "warmup", "weight_decay", "betas", "grad_clip",
                  "grad_accum", "seed", "precision")

    def resolved(self, context: int) -> TrainConfig:
        """A copy with the defaults that depend on the model filled in, checked."""
        cfg = dataclasses.replace(
            self,
            seq=self.seq if self.seq is not None else context,
            min_lr=self.min_lr if self.min_lr is not None else self.lr / 10,
            betas=tuple(self.betas),
        )
        cfg._check(context)
        return cfg

    def _check(self, context: int) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name} {rule}, got {getattr(self, name)!r}")

        for name in ("steps", "batch", "grad_accum", "keep", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        for name in ("warmup", "eval_every", "eval_batches", "ckpt_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(isinstance(self.seq, int) and 1 <= self.seq <= context, "seq",
             f"must be between 1 and the model's context {context}")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"must be between 0 and lr ({self.lr})")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)")
        need(self.precision in self.PRECISIONS, "precision", f"must be one of {', '.join(self.PRECISIONS)}")
        need(self.strategy in self.STRATEGIES, "strategy", f"must be one of {', '.join(self.STRATEGIES)}")
        need(not self.cpu_offload or self.strategy == "fsdp", "cpu_offload", "needs strategy fsdp")
        # GradScaler unscales on the accelerator; offloaded gradients are on the host
        need(not self.cpu_offload or self.precision != "fp16", "cpu_offload", "does not combine with fp16 (use bf16)")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        cfg = cls(**values)
        cfg.betas = tuple(cfg.betas)
        return cfg


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not on biases and norm gains
    (nanoGPT's grouping: decay exactly the parameters with two or more dimensions)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = _device_of(model).type == "cuda"  # the fused kernel exists for CUDA; CPU uses the loop
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision: fp32 runs as it is; bf16/fp16 compute matrix products
    in 16 bits while the weights, gradients and optimizer state stay fp32 (mixed precision)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32",
             device: torch.device | None = None) -> float:
    """Mean cross-entropy over fixed batches, in eval mode, without touching the training RNG.
    `device`: where the model computes (default: where its parameters are)."""
    device = device or _device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(device)), autocast(device, precision):
            losses = [_loss(model(to_device(x, device)), to_device(y, device)).item() for x, y in batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


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
) -> dict:
    """Train `model` on `data`, writing checkpoints, metrics.jsonl and loss.png under `run_dir`.

    With resume=True, continue from the run's latest checkpoint exactly where it stopped.
    A fresh run refuses a run directory that already holds checkpoints. Ctrl-C stops at once and
    leaves the last complete checkpoint in place. Returns a summary of the run.

    In a world of several ranks (torchrun) the model trains under DistributedDataParallel, or FSDP2
    with cfg.strategy "fsdp" (weights, gradients and optimizer state sharded; see runtime/distributed/fsdp.py): each
    rank takes its slice of every global batch, gradients are averaged across ranks, the logged
    loss is the mean over ranks, and only rank 0 writes metrics and plots. Checkpoints hold the
    whole model either way, so a run resumes on any number of ranks under either strategy.

    With a `tensor_parallel_plan` (compiler/tensor_parallel.py) each layer is split over tp ranks
    (runtime/distributed/tensor_parallel.py); with `pipeline_stages` (compiler/pipeline_stages.py, and the
    model's `graph`) each rank runs one stage of a pipeline (runtime/distributed/pipeline.py); both
    compose, and a world larger than tp x pp holds data-parallel replicas of the model-parallel
    group, laid out pp x dp x tp (runtime/distributed/mesh.py), which average gradients (ddp) or
    shard each stage over the dp group (fsdp). The ranks of one replica train on the same batches;
    checkpoints keep the single-process layout.

    A `model` built on `meta` (compiler/lower.build, with its `graph`) gets its weights only once it
    is split as the layout says, each rank only its share, on `device` (runtime/distributed/materialise.py):
    from the checkpoint when resuming, else from cfg.seed, the same weights whatever the layout.
    A model with weights computes where they are (`device` defaults to there).

    Each logged step records tokens/s, the gradient norm, the learning rate, peak device memory (the
    largest over ranks) and, where the device's peak FLOP/s is known (a table of GPUs, or
    `peak_tflops`), MFU; the summary sets the peak memory beside what `lmspec plan` predicted."""
    run_dir = Path(run_dir)
    context = int(model.context)
    try:
        json.dumps(spec)
    except (TypeError, ValueError) as err:  # found now, not at the first checkpoint an hour in
        raise ConfigError(f"spec must be JSON-serialisable: {err}") from None

    checkpoint: Checkpoint | None = None
    changed_on_resume: dict = {}
    tp = tensor_parallel_plan.tp if tensor_parallel_plan is not None else 1
    pp = len(pipeline_stages) if pipeline_stages else 1
    if world.size % (tp * pp):
        raise ConfigError(f"{tp * pp} model-parallel ranks need a world whose size divides by them, got {world.size}")
    replicas = world.data_parallel(tp, pp)  # the ranks that draw different batches
    cfg = dataclasses.replace(cfg, world_size=replicas.size, tensor_parallel=tp, pipeline_parallel=pp)
    if resume:
        checkpoint = load_checkpoint(run_dir)
        cfg, changed_on_resume = _config_for_resume(cfg, checkpoint)
        if json.loads(checkpoint.tokenizer) != json.loads(tokenizer.to_json()):
            raise CheckpointError(f"{checkpoint.path}: was trained with a different tokenizer")
    elif (existing := find_checkpoint(run_dir)) is not None:
        raise TrainingError(f"{run_dir} already holds a run (last checkpoint {existing.name}); "
                            f"resume it or choose another directory")
    cfg = cfg.resolved(context)
    data.check_seq(cfg.seq, validation=cfg.eval_batches > 0)
    if tensor_parallel_plan is not None and tensor_parallel_plan.sequence_parallel and cfg.seq % tp:
        raise ConfigError(f"sequence parallelism splits each sequence over {tp} ranks: --seq {cfg.seq} "
                          f"must divide by {tp}")
    checkpointed: list[str] = []
    if cfg.activation_checkpointing:
        from lmspec.compiler.checkpointing import checkpoint_blocks, select_blocks
        try:  # a pipeline checkpoints its own stage's blocks, once the stage is cut (build_pipeline)
            checkpointed = (select_blocks(model, cfg.activation_checkpointing) if pp > 1 else
                            checkpoint_blocks(model, cfg.activation_checkpointing))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)

    on_meta = is_on_meta(model)
    if on_meta and graph is None:
        raise ValueError("a model built on meta needs its graph to be given its weights")
    device = torch.device(device) if device is not None else _device_of(model)
    _check_vocab(model, tokenizer, device, graph)
    if checkpoint is not None and not on_meta:
        checkpoint.load_model(model)  # whole, before FSDP shards what is there

    def materialise(module: torch.nn.Module, plan=None) -> None:
        """Weights for this rank's part of a model built on meta (its shards, or its stage)."""
        if not on_meta:
            return
        # offloaded FSDP shards live in host memory; buffers (rotary tables) are used on the device
        where = torch.device("cpu") if cfg.cpu_offload else device
        if checkpoint is not None:
            materialise_from_file(module, graph, checkpoint.path / MODEL_FILE, where, plan, buffer_device=device)
        else:
            materialise_initial(module, graph, cfg.seed, where, plan, buffer_device=device)

    ddp = pipe = mesh = None
    # FSDP2 over the data-parallel replicas: of the whole model, of each one's tp shards (2-D), or of
    # each pipeline stage (and its tp shards: 3-D)
    sharded = cfg.strategy == "fsdp" and replicas.size > 1
    if tp * pp > 1:  # model parallel, with data-parallel replicas when the world holds several copies
        from lmspec.runtime.distributed.mesh import layout_mesh
        mesh = layout_mesh(world, tp, pp, device.type)
    if pp > 1:
        from lmspec.runtime.distributed.pipeline import build_pipeline
        _check_pipeline(cfg, pp)
        pipe = build_pipeline(model, graph, pipeline_stages, mesh.get_local_rank("pp"), world,
                              n_microbatches=cfg.micro_batches or pp, schedule=cfg.pipeline_schedule,
                              loss_fn=_loss, mesh=mesh, tensor_parallel_plan=tensor_parallel_plan if tp > 1 else None,
                              checkpointed=checkpointed, autocast=lambda: autocast(device, cfg.precision),
                              fsdp=sharded, precision=cfg.precision, cpu_offload=cfg.cpu_offload,
                              materialise=lambda stage: materialise(stage, tensor_parallel_plan))
        model = pipe.module  # this rank's stage: the optimizer, evaluation and checkpoints see it
    elif tp > 1:
        from lmspec.runtime.distributed import tensor_parallel
        tensor_parallel.apply_tensor_parallel(model, tensor_parallel_plan, mesh["tp"])
        if sharded:
            from lmspec.runtime.distributed import fsdp as sharding
            sharding.shard_model(model, cfg.precision, mesh=mesh["dp"], offload=cfg.cpu_offload)
        materialise(model, tensor_parallel_plan)
    elif sharded:
        from lmspec.runtime.distributed import fsdp as sharding
        sharding.shard_model(model, cfg.precision, mesh=sharding.data_parallel_mesh(world, device),
                             offload=cfg.cpu_offload)
        materialise(model)
    else:
        materialise(model)
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel
            # It broadcasts rank 0's weights, so every rank starts alike; gradients live in its
            # all-reduce buckets rather than in a second copy (what `lmspec plan` assumes).
            ddp = DistributedDataParallel(model, gradient_as_bucket_view=True,
                                          device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, cfg)  # after sharding: FSDP's parameters are its shards
    # fp16's narrow range needs the loss scaled up (and the gradients back down) so that small
    # gradients do not flush to zero; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    forward = ddp or model
    forward = torch.compile(forward) if cfg.compile else forward
    batch_generator = torch.Generator()  # batches are drawn on the CPU, then moved to the device
    if checkpoint is not None:
        if pipe is not None:
            pipe.load_optimizer_state(optimizer, read_optimizer_by_name(checkpoint.path, pipe.needed_names()))
        elif tp > 1:
            sharded_store.load_tensor_parallel_optimizer(checkpoint, optimizer, model, tensor_parallel_plan)
        elif sharded:
            load_sharded_optimizer(checkpoint, optimizer, model)
        else:
            checkpoint.load_optimizer(optimizer, model)
        _restore_rng(checkpoint.rng_states(), batch_generator, device, checkpoint.path, scaler)
        start_step = checkpoint.step
        totals = {"elapsed": 0.0, "loss": None, "val_loss": None, "best_val_loss": None} | checkpoint.metrics
        log = MetricsLog.resumed(run_dir / METRICS_FILE, start_step) if world.main else None
    else:
        torch.manual_seed(cfg.seed)  # dropout and anything else drawn from torch's default RNG
        # Its own seed so that batch positions and dropout masks are not the same random stream.
        batch_generator.manual_seed(cfg.seed + 1)
        start_step, totals = 0, {"elapsed": 0.0, "loss": None, "val_loss": None, "best_val_loss": None}
        log = MetricsLog.fresh(run_dir / METRICS_FILE) if world.main else None

    # The windows of the global batch, each rank evaluating its slice: the mean over ranks is the
    # validation loss one process computes with the same global batch.
    mine = slice(replicas.rank * cfg.batch, (replicas.rank + 1) * cfg.batch)
    val_set = [(x[mine], y[mine]) for x, y in data.val_batches(cfg.batch * replicas.size, cfg.seq, cfg.eval_batches)
               ] if cfg.eval_batches else []
    tokens_per_step = cfg.batch * cfg.seq * cfg.grad_accum * replicas.size
    flops_per_token = training_flops_per_token(graph, cfg.seq) if graph is not None else None
    peak = peak_flops(device, peak_tflops) if flops_per_token else None
    predicted = predicted_memory(graph, cfg, world.size) if graph is not None else None
    if world.main and predicted is not None:
        print(f"memory: lmspec plan predicts {gigabytes(predicted)} per {device.type.upper()} for this run"
              + (f" ({device_name(device)}: {gigabytes(device_capacity(device))})" if device.type == "cuda" else ""))
    session_start = time.perf_counter()
    elapsed_before = float(totals.get("elapsed", 0.0))
    last_checkpoint = checkpoint.path if checkpoint is not None else None
    was_training = model.training
    model.train()

    bar = tqdm(total=cfg.steps, initial=min(start_step, cfg.steps), unit="step", desc="train",
               disable=None if progress and world.main else True, dynamic_ncols=True)
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            lr = learning_rate(step - 1, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, decay_steps=cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            if pipe is not None:
                loss, grad_norm = _pipeline_step(pipe, optimizer, data, cfg, batch_generator,
                                                 None if sharded else mesh)
            else:
                loss, grad_norm = _optimizer_step(forward, _no_sync(ddp, model, sharded), model, optimizer, scaler,
                                                  data, cfg, batch_generator, device, sharded,
                                                  None if sharded else mesh)
            loss = distributed.mean(world, loss, device)
            tokens_per_s = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
            if not math.isfinite(loss):
                raise TrainingError(f"the loss became {loss} at step {step}; try a lower learning rate "
                                    f"(the last good checkpoint is {last_checkpoint})")
            utilisation = mfu(tokens_per_s, flops_per_token, peak, world.size)
            record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
                      "grad_norm": grad_norm if math.isfinite(grad_norm) else None}  # fp16 overflow: skipped
            if utilisation is not None:
                record["mfu"] = utilisation
            totals["loss"] = loss

            last = step == cfg.steps
            if val_set and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                val_loss = distributed.mean(world, _pipeline_evaluate(pipe, val_set) if pipe is not None
                                            else evaluate(model, val_set, cfg.precision, device), device)
                if sharded:  # FSDP keeps the root gathered after a forward that has no backward
                    model.reshard()
                record["val_loss"] = totals["val_loss"] = val_loss
                if totals["best_val_loss"] is None or val_loss < totals["best_val_loss"]:
                    totals["best_val_loss"] = val_loss
                if world.main:
                    bar.write(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}")
                sys.stdout.flush()  # visible as it happens when stdout is a pipe or a log file
            totals["elapsed"] = record["elapsed"] = elapsed_before + time.perf_counter() - session_start
            if last or step % cfg.log_every == 0 or "val_loss" in record:  # every rank: the maximum is collective
                record["peak_memory_bytes"] = int(distributed.maximum(world, peak_memory(device), device))
                if log is not None:
                    log.append(record)

            if last or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                fields = dict(rng=_rng_states(batch_generator, device, scaler), train_config=cfg.to_dict(),
                              metrics=dict(totals, tokens=step * tokens_per_step), tokenizer=tokenizer.to_json(),
                              spec=spec, keep=cfg.keep)
                # model parallel: the weights gathered to rank 0, the optimizer state written by every
                # rank through torch.distributed.checkpoint (its share, whole and by name)
                if pipe is not None:
                    last_checkpoint = sharded_store.save_pipeline_checkpoint(pipe, world, run_dir, optimizer, mesh, step=step,
                                                                             **fields)
                elif tp > 1:
                    last_checkpoint = sharded_store.save_tensor_parallel_checkpoint(
                        world, run_dir, step=step, model=model, optimizer=optimizer, plan=tensor_parallel_plan,
                        mesh=mesh, **fields)
                elif sharded:  # every rank takes part: each writes its optimizer shards
                    last_checkpoint = sharded_store.save_sharded_checkpoint(world, run_dir, step=step, model=model,
                                                                       optimizer=optimizer, **fields)
                elif world.main:
                    last_checkpoint = save_checkpoint(run_dir, step=step, model=model, optimizer=optimizer,
                                                      **fields)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}",
                            **({"mfu": f"{utilisation:.1%}"} if utilisation is not None else {}),
                            mem=gigabytes(peak_memory(device)), refresh=False)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    distributed.barrier(world)  # the last checkpoint is written before any rank moves on

    if world.main and (run_dir / METRICS_FILE).exists():
        plot_loss_curve(run_dir / METRICS_FILE, run_dir / PLOT_FILE)
    session_steps = max(0, cfg.steps - start_step)
    session_time = time.perf_counter() - session_start
    final_step = max(start_step, cfg.steps)
    session_rate = session_steps * tokens_per_step / session_time if session_steps else None
    measured = int(distributed.maximum(world, peak_memory(device), device))
    return {
        "run_dir": str(run_dir),
        "start_step": start_step,
        "steps": final_step,
        "loss": totals.get("loss"),
        "val_loss": totals.get("val_loss"),
        "best_val_loss": totals.get("best_val_loss"),
        "tokens": final_step * tokens_per_step,
        "elapsed": elapsed_before + session_time,
        "tokens_per_s": session_rate,
        "mfu": mfu(session_rate, flops_per_token, peak, world.size) if session_rate else None,
        "peak_memory_bytes": measured,
        "predicted_memory_bytes": predicted,
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
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(device)):
            vocab = model(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1]
    finally:
        model.train(was_training)
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"the model predicts {vocab} tokens but the tokenizer has {tokenizer.vocab_size}; "
                          f"set the model's vocab to at least {tokenizer.vocab_size}")


def _no_sync(ddp, model, sharded: bool):
    """The context that keeps a micro-batch's gradients on its rank, None in a world of one."""
    if ddp is not None:
        return ddp.no_sync
    if sharded:
        from lmspec.runtime.distributed.fsdp import no_gradient_sync
        return lambda: no_gradient_sync(model)
    return None


def _optimizer_step(forward, no_sync, model, optimizer, scaler, data, cfg, generator, device,
                    sharded: bool = False, mesh=None) -> float:
    """One optimizer step over cfg.grad_accum micro-batches; returns their mean loss. `forward` is
    the model, wrapped in DistributedDataParallel under torchrun, compiled with --compile; `no_sync`
    (several ranks only) defers the gradient reduction; a tensor-parallel run's `mesh` says over
    which ranks the replicas average their gradients."""
    total = 0.0
    for micro in range(cfg.grad_accum):
        x, y = data.train_batch(cfg.batch, cfg.seq, generator)
        # Ranks average gradients once per step, at the last micro-batch, not after each one.
        syncing = no_sync is None or micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if syncing else no_sync():
            with autocast(device, cfg.precision):
                logits = forward(to_device(x, device))
            loss = _loss(logits, to_device(y, device))
            # Dividing by the micro-batch count makes the summed gradients those of the mean loss.
            scaler.scale(loss / cfg.grad_accum).backward()
        total += loss.item()
    from lmspec.runtime.distributed.mesh import average_gradients
    from lmspec.runtime.distributed.tensor_parallel import reduce_sequence_parallel_gradients
    reduce_sequence_parallel_gradients(model)
    average_gradients(model.parameters(), mesh)
    scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless fp16)
    if sharded:
        from lmspec.runtime.distributed.fsdp import agree_on_overflow
        agree_on_overflow(scaler, optimizer)
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    else:  # measured all the same, for the metrics
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    scaler.step(optimizer)  # skipped when fp16 gradients overflowed; the scale then backs off
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / cfg.grad_accum, _as_float(norm)


def _as_float(norm: torch.Tensor) -> float:
    """A gradient norm as a number (an FSDP or tensor-parallel norm is a DTensor: made whole first)."""
    from torch.distributed.tensor import DTensor
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def pipeline_refusal(precision: str, compile: bool) -> str | None:
    """Why a pipeline cannot run with these settings, or None. fp16 would need a loss scale agreed
    across the stages; bf16 has fp32's range and needs none."""
    unsupported = [name for name, on in (("--precision fp16", precision == "fp16"), ("--compile", compile)) if on]
    return f"--pp does not combine with {', '.join(unsupported)} yet (bf16 does)" if unsupported else None


def _check_pipeline(cfg: TrainConfig, pp: int) -> None:
    if refusal := pipeline_refusal(cfg.precision, cfg.compile):
        raise ConfigError(refusal)
    micro = cfg.micro_batches or pp
    if cfg.pipeline_schedule not in ("1f1b", "gpipe"):
        raise ConfigError(f"pipeline schedule must be 1f1b or gpipe, got {cfg.pipeline_schedule!r}")
    if cfg.batch % micro or (cfg.pipeline_schedule == "1f1b" and micro < pp):
        raise ConfigError(f"--batch {cfg.batch} must split into {micro} equal micro-batches"
                          + (f", at least {pp} (one per stage) for 1F1B" if cfg.pipeline_schedule == "1f1b" else ""))


def _pipeline_step(pipe, optimizer, data, cfg, generator, mesh=None) -> float:
    """One optimizer step of a pipeline: every rank of a replica draws the same batches (the first
    stage feeds the tokens, the last scores the targets), replicas average their gradients, then
    clip by the whole model's norm."""
    from lmspec.runtime.distributed.mesh import average_gradients
    total = 0.0
    for _ in range(cfg.grad_accum):
        x, y = data.train_batch(cfg.batch, cfg.seq, generator)
        total += pipe.step(x, y, scale=1 / cfg.grad_accum)
    from lmspec.runtime.distributed.tensor_parallel import reduce_sequence_parallel_gradients
    reduce_sequence_parallel_gradients(pipe.module)
    average_gradients(pipe.parameters(), mesh)
    # an infinite bound measures the norm without clipping
    norm = pipe.clip_grad_norm_(cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / cfg.grad_accum, norm


def _pipeline_evaluate(pipe, batches) -> float:
    pipe.eval()
    try:
        with torch.random.fork_rng(devices=_rng_devices(pipe.device)):
            losses = [pipe.eval_loss(x, y) for x, y in batches]
    finally:
        pipe.train()
    return sum(losses) / len(losses)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return next_token_loss(logits, targets)


def _config_for_resume(cfg: TrainConfig, checkpoint: Checkpoint) -> tuple[TrainConfig, dict]:
    """The given config with the trajectory settings taken from the checkpoint, and a record of
    the given values that were overridden ({name: {"given": ..., "used": ...}})."""
    try:
        saved = TrainConfig.from_dict(checkpoint.train_config)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{checkpoint.path}: unusable train_config in meta.json: {err}") from None
    changed = {}
    updates = {}
    for name in TrainConfig.TRAJECTORY:
        given, used = getattr(cfg, name), getattr(saved, name)
        if name == "betas":
            given, used = tuple(given), tuple(used)
        if given is not None and given != used:
            changed[name] = {"given": given, "used": used}
        updates[name] = used
    if saved.world_size != cfg.world_size:
        # Resumed on another number of ranks: keep the global batch, so the run goes on the same.
        global_batch = saved.batch * saved.world_size
        if global_batch % cfg.world_size:
            raise ConfigError(f"the run's global batch of {global_batch} sequences ({saved.world_size} ranks x "
                              f"{saved.batch}) does not divide over {cfg.world_size} ranks")
        updates["batch"] = global_batch // cfg.world_size
    return dataclasses.replace(cfg, **updates), changed


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _rng_states(generator: torch.Generator, device: torch.device, scaler=None) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state(), "batch_generator": generator.get_state()}
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(device)
    if scaler is not None and scaler.is_enabled():  # the loss scale is run state too: resume needs it
        state = scaler.state_dict()
        states["grad_scaler_scale"] = torch.tensor(state["scale"], dtype=torch.float64)
        states["grad_scaler_growth_tracker"] = torch.tensor(state["_growth_tracker"], dtype=torch.int64)
    return states


def _restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device, path,
                 scaler=None) -> None:
    needed = ["torch_cpu", "batch_generator"]
    if scaler is not None and scaler.is_enabled():
        needed += ["grad_scaler_scale", "grad_scaler_growth_tracker"]
    missing = [k for k in needed if k not in states]
    if missing:
        raise CheckpointError(f"{path}: rng.safetensors lacks {', '.join(missing)}")
    torch.set_rng_state(states["torch_cpu"])
    generator.set_state(states["batch_generator"])
    saved_on_gpu = "torch_cuda" in states
    if saved_on_gpu != (device.type == "cuda"):  # the batches follow; dropout draws from the device's RNG
        print(f"note: resuming on {device.type} a run saved on {'cuda' if saved_on_gpu else 'cpu'}: the batches "
              f"continue as they were, dropout masks differ from an uninterrupted run", file=sys.stderr)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(states["torch_cuda"], device)
    if scaler is not None and scaler.is_enabled():
        scaler.load_state_dict({**scaler.state_dict(), "scale": float(states["grad_scaler_scale"]),
                                "_growth_tracker": int(states["grad_scaler_growth_tracker"])})
