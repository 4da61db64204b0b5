"""LoRA finetuning against full finetuning of the same model: peak memory and median step time.

One GPT-2-shaped model, the same starting weights, the same batches of real text (the-verdict.txt,
GPT-2 BPE tokens), next-token loss, AdamW. Full finetuning trains every weight; LoRA (rank 8 on
attn.qkv, attn.proj, mlp.*, built by the compiler's rewrite) trains only the adapters. Step times:
the two take turns step by step in one process (as bench/train_step.py does), so drift in the
machine's speed hits both; the medians are compared. Peak memory: each mode trains in a fresh
process under torch.profiler, whose memory events carry the CPU allocator's running total (as
tests/runtime/train/test_plan_memory.py measures it): weights + gradients + AdamW state + activations +
temporaries, from before the model exists. Prints ratios; record them in bench/RESULTS.md.

    python bench/finetune.py [--layers 4 --dim 384 --heads 6 --seq 128 --batch 4 --rank 8 --steps 20]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's tokenize, which torch imports.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmspec.compiler import load_spec  # noqa: E402
from lmspec.compiler.lower import lower  # noqa: E402
from lmspec.compiler.rewrites import apply_rewrites  # noqa: E402
from lmspec.runtime.finetune.lora import mark_trainable  # noqa: E402
from lmspec.runtime.data.tokenizer import FileTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TARGETS = ["attn.qkv", "attn.proj", "mlp.*"]


def build(args, mode: str):
    """(model, graph) for `mode` ("full" or "lora"), from the same seed: identical base weights."""
    sizes = dict(vocab=args.vocab, context=args.seq, dim=args.dim, heads=args.heads, layers=args.layers,
                 dropout=0.0)
    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"), sizes)
    if mode == "lora":
        graph = apply_rewrites(graph, [{"kind": "lora", "rank": args.rank, "alpha": 2.0 * args.rank,
                                        "targets": TARGETS}])
    return lower(graph, seed=0).train(), graph


class Finetuner:
    """One model with AdamW over the parameters its mode trains."""

    def __init__(self, args, mode: str):
        self.model, graph = build(args, mode)
        if mode == "lora":
            self.trained = mark_trainable(self.model, graph)
        else:
            self.trained = sum(p.numel() for p in self.model.parameters())
        self.total = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr)
        self.losses: list[float] = []

    def step(self, x, y) -> float:
        """Seconds for one training step."""
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        elapsed = time.perf_counter() - start
        self.losses.append(loss.item())
        return elapsed


def batches(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of the-verdict.txt, [batch, seq] inputs and their next tokens."""
    tokenizer = FileTokenizer.from_path(DATA / "gpt2-tokenizer")
    ids = torch.tensor(tokenizer.encode((DATA / "the-verdict.txt").read_text(encoding="utf-8")))
    per_batch = args.batch * (args.seq + 1)
    out = []
    for start in range(0, len(ids) - per_batch + 1, per_batch):
        t = ids[start:start + per_batch].view(args.batch, args.seq + 1)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def peak_bytes(args, mode: str) -> int:
    """The allocator's peak over building the model and taking one step (after AdamW's state exists)."""
    from torch.profiler import ProfilerActivity, profile

    x, y = batches(args)[0]
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tuner = Finetuner(args, mode)
        for p in tuner.model.parameters():  # a first step on zero gradients creates AdamW's state, so that
            if p.requires_grad:  # the step measured runs as every step after the first does
                p.grad = torch.zeros_like(p)
        tuner.opt.step()
        tuner.opt.zero_grad(set_to_none=True)
        tuner.step(x, y)
    # The allocator's memory events, alloc > 0 and free < 0 bytes: their running sum from the start is
    # what is allocated since then, and its maximum is the peak.
    memory = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    allocated = peak = 0
    for event in memory:
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak


def peak_in_fresh_process(argv: list[str], mode: str) -> int:
    """peak_bytes in a new interpreter, so that neither mode sees the other's freed memory."""
    out = subprocess.run([sys.executable, __file__, *argv, "--peak-of", mode], check=True, capture_output=True,
                         text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode, alternating")
    ap.add_argument("--peak-of", choices=("full", "lora"), help=argparse.SUPPRESS)  # the child process's job
    args = ap.parse_args()
    if args.peak_of:
        print(peak_bytes(args, args.peak_of))
        return

    argv = [a for a in sys.argv[1:]]
    peaks = {mode: peak_in_fresh_process(argv, mode) for mode in ("full", "lora")}
    data = batches(args)
    tuners = {mode: Finetuner(args, mode) for mode in ("full", "lora")}
    for t in tuners.values():  # one warm-up step each
        t.step(*data[0])
    times: dict[str, list[float]] = {mode: [] for mode in tuners}
    for i in range(args.steps):
        for mode, t in tuners.items():
            times[mode].append(t.step(*data[(i + 1) % len(data)]))

    full, lora = tuners["full"], tuners["lora"]
    median = {mode: statistics.median(ts) for mode, ts in times.items()}
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: GPT-2 shape, {args.layers} layers, dim {args.dim}, {args.heads} heads, vocab {args.vocab}, "
          f"{full.total:,} parameters; batch {args.batch} x seq {args.seq} of the-verdict.txt (GPT-2 BPE), "
          f"{len(data)} batches, AdamW lr {args.lr}")
    print(f"LoRA rank {args.rank} on {', '.join(TARGETS)}: trains {lora.trained:,} parameters "
          f"({lora.trained / lora.total:.2%} of {lora.total:,})")
    for mode, t in tuners.items():
        print(f"{mode:4} finetuning: peak memory {peaks[mode] / 2**20:8.1f} MiB, median step "
              f"{median[mode] * 1e3:7.1f} ms, loss {t.losses[0]:.3f} -> {t.losses[-1]:.3f} over {len(t.losses)} steps")
    print(f"ratio LoRA / full: peak memory {peaks['lora'] / peaks['full']:.3f}, "
          f"median step time {median['lora'] / median['full']:.3f}")


if __name__ == "__main__":
    main()
