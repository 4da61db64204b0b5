"""How well a run uses its hardware: model FLOPs utilisation against the device's peak, peak memory,
and what `lmspec plan` predicts this run's memory to be.

MFU follows PaLM's definition: the model's training FLOPs per token (3 x the forward FLOPs the
graph counts, attention's scores included; recomputation under activation checkpointing is not
counted) times tokens per second, over the peak dense bf16 FLOP/s of the devices the run uses.
"""
from __future__ import annotations

import resource
import sys

# Dense (not 2:4-sparse) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s per GPU;
# the longest name contained in the device's name wins ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.4,
    "GH200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM: "NVIDIA H100 80GB HBM3"
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 366.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
}


def peak_flops(device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override_tflops` (--peak-tflops) if given, else the table's
    entry for a GPU; None for a CPU or a GPU the table does not know."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    import torch
    name = torch.cuda.get_device_name(device)
    known = [key for key in PEAK_BF16_TFLOPS if key in name]
    return PEAK_BF16_TFLOPS[max(known, key=len)] * 1e12 if known else None


def training_flops_per_token(graph, seq: int) -> float:
    """Forward + backward FLOPs per token: 3 x the forward's (the backward computes two products
    for each of the forward's)."""
    from lmspec.compiler.analysis import flops_per_token
    return 3 * flops_per_token(graph, seq)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, devices: int) -> float | None:
    """The fraction of `devices` x `peak` FLOP/s the run achieves, or None without a peak."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * devices)


def peak_memory(device) -> int:
    """The most memory this process has held on `device`, in bytes: tensors allocated on a GPU (the
    caching allocator's high-water mark), or the resident set size on the CPU."""
    if device.type == "cuda":
        import torch
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux counts KiB, macOS bytes


def start_peak_memory(device) -> int | None:
    """Start measuring a run's peak memory: on a GPU, the allocator's high-water mark reset (None
    returned); on the CPU, the resident set size now (what Python, torch and earlier work hold before
    any tensor of the run exists, returned), with the high-water mark reset to it where Linux allows,
    so that peak_memory is this run's even in a process that held more before."""
    if device.type == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats(device)
        return None
    try:
        with open("/proc/self/clear_refs", "w") as control:
            control.write("5")  # 5: reset the peak resident set size (VmHWM, getrusage's ru_maxrss)
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux, or a kernel that refuses: the peak so far, which this run can only raise
        return peak_memory(device)


def device_capacity(device) -> int | None:
    """Bytes of memory the device has (a GPU's), None for the CPU."""
    if device.type != "cuda":
        return None
    import torch
    return int(torch.cuda.get_device_properties(device).total_memory)


def predicted_memory(graph, cfg, world_size: int, batch: int | None = None) -> float | None:
    """What `lmspec plan` predicts one device needs for this run (cfg: a resolved TrainConfig): the
    weights, gradients, AdamW state and activations of its layout, at `batch` sequences per rank
    (default cfg.batch). None when the plan does not cover the layout."""
    from lmspec.compiler.plan import activations, layouts

    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    dp = world_size // (tp * pp)
    batch = batch or cfg.batch
    micro_batches = (cfg.micro_batches or pp) if pp > 1 else cfg.grad_accum
    if batch % (micro_batches if pp > 1 else 1):
        return None
    micro = batch // micro_batches if pp > 1 else batch
    strategy = "offload" if cfg.cpu_offload else "fsdp" if cfg.strategy == "fsdp" and dp > 1 else "ddp"
    checkpointing = bool(cfg.activation_checkpointing)
    acts = activations(graph, cfg.seq, micro, cfg.precision)
    found = layouts(graph, acts, gpus=world_size, seq=cfg.seq, micro_batch=micro, precision=cfg.precision,
                    mfu=0.4, gpu_flops=1e15, global_batch=micro * micro_batches * dp, strategies=(strategy,),
                    checkpointing=(checkpointing,), gpus_per_node=world_size)
    match = [x for x in found.layouts if (x.dp, x.tp, x.pp) == (dp, tp, pp)]
    return match[0].total if match else None


def largest_fitting_batch(graph, cfg, world_size: int, capacity: float) -> int | None:
    """The most sequences per rank below cfg.batch that `lmspec plan` says fit in `capacity` bytes
    (with its headroom for the allocator), or None if not even one does."""
    from lmspec.compiler.plan import HEADROOM
    for batch in range(cfg.batch - 1, 0, -1):
        need = predicted_memory(graph, cfg, world_size, batch)
        if need is not None and need <= HEADROOM * capacity:
            return batch
    return None


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
