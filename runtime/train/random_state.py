"""Everything random a training run draws, saved with each checkpoint and restored on resume, so a
resumed run draws what an uninterrupted one would: torch's CPU and GPU generators (dropout), the
generator that picks batches, and fp16's loss scale."""
from __future__ import annotations

import sys

import torch

from lmspec.runtime.errors import CheckpointError


def rng_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def rng_states(generator: torch.Generator, device: torch.device, scaler=None) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state(), "batch_generator": generator.get_state()}
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(device)
    if scaler is not None and scaler.is_enabled():  # the loss scale is run state too: resume needs it
        state = scaler.state_dict()
        states["grad_scaler_scale"] = torch.tensor(state["scale"], dtype=torch.float64)
        states["grad_scaler_growth_tracker"] = torch.tensor(state["_growth_tracker"], dtype=torch.int64)
    return states


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device, path,
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
