"""One step of training and what it needs: AdamW with nanoGPT's decay groups, autocast for mixed
precision, the loss, an optimizer step over accumulated micro-batches (or a pipeline's schedule),
and the validation loss, which draws nothing from the training RNG."""
from __future__ import annotations

import contextlib
import math

import torch

from lmspec.runtime.distributed.device import to_device
from lmspec.runtime.errors import ConfigError
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.loss import next_token_loss
from lmspec.runtime.train.random_state import rng_devices


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not on biases and norm gains
    (nanoGPT's grouping: decay exactly the parameters with two or more dimensions)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = device_of(model).type == "cuda"  # the fused kernel exists for CUDA; CPU uses the loop
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision: fp32 runs as it is; bf16/fp16 compute matrix products
    in 16 bits while the weights, gradients and optimizer state stay fp32 (mixed precision)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def slow_autocast_note(device: torch.device, precision: str) -> str | None:
    """A note where --precision bf16/fp16 makes a CPU run slower, not faster: without instructions
    for that dtype, torch's 16-bit matrix products fall back to a generic kernel. On an AVX2 CPU,
    specs/tiny.arch trains 12 times slower in bf16 than in fp32, and a 2-layer GPT-2 60 times (its
    output layer's backward: 47 s against 0.3 s)."""
    if device.type != "cpu" or precision not in ("bf16", "fp16") or not torch.backends.mkldnn.is_available():
        return None  # without oneDNN there is no way to tell, so no note
    try:
        native = getattr(torch.ops.mkldnn, f"_is_mkldnn_{precision}_supported")()
    except (AttributeError, RuntimeError):  # a torch without the probe
        return None
    return None if native else (f"note: this CPU has no {precision} matrix instructions, so --precision {precision} "
                                f"runs many times slower here than fp32 (the default)")


def validation_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32",
             device: torch.device | None = None) -> float:
    """Mean cross-entropy over fixed batches, in eval mode, without touching the training RNG.
    `device`: where the model computes (default: where its parameters are)."""
    device = device or device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices(device)), autocast(device, precision):
            # read off the device once, not once per batch; summed on the host in the same order as before
            losses = torch.stack([training_loss(model(to_device(x, device)), to_device(y, device))
                                  for x, y in batches]).tolist()
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def deferred_sync(ddp, model, sharded: bool):
    """The context that keeps a micro-batch's gradients on its rank, None in a world of one."""
    if ddp is not None:
        return ddp.no_sync
    if sharded:
        from lmspec.runtime.distributed.fsdp import no_gradient_sync
        return lambda: no_gradient_sync(model)
    return None


def optimizer_step(forward, no_sync, model, optimizer, scaler, data, cfg, generator, device,
                    sharded: bool = False, mesh=None, loss_fn=next_token_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over cfg.grad_accum micro-batches; returns (their mean loss, the gradient
    norm), both as tensors still on the device: reading them waits for the device, which the loop
    does only at the steps it logs (runtime/train/loop.py). `forward` is
    the model, wrapped in DistributedDataParallel under torchrun, compiled with --compile, and
    `loss_fn` the training loss (compiled too with --compile); `no_sync`
    (several ranks only) defers the gradient reduction; a tensor-parallel run's `mesh` says over
    which ranks the replicas average their gradients."""
    # float64, added in order: the same number the float() of each micro-batch's loss summed in
    # Python gives, but without waiting for the device at every micro-batch
    total = torch.zeros((), dtype=torch.float64, device=device)
    for micro in range(cfg.grad_accum):
        x, y = data.train_batch(cfg.batch, cfg.seq, generator)
        # Ranks average gradients once per step, at the last micro-batch, not after each one.
        syncing = no_sync is None or micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if syncing else no_sync():
            with autocast(device, cfg.precision):
                logits = forward(to_device(x, device))
            loss = loss_fn(logits, to_device(y, device))
            # Dividing by the micro-batch count makes the summed gradients those of the mean loss.
            scaler.scale(loss / cfg.grad_accum).backward()
        total = total + loss.detach().double()
    from lmspec.runtime.distributed.mesh import average_gradients
    from lmspec.runtime.distributed.tensor_parallel import sum_partial_gradients
    sum_partial_gradients(model)
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
    return total / cfg.grad_accum, _whole(norm)


def _whole(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (an FSDP or tensor-parallel norm is a DTensor: made whole
    now, a collective every rank takes at every step, but no wait for the device)."""
    from torch.distributed.tensor import DTensor
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def pipeline_refusal(precision: str, compile: bool) -> str | None:
    """Why a pipeline cannot run with these settings, or None. fp16 would need a loss scale agreed
    across the stages; bf16 has fp32's range and needs none."""
    unsupported = [name for name, on in (("--precision fp16", precision == "fp16"), ("--compile", compile)) if on]
    return f"--pp does not combine with {', '.join(unsupported)} yet (bf16 does)" if unsupported else None


def check_pipeline(cfg: TrainConfig, pp: int) -> None:
    if refusal := pipeline_refusal(cfg.precision, cfg.compile):
        raise ConfigError(refusal)
    micro = cfg.micro_batches or pp
    if cfg.pipeline_schedule not in ("1f1b", "gpipe"):
        raise ConfigError(f"pipeline schedule must be 1f1b or gpipe, got {cfg.pipeline_schedule!r}")
    if cfg.batch % micro or (cfg.pipeline_schedule == "1f1b" and micro < pp):
        raise ConfigError(f"--batch {cfg.batch} must split into {micro} equal micro-batches"
                          + (f", at least {pp} (one per stage) for 1F1B" if cfg.pipeline_schedule == "1f1b" else ""))


def pipeline_step(pipe, optimizer, data, cfg, generator, mesh=None) -> tuple[float, float]:
    """One optimizer step of a pipeline: every rank of a replica draws the same batches (the first
    stage feeds the tokens, the last scores the targets), replicas average their gradients, then
    clip by the whole model's norm."""
    from lmspec.runtime.distributed.mesh import average_gradients
    total = 0.0
    for _ in range(cfg.grad_accum):
        x, y = data.train_batch(cfg.batch, cfg.seq, generator)
        total += pipe.step(x, y, scale=1 / cfg.grad_accum)
    from lmspec.runtime.distributed.tensor_parallel import sum_partial_gradients
    sum_partial_gradients(pipe.module)
    average_gradients(pipe.parameters(), mesh)
    # an infinite bound measures the norm without clipping
    norm = pipe.clip_grad_norm_(cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / cfg.grad_accum, norm


def pipeline_validation_loss(pipe, batches) -> float:
    pipe.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices(pipe.device)):
            losses = [pipe.eval_loss(x, y) for x, y in batches]
    finally:
        pipe.train()
    return sum(losses) / len(losses)


def training_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return next_token_loss(logits, targets)


def device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
