"""`lmspec plan`: what training a spec needs (parameters, FLOPs, compute, time, memory per GPU under
DDP and FSDP, and host memory under FSDP with CPU offload), read off its graph. Like `check` and `info`,
it never imports torch."""
from __future__ import annotations

import argparse
import json
import math
import textwrap

from lmspec.compiler.plan import HEADROOM, parse_bytes, parse_count, parse_flops
from lmspec.runtime.cli.numbers import AT_LEAST_0, AT_LEAST_1, PROBABILITY, Quantity
from lmspec.runtime.cli.options import add_override_options, cli_overrides
from lmspec.runtime.cli.verb import Verb
from lmspec.runtime.train.context import check_seq_fits


def _bandwidth(text: str) -> float:
    """'450GB/s', '50GB/s', '50GB' (bytes per second, per GPU, one direction)."""
    size = text.strip()
    try:
        return parse_bytes(size[:-2] if size.lower().endswith("/s") else size)
    except ValueError:
        raise ValueError(f"{text!r} is not a bandwidth: e.g. 450GB/s (10^9 bytes a second) or 50GiB/s") from None


BYTES = Quantity(parse_bytes, "memory size")
COUNT = Quantity(parse_count, "count")
FLOPS = Quantity(parse_flops, "FLOP count")
BANDWIDTH = Quantity(_bandwidth, "bandwidth")


def plan_options(p) -> None:
    """`lmspec plan`'s options."""
    p.add_argument("spec")
    p.add_argument("--gpus", type=AT_LEAST_1, default=1, help="GPUs to train on (default: 1)")
    p.add_argument("--gpu-memory", type=BYTES, default="80GB",
                   help="memory of one GPU: 80GB (10^9 bytes), 80GiB (2^30 bytes)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=COUNT, help="tokens to train on: 15T, 300B, 2e12")
    budget.add_argument("--compute", type=FLOPS, help="FLOPs to spend: 1e24, 6e23")
    p.add_argument("--seq", type=AT_LEAST_1, help="training sequence length (default: the context, at most 4096)")
    p.add_argument("--micro-batch", type=AT_LEAST_1, default=1, help="sequences per GPU per forward pass (default: 1)")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "both"], default="both",
                    help="data parallelism to show; fsdp includes FSDP with CPU offload in the layouts "
                         "(default: both)")
    p.add_argument("--global-batch", type=AT_LEAST_1,
                    help="sequences per optimizer step for the 3-D layouts (default: 8 x --gpus x --micro-batch)")
    p.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b", help="pipeline schedule (default: 1f1b)")
    p.add_argument("--sequence-parallel", action="store_true",
                    help="tensor-parallel layouts also split the activations at block boundaries")
    p.add_argument("--gpus-per-node", type=AT_LEAST_1, default=8,
                   help="GPUs per node; tp stays within one (default: 8)")
    p.add_argument("--nvlink-bandwidth", type=BANDWIDTH, default="450GB/s",
                    help="per GPU per direction within a node (default: 450GB/s, H100 SXM NVLink)")
    p.add_argument("--network-bandwidth", type=BANDWIDTH, default="50GB/s",
                    help="per GPU between nodes (default: 50GB/s, one 400 Gb/s InfiniBand NIC per GPU)")
    p.add_argument("--host-memory", type=BYTES, default="2TB",
                    help="host memory per node, for the CPU-offload layouts (default: 2TB, a DGX H100's)")
    p.add_argument("--pcie-bandwidth", type=BANDWIDTH, default="50GB/s",
                    help="per GPU per direction to the host, for the CPU-offload layouts "
                         "(default: 50GB/s, PCIe Gen5 x16)")
    p.add_argument("--layouts", type=AT_LEAST_0, default=8, help="fitting layouts to list (default: 8; 0: none)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="fp32, or bf16/fp16 autocast (fp32 master weights and gradients)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                    help="show only the rows with (or --no-…: without) checkpointing per block (default: both)")
    p.add_argument("--mfu", type=PROBABILITY, default=0.4,
                   help="model FLOPs utilisation to assume, a fraction of the peak (default: 0.4)")
    p.add_argument("--gpu-flops", type=FLOPS, default="989e12",
                    help="peak FLOP/s of one GPU (default: 989e12, H100 SXM dense bf16; 989T also works)")
    p.add_argument("--format", choices=["human", "json"], default="human")
    add_override_options(p)


