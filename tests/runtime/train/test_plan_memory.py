"""`lmspec plan`'s memory estimate against PyTorch: the graph walk against the tensors autograd really
keeps, and the whole estimate (weights + gradients + AdamW state + activations) against the peak of
memory allocated while a small model trains on CPU, with and without activation checkpointing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from lmspec.compiler.plan import activations, make_plan

ROOT = Path(__file__).resolve().parents[3]


def _kept_by_autograd(model, tokens, precision="fp32"):
    """Bytes of the distinct storages autograd saves for backward in one training forward and loss,
    parameters left out (they are not activations)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    targets = torch.roll(tokens, -1, dims=1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
    return sum(kept.values())


@pytest.mark.parametrize("name, overrides", [
    ("gpt2", dict(layers=2, dim=64, heads=4, context=64, vocab=512, dropout=0.0)),
    ("tiny", dict(layers=2)),
    ("handwritten", {}),  # attention from matmul/softmax/causal_mask: the scores are kept
])
def test_the_graph_walk_counts_what_autograd_keeps(name, overrides):
    # fp32 on CPU, where these ops run the kernels the rules describe; three sequences of 48 tokens
    graph = load_spec(str(ROOT / "specs" / f"{name}.arch"), overrides)
    model = lower(graph).train()
    tokens = torch.randint(0, graph.outputs[0][1].shape[-1], (3, 48))
    a = activations(graph, 48, 3)
    scalar = 4  # cross-entropy's total weight, an fp32 scalar
    assert a.outside + sum(a.blocks.values()) + a.loss_kept + scalar == _kept_by_autograd(model, tokens)


# Trains in a fresh process (one thread) under the profiler, whose memory events carry the CPU
# allocator's running total: the peak of that total, from before the model exists, is the peak of
# weights + gradients + AdamW state + activations + temporaries. Under torchrun (2 ranks) the model
# is wrapped as runtime/train/loop.py wraps it, takes two steps (FSDP's buffers settle in the first), and
# rank 0 reports.
MEASURE = r"""
import gc, json, os, sys, tempfile
import torch, torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
torch.set_num_threads(1)
from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower

spec, overrides, batch, seq, modes, strategy = json.loads(sys.argv[1])
rank = int(os.environ.get("RANK", 0))
if strategy:
    import torch.distributed as dist
    dist.init_process_group("gloo")
graph = load_spec(spec, overrides)
vocab = graph.outputs[0][1].shape[-1]
gen = torch.Generator().manual_seed(rank)
x, y = (torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(2))


def peak(checkpointing):
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = lower(graph).train()
        if checkpointing:
            from lmspec.compiler.checkpointing import checkpoint_blocks
            checkpoint_blocks(model)
        forward = model
        if strategy == "fsdp":
            from lmspec.runtime.distributed.fsdp import shard_model
            shard_model(model)
        elif strategy == "ddp":
            forward = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():  # a first step on zero gradients creates AdamW's state, so that
            p.grad = torch.zeros_like(p)  # the step measured runs as every step after the first does
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(2 if strategy else 1):
            logits = forward(x)  # a training step as runtime/train/loop.py takes it
            loss = F.cross_entropy(logits.reshape(-1, vocab).float(), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del logits, loss
    if rank:
        return None
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: e["ts"])  # the trace lists them by thread, not in time order
    memory = [e["args"] for e in memory]
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]  # the allocator's total before the first
    return max(m["Total Allocated"] for m in memory) - before


peaks = {str(mode): peak(mode) for mode in modes}
if rank == 0:
    print(json.dumps(peaks))
"""


def _measure(spec, overrides, batch, seq, modes, strategy=None, tmp_path=None):
    argument = json.dumps([spec, overrides, batch, seq, modes, strategy])
    if strategy:
        script = tmp_path / "measure.py"
        script.write_text(MEASURE)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               argument]
    else:
        cmd = [sys.executable, "-c", MEASURE, argument]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    return {mode == "True": v for mode, v in json.loads(line).items()}


def _can_checkpoint() -> bool:
    try:
        from lmspec.compiler.checkpointing import checkpoint_blocks  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name, overrides", [
    ("gpt2", dict(layers=4, dim=256, heads=4, context=256, vocab=4096)),  # LayerNorm, GELU, dropout 0.1
    ("llama3.2-1b", dict(layers=4, dim=256, heads=4, kv_heads=2, head_dim=64, ffn=512, vocab=4096)),  # GQA, RoPE
])
def test_plan_is_within_15_percent_of_the_measured_peak(name, overrides):
    batch, seq = 8, 256
    spec = str(ROOT / "specs" / f"{name}.arch")
    modes = [False, True] if _can_checkpoint() else [False]
    measured = _measure(spec, overrides, batch, seq, modes)
    plan = make_plan(load_spec(spec, overrides), gpus=1, seq=seq, micro_batch=batch, precision="fp32",
                     strategies=("ddp",))
    estimated = {r.checkpointing: r.total for r in plan.rows}
    for mode in modes:
        ratio = estimated[mode] / measured[mode]
        print(f"{name} checkpointing={mode}: measured {measured[mode] / 1e6:.1f} MB, "
              f"plan {estimated[mode] / 1e6:.1f} MB ({ratio - 1:+.1%})")
        assert 0.85 <= ratio <= 1.15, (mode, measured[mode], estimated[mode])
    if True in measured:
        assert measured[True] < 0.7 * measured[False]  # checkpointing does save what plan says it saves


# DDP's memory is one process's plus its buckets (checked above); FSDP's is the new arithmetic. Both
# start two processes: slow (the one-process checks run by default)
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow),
                                      pytest.param("fsdp", marks=pytest.mark.slow)])
def test_plan_is_within_15_percent_of_the_measured_peak_on_two_ranks(strategy, tmp_path):
    name, overrides = "gpt2", dict(layers=4, dim=256, heads=4, context=256, vocab=4096)
    batch, seq = 8, 256
    spec = str(ROOT / "specs" / f"{name}.arch")
    measured = _measure(spec, overrides, batch, seq, [False, True], strategy, tmp_path)
    plan = make_plan(load_spec(spec, overrides), gpus=2, seq=seq, micro_batch=batch, precision="fp32",
                     strategies=(strategy,))
    for row in plan.rows:
        ratio = row.total / measured[row.checkpointing]
        print(f"{strategy} checkpointing={row.checkpointing}: measured {measured[row.checkpointing] / 1e6:.1f} MB, "
              f"plan {row.total / 1e6:.1f} MB ({ratio - 1:+.1%})")
        assert 0.85 <= ratio <= 1.15, (row.checkpointing, measured[row.checkpointing], row.total)
