"""Training tokens/s of the lmspec-compiled GPT against a hand-written eager GPT (nanoGPT-style).

Same config, same weights, same batches, same process; the two are timed in alternating rounds so
that drift in the machine's speed hits both. Also times `lmspec check` on a 96-layer spec in a cold
process. Prints ratios; record them in bench/RESULTS.md.

    python bench/train_step.py [--layers 6 --dim 384 --heads 6 --context 256 --batch 8 --steps 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gpt2_names import copy_into_reference  # noqa: E402
from reference_gpt import GPT, GPTConfig  # noqa: E402

from lmspec.compiler import load_spec, lower  # noqa: E402


def time_steps(model, batches, steps: int) -> float:
    """Seconds for `steps` AdamW training steps (after one warm-up step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step(x, y):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(*batches[0])
    start = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return time.perf_counter() - start


def check_seconds(layers: int) -> float:
    spec = (ROOT / "specs" / "gpt2.arch").read_text().replace("layers = 12", f"layers = {layers}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"gpt2-{layers}.arch")
        Path(path).write_text(spec)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", "check", path], check=True,
                       capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)

    sizes = dict(vocab=args.vocab, context=args.context, dim=args.dim, heads=args.heads, layers=args.layers)
    ours = lower(load_spec(str(ROOT / "specs" / "gpt2.arch"), {**sizes, "dropout": 0.0}), seed=0)
    reference = GPT(GPTConfig(**sizes, gelu_approximate="tanh"))
    copy_into_reference(ours, reference)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        t = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=gen)
        batches.append((t[:, :-1], t[:, 1:]))
    tokens = args.batch * args.context * args.steps

    ours_s, ref_s = [], []
    for _ in range(args.rounds):
        ref_s.append(time_steps(reference, batches, args.steps))
        ours_s.append(time_steps(ours, batches, args.steps))
    ours_tps, ref_tps = tokens / statistics.median(ours_s), tokens / statistics.median(ref_s)

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: GPT-2 shape, {args.layers} layers, dim {args.dim}, {args.heads} heads, context {args.context}, "
          f"vocab {args.vocab}, batch {args.batch}")
    print(f"hand-written eager GPT : {ref_tps:10.0f} tokens/s")
    print(f"lmspec compiled (fx)   : {ours_tps:10.0f} tokens/s")
    print(f"ratio lmspec / eager   : {ours_tps / ref_tps:.3f}  (target >= 1.0)")
    check = min(check_seconds(96) for _ in range(3))
    print(f"lmspec check, 96-layer GPT-2, cold process: {check:.3f} s  (target < 1 s)")


if __name__ == "__main__":
    main()