def cmd_plan(args) -> int:
    from lmspec.compiler import load_spec
    from lmspec.compiler.plan import LAYOUT_STRATEGIES, make_plan

    graph = load_spec(args.spec, cli_overrides(args.set), args.model)
    check_seq_fits(args.seq, graph)
    seq = args.seq or min(graph.context or 4096, 4096)
    # FSDP with CPU offload is FSDP (`lmspec train --strategy fsdp --cpu-offload`): it comes with fsdp
    strategies = {"both": LAYOUT_STRATEGIES, "fsdp": ("fsdp", "offload")}.get(args.strategy, (args.strategy,))
    ckpt = (False, True) if args.activation_checkpointing is None else (args.activation_checkpointing,)
    plan = make_plan(graph, gpus=args.gpus, gpu_memory=args.gpu_memory, seq=seq, micro_batch=args.micro_batch,
                     precision=args.precision, tokens=args.tokens, compute=args.compute, mfu=args.mfu,
                     gpu_flops=args.gpu_flops, strategies=strategies, checkpointing=ckpt,
                     global_batch=args.global_batch, schedule=args.schedule,
                     sequence_parallel=args.sequence_parallel, gpus_per_node=args.gpus_per_node,
                     nvlink_bandwidth=args.nvlink_bandwidth, network_bandwidth=args.network_bandwidth,
                     host_memory=args.host_memory, pcie_bandwidth=args.pcie_bandwidth)
    if args.format == "json":
        print(json.dumps(to_json(plan), indent=2))
    else:
        print(render(plan))
        if plan.gpus > 1 and args.layouts:
            print("\n" + render_layouts(plan, args.layouts))
    return 0


PLAN = Verb(
    "plan",
    ("What training a spec needs: parameters, FLOPs, compute, time, and memory per GPU under DDP and FSDP, from"
     " its graph."),
    plan_options, cmd_plan,
    examples="""examples:
  lmspec plan specs/llama3.1-8b.arch --gpus 8 --gpu-memory 80GB --seq 4096 --precision bf16
  lmspec plan specs/llama3.1-70b.arch --gpus 64 --gpu-memory 80GB --tokens 15T --precision bf16 --strategy fsdp
  lmspec plan specs/gpt2.arch --gpus 1 --gpu-memory 24GiB --compute 1e19 --micro-batch 8 --format json""",
)


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
        "layouts": _layouts_json(plan),
    }


def _layout_json(x, gpu_memory: float) -> dict:
    return {"dp": x.dp, "tp": x.tp, "pp": x.pp, "data_parallel": x.strategy,
            "activation_checkpointing": x.checkpointing, "sequence_parallel": x.sequence_parallel,
            "micro_batches": x.micro_batches, "worst_stage": x.stage,
            "memory_bytes_per_gpu": {"weights": x.weights, "gradients": x.gradients, "optimizer": x.optimizer,
                                     "activations": x.activations, "total": x.total},
            "host_memory_bytes": {"per_gpu": x.host, "per_node": x.host_node},
            "fits": x.fits(gpu_memory), "comm_bytes_per_gpu_per_step": dict(x.comm), "links": dict(x.links),
            "bubble": x.bubble, "compute_seconds": x.compute_s, "exposed_seconds": dict(x.times),
            "step_seconds": x.step_s}


