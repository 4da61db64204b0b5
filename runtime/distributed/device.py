"""Where a torch verb runs: `--device auto|cpu|cuda|cuda:N` resolved and checked before any work,
the GPU settings that make it fast, and how tensors travel to it.

`auto` (the default) is the GPU when CUDA is available, else the CPU. Under torchrun every rank
takes `cuda:LOCAL_RANK` (a node runs at most one rank per GPU). A device that is not there is a
one-line DeviceError naming what there is, raised before a model or a byte of data is loaded.
"""
from __future__ import annotations

import os
import re

from lmspec.runtime.errors import DeviceError, UsageError  # noqa: F401  (raised here, and imported from here)

DEVICE_HELP = ("where the model runs: auto (default: the GPU when CUDA is available, else the CPU), cpu, "
               "cuda, or cuda:N; under torchrun each rank takes cuda:LOCAL_RANK")


def add_device_option(parser) -> None:
    """--device, for every verb that runs a model in torch."""
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)


def _torchrun_local() -> tuple[int, int] | None:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) when started by torchrun with several ranks, else None."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))
    return local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))


def _no_cuda_reason(torch) -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return "no GPU is visible (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES)"


def resolve_device(name: str | None = "auto"):
    """The torch.device `name` means here, checked, made current and set up for speed (TF32
    matrix products on a GPU); raises DeviceError if it is not there."""
    import torch

    name = (name or "auto").strip().lower()
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", name)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available: {_no_cuda_reason(torch)}; use --device cpu")
    count = torch.cuda.device_count()
    local = _torchrun_local()
    if local is not None:
        local_rank, local_ranks = local
        if index is not None and local_ranks > 1:
            raise DeviceError(f"--device {name}: under torchrun each of the {local_ranks} ranks on a node takes "
                              f"cuda:LOCAL_RANK; give --device cuda (or auto)")
        if index is None:
            if local_ranks > count or local_rank >= count:
                raise DeviceError(f"{local_ranks} ranks per node but this node has {count} GPU"
                                  f"{'s' if count != 1 else ''}: run torchrun --nproc-per-node {count} "
                                  f"(or fewer), one rank per GPU")
            index = local_rank
    index = int(index or 0)
    if index >= count:
        raise DeviceError(f"--device cuda:{index}: this machine has {count} GPU{'s' if count != 1 else ''} "
                          f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    torch.cuda.set_device(index)
    # fp32 matrix products on tensor cores (TF32: 10-bit mantissa inputs, fp32 accumulation), as
    # every GPU training recipe sets; CPU runs are untouched, so they stay bit for bit as they were
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", index)


def to_device(tensor, device):
    """`tensor` (a CPU batch) on `device`: to a GPU through pinned memory, asynchronously, so the copy
    overlaps the work already queued; on the CPU, the tensor itself."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def device_name(device) -> str:
    """What a device is, for people: 'NVIDIA H100 80GB HBM3 (cuda:0)', 'cpu'."""
    if device.type == "cuda":
        import torch
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return str(device)
