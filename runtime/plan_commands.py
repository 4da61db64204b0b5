"""`lmspec plan`: what training a spec needs (parameters, FLOPs, compute, time, memory per GPU under
DDP and FSDP), read off its graph. Like `check` and `info`, it never imports torch."""
from __future__ import annotations

import json
import math
import textwrap

from .usage import UsageError, cli_overrides


def _quantity(parse, text: str | None, option: str):
    if text is None:
        return None
    try:
        value = parse(text)
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from None
    if not value > 0:
        raise UsageError(f"{option} must be positive, got {text}")
    return value


def cmd_plan(args) -> int:
    from lmspec.compiler import load_spec
    from lmspec.compiler.plan import (STRATEGIES, make_plan, parse_bytes, parse_count, parse_flops)
    if args.gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {args.gpus}")
    if args.micro_batch < 1:
        raise UsageError(f"--micro-batch must be at least 1, got {args.micro_batch}")
    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu is a fraction of the peak, in (0, 1], got {args.mfu}")
    gpu_memory = _quantity(parse_bytes, args.gpu_memory, "--gpu-memory")
    gpu_flops = _quantity(parse_flops, args.gpu_flops, "--gpu-flops")
    tokens = _quantity(parse_count, args.tokens, "--tokens")
    compute = _quantity(parse_flops, args.compute, "--compute")
    graph = load_spec(args.spec, cli_overrides(args.set), args.model)
    context = graph.context
    if args.seq is not None and args.seq < 1:
        raise UsageError(f"--seq must be positive, got {args.seq}")
    if args.seq is not None and context is not None and args.seq > context:
        raise UsageError(f"--seq {args.seq} is more than the context of {graph.name} ({context})")
    seq = args.seq or min(context or 4096, 4096)
    strategies = STRATEGIES if args.strategy == "both" else (args.strategy,)
    ckpt = (False, True) if args.activation_checkpointing is None else (args.activation_checkpointing,)
    plan = make_plan(graph, gpus=args.gpus, gpu_memory=gpu_memory, seq=seq, micro_batch=args.micro_batch,
                     precision=args.precision, tokens=tokens, compute=compute, mfu=args.mfu,
                     gpu_flops=gpu_flops, strategies=strategies, checkpointing=ckpt)
    print(json.dumps(to_json(plan), indent=2) if args.format == "json" else render(plan))
    return 0


def to_json(plan) -> dict:
    a = plan.acts
    return {
        "model": plan.model, "file": plan.file, "parameters": plan.parameters,
        "seq": plan.seq, "micro_batch": plan.micro_batch, "gpus": plan.gpus, "gpu_memory_bytes": plan.gpu_memory,
        "precision": plan.precision, "forward_flops_per_token": plan.forward_flops_per_token,
        "training_flops_per_token": plan.training_flops_per_token, "six_n": plan.six_n,
        "matmul_parameters": plan.matmul_params, "attention_flops_per_token": plan.attention_flops_per_token,
        "mfu": plan.mfu, "gpu_flops": plan.gpu_flops, "tokens_per_step": plan.tokens_per_step,
        "budgets": [{"name": b.name, "tokens": b.tokens, "flops": b.flops, "seconds": b.seconds}
                    for b in plan.budgets],
        "memory_bytes_per_gpu": [{
            "strategy": r.strategy, "activation_checkpointing": r.checkpointing, "weights": r.weights,
            "gradients": r.gradients, "optimizer": r.optimizer, "activations": r.activations,
            "total": r.total, "fits": r.fits(plan.gpu_memory)} for r in plan.rows],
        "activations_bytes": {
            "blocks": sum(a.blocks.values()), "blocks_count": len(a.blocks),
            "block_inputs": sum(a.block_inputs.values()), "outside_blocks": a.outside,
            "logits": a.logits, "loss": a.loss_kept + a.loss_grads},
        "min_fsdp_gpus": {"without_checkpointing": plan.min_fsdp_gpus[False],
                          "with_checkpointing": plan.min_fsdp_gpus[True]},
    }


def _si(x: float, unit: str = "", prefixes=("", "k", "M", "G", "T", "P", "E", "Z", "Y")) -> str:
    """3-4 significant digits with a prefix: 989 TFLOP/s, 149.7 GFLOP, 70.55 B."""
    i = 0
    while abs(x) >= 999.5 and i < len(prefixes) - 1:
        x, i = x / 1000, i + 1
    digits = f"{x:.4g}" if abs(x) >= 10 else f"{x:.3g}"
    return f"{digits} {prefixes[i]}{unit}".rstrip()


def _count(x: float) -> str:
    return _si(x, prefixes=("", "K", "M", "B", "T"))