def _layouts_json(plan) -> dict:
    grid = plan.grid
    return {
        "assumptions": {"global_batch": grid.global_batch, "schedule": grid.schedule,
                        "gpus_per_node": grid.gpus_per_node, "max_tp": grid.max_tp,
                        "nvlink_bandwidth": grid.nvlink_bandwidth, "network_bandwidth": grid.network_bandwidth,
                        "host_memory_per_node": grid.host_memory, "pcie_bandwidth": grid.pcie_bandwidth,
                        "host_optimizer_bandwidth": grid.host_optimizer_bandwidth,
                        "mfu": plan.mfu, "gpu_flops": plan.gpu_flops, "tp_divides": grid.tp_limits},
        "all": [_layout_json(x, plan.gpu_memory) for x in grid.layouts],  # fastest first
        "fewest_gpus_that_fit": None if plan.grid_more is None else {
            "gpus": plan.grid_more[0], "fastest": _layout_json(plan.grid_more[1], plan.gpu_memory)},
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


def _offload_unfit(offload, host_memory: float, gpu_memory: float) -> str:
    """Why no offload layout fits either: the host memory, or what stays on the GPU."""
    host = min(x.host_node for x in offload)
    gpu = min(x.total for x in offload)
    if host > HEADROOM * host_memory:
        return (f", and offloaded to host memory (offload layouts) they take {host / 1e9:,.0f} GB per node at "
                f"least, more than 90% of its {_si(host_memory, 'B')} (--host-memory)")
    if gpu > HEADROOM * gpu_memory:
        return (f"; offloaded to host memory (offload layouts), what stays on each GPU (the unsharded root and "
                f"two blocks, the activations) is still {gpu / 1e9:,.1f} GB at least, more than 90% of "
                f"{_si(gpu_memory, 'B')}")
    return "; offloaded to host memory (offload layouts), none fits both its GPU and its host memory"


def _offload_note(offload, grid, gpu_memory: float) -> str:
    fit = [x for x in offload if x.fits(gpu_memory) == "yes"]
    x = (fit or offload)[0]  # the fastest (that fits)
    return (f"offload: FSDP2 with CPU offload (`lmspec train --strategy fsdp --cpu-offload`; pp = 1 only): the "
            f"sharded fp32 weights, gradients and AdamW moments live in host memory, 16 bytes x parameters / dp "
            f"per GPU ({x.host_node / 1e9:,.0f} GB per node for {x.name}, of the node's "
            f"{_si(grid.host_memory, 'B')}, --host-memory); each GPU keeps the unsharded root and two blocks and "
            f"the activations. Each micro-batch copies the fp32 weight shard to the GPU twice (forward, backward) "
            f"and the fp32 gradient shard back over PCIe at {grid.pcie_bandwidth / 1e9:,.0f} GB/s per GPU "
            f"(--pcie-bandwidth): {x.comm['pcie'] / 1e9:,.0f} GB per GPU per step, overlapping compute like "
            f"FSDP's traffic (only the excess adds to the step); AdamW steps on the CPU, not overlapped (28 bytes "
            f"of host memory traffic per parameter at {grid.host_optimizer_bandwidth / 1e9:,.0f} GB/s per GPU): "
            f"{x.times['offload']:,.1f} s per step.")


def _precision(precision: str) -> str:
    return "fp32" if precision == "fp32" else f"{precision} autocast"


def _layout_row(x, gpu_memory: float, tokens: float, scale: float) -> str:
    comm = "".join(f"{x.comm[k] / scale:>8,.0f}" for k in ("dp", "tp", "pp"))
    data = x.strategy + ("+sp" if x.sequence_parallel else "")
    step = f"{x.step_s:,.2f} s" if x.step_s >= 0.1 else f"{x.step_s * 1e3:.3g} ms"
    return (f"  {x.dp:>3}{x.tp:>4}{x.pp:>4}  {data:<11}{'per block' if x.checkpointing else 'no':<11}"
            f"{x.micro_batches:>5}{x.total / scale:>9,.1f}  {x.fits(gpu_memory):<6}{comm}"
            f"{x.bubble:>8.1%}{step:>11}{_si(tokens / x.step_s):>11}")


_FITS = {"yes": "fits", "tight": "tight: within 100%, not 90%", "no": "does not fit"}


def render_layouts(plan, shown: int = 8) -> str:
    """The 3-D layouts section: the fastest that fit, the fastest that do not, and the assumptions."""
    grid, mem = plan.grid, plan.gpu_memory
    tokens = grid.global_batch * plan.seq
    unit, scale = ("GB", 1e9) if max((x.total for x in grid.layouts), default=0) >= 1e9 else ("MB", 1e6)
    fit = [x for x in grid.layouts if x.fits(mem) == "yes"]
    unfit = [x for x in grid.layouts if x.fits(mem) != "yes"]
    out = [f"layouts on {plan.gpus} GPUs ({grid.gpus_per_node} per node), data x tensor x pipeline parallel, "
           f"fastest first:",
           f"  global batch {grid.global_batch} x {plan.seq} tokens per step, "
           f"{'1F1B' if grid.schedule == '1f1b' else 'GPipe'} schedule, {_precision(plan.precision)}, AdamW",
           f"  {'dp':>3}{'tp':>4}{'pp':>4}  {'data':<11}{'checkpoint':<11}{'micro':>5}{unit + '/GPU':>9}  {'fits':<6}"
           f"{'sent ' + unit + '/step per GPU':>24}{'bubble':>8}{'step':>11}{'tokens/s':>11}",
           f"  {'':>11}  {'':<11}{'':<11}{'batches':>5}{'':>9}  {'':<6}{'dp':>8}{'tp':>8}{'pp':>8}"]
    if fit:
        out += [_layout_row(x, mem, tokens, scale) for x in fit[:shown]]
        if len(fit) > shown:
            out.append(f"  ... and {len(fit) - shown} more that fit (--format json lists them all)")
    else:
        out.append(f"  none fits in {_si(plan.gpu_memory, 'B')}")
    if unfit:
        out += ["  the fastest that do not fit:"] + [_layout_row(x, mem, tokens, scale) for x in unfit[:3]]
    notes = []
    ckpt = max((x.checkpointing for x in grid.layouts), default=False)  # with checkpointing where shown
    pure = {x.strategy: x for x in grid.layouts if x.tp == x.pp == 1 and x.checkpointing == ckpt}
    if pure:
        said = ", ".join(f"{k} {v.total / scale:,.1f} {unit}"
                         + (f" + {v.host_node / 1e9:,.0f} GB of host memory per node" if v.host else "")
                         + f" ({_FITS[v.fits(mem)]})" for k, v in sorted(pure.items()))
        notes.append(f"pure data parallel (dp={plan.gpus}, {'with' if ckpt else 'without'} checkpointing): {said}.")
    offload = [x for x in grid.layouts if x.strategy == "offload"]
    if not fit:
        per_gpu = 16 * plan.parameters / plan.gpus
        more = plan.grid_more
        notes.append(f"nothing fits on {plan.gpus} GPUs: the fp32 weights and gradients and the two AdamW "
                     f"moments alone are 16 bytes x {_count(plan.parameters)} parameters = "
                     f"{16 * plan.parameters / 1e9:,.0f} GB, {per_gpu / 1e9:,.1f} GB per GPU however they are split"
                     + (_offload_unfit(offload, grid.host_memory, mem) if offload else "") + "."
                     + (f" The fewest GPUs (doubling) on which a layout fits: {more[0]}; the fastest there is "
                        f"dp={more[1].dp} tp={more[1].tp} pp={more[1].pp} {more[1].strategy}"
                        f"{' with' if more[1].checkpointing else ' without'} checkpointing, "
                        f"{more[1].total / 1e9:,.1f} GB per GPU, {more[1].step_s:,.1f} s per step "
                        f"(--gpus {more[0]})." if more else ""))
    if offload:
        notes.append(_offload_note(offload, grid, mem))
    lim = grid.tp_limits
    need = [f"{', '.join(map(str, lim[k]))} {label}" for k, label in
            (("heads", "heads"), ("kv_heads", "kv heads"), ("hidden", "MLP hidden")) if lim[k]]
    notes.append(f"tp (Megatron: q/k/v and MLP up/gate column-parallel, out and down row-parallel, embedding "
                 f"and head vocab-parallel, norms replicated) divides {' and '.join(need) or 'the GPUs'}, is a "
                 f"power of 2 and at most {grid.max_tp} (one node); pp splits the blocks into contiguous stages "
                 f"(embedding on the first, head on the last) and needs micro-batches >= pp; memory is the "
                 f"worst GPU's (stage 0 under 1F1B: pp micro-batches in flight).")
    notes.append(f"step = micro-batches x the slowest stage's time per micro-batch (compute at {plan.mfu:.0%} MFU "
                 f"of {_si(plan.gpu_flops, 'FLOP/s')}, recompute included, + tp and pp traffic, not overlapped) "
                 f"x (1 + (pp-1)/micro-batches) + data-parallel traffic "
                 + ("(and offload's PCIe copies) not hidden behind compute (+ offload's CPU AdamW step). "
                    if offload else "not hidden behind compute. ")
                 + f"Bandwidth per GPU per direction: tp over NVLink {grid.nvlink_bandwidth / 1e9:,.0f} GB/s; dp and pp "
                 f"over NVLink within a node, {grid.network_bandwidth / 1e9:,.0f} GB/s between nodes "
                 f"(--nvlink-bandwidth, --network-bandwidth, --gpus-per-node).")
    out.append("")
    for note in notes:
        out += textwrap.wrap(note, 100, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(out)