def _duration(seconds: float) -> str:
    for size, name in ((365.25 * 86400, "years"), (86400, "days"), (3600, "hours"), (60, "minutes")):
        if seconds >= size:
            return f"{seconds / size:,.1f} {name}"
    return f"{seconds:,.0f} seconds"


def render(plan) -> str:
    a = plan.acts
    gpus = f"{plan.gpus} GPU{'s' * (plan.gpus != 1)}"
    out = [f"model {plan.model}  ({plan.file})",
           f"parameters: {plan.parameters:,} ({_count(plan.parameters)})",
           f"FLOPs per token at seq {plan.seq}: {_si(plan.forward_flops_per_token)} forward, "
           f"{_si(plan.training_flops_per_token)} training (3 x forward)",
           f"  = 6N plus attention: 6 x {_count(plan.matmul_params)} parameters in matrix products "
           f"= {_si(6 * plan.matmul_params)}, attention {_si(plan.attention_flops_per_token)}",
           "",
           f"compute on {gpus} at {plan.mfu:.0%} MFU of {_si(plan.gpu_flops, 'FLOP/s')}:",
           f"  {'budget':<30}{'tokens':>10}{'FLOPs':>12}{'time':>16}"]
    names = {"chinchilla": "Chinchilla (20 tokens/param)", "tokens": "--tokens", "compute": "--compute"}
    for b in plan.budgets:
        out.append(f"  {names[b.name]:<30}{_count(b.tokens):>10}{b.flops:>12.3g}{_duration(b.seconds):>16}")
    unit, scale = ("GB", 1e9) if max(r.total for r in plan.rows) >= 1e9 else ("MB", 1e6)
    out += ["",
            f"memory per GPU in {unit} (10^{round(math.log10(scale))} bytes): {_precision(plan.precision)}, AdamW, "
            f"micro-batch {plan.micro_batch} x {plan.seq} tokens",
            f"  {'strategy':<10}{'checkpointing':<15}{'weights':>9}{'gradients':>11}{'optimizer':>11}"
            f"{'activations':>13}{'total':>10}   fits {_si(plan.gpu_memory, 'B')}"]
    for r in plan.rows:
        strategy = r.strategy if r.strategy == "ddp" else f"fsdp x{plan.gpus}"
        cells = "".join(f"{v / scale:>{w},.1f}" for v, w in (
            (r.weights, 9), (r.gradients, 11), (r.optimizer, 11), (r.activations, 13), (r.total, 10)))
        out.append(f"  {strategy:<10}{'per block' if r.checkpointing else 'no':<15}{cells}"
                   f"   {r.fits(plan.gpu_memory)}")
    notes = []
    if a.blocks:
        notes.append(f"activations: {len(a.blocks)} blocks x {_si(max(a.blocks.values()), 'B')} "
                     f"({_si(max(a.block_inputs.values()), 'B')} each when checkpointed), "
                     f"{_si(a.outside, 'B')} outside them, the logits and fp32 cross-entropy "
                     f"{_si(a.logits + a.loss_kept + a.loss_grads, 'B')}")
    mixed = plan.precision != "fp32"
    if any(r.strategy == "ddp" for r in plan.rows):
        notes.append("ddp: each GPU holds all the fp32 weights, gradients and AdamW moments"
                     + (f", and autocast's 16-bit copies of the {_count(plan.autocast_copy_params)} weights of "
                        "matrix products (kept for the backward pass)" if mixed else ""))
    if any(r.strategy == "fsdp" for r in plan.rows):
        root = plan.block_params.get(None, 0)
        largest = max((v for k, v in plan.block_params.items() if k is not None), default=0)
        need = plan.min_fsdp_gpus
        said = {n: f"on {n} or more GPUs" if n else "on no number of GPUs" for n in need.values()}
        notes.append(f"fsdp: fully_shard per block; each GPU holds 1/{plan.gpus} of the fp32 weights, gradients "
                     f"and moments, plus the unsharded weights{' (bf16)' if mixed else ''} and gradients of the "
                     f"model outside the blocks ({_count(root)}) and of two blocks ({_count(largest)} each: one "
                     f"computing, one prefetched). It fits {said[need[False]]} of {_si(plan.gpu_memory, 'B')}; with "
                     f"activation checkpointing {said[need[True]]}.")
    notes.append("fits: yes within 90% of the GPU's memory (the rest: CUDA context, fragmentation, NCCL), "
                 "tight within 100%")
    out.append("")
    for note in notes:
        out += textwrap.wrap(note, 100, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(out)


def _precision(precision: str) -> str:
    return "fp32" if precision == "fp32" else f"{precision} autocast"
