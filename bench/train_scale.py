"""Training throughput on several ranks: 2-rank DDP and FSDP2 (torchrun, gloo) against 1 rank, on CPU.

Each configuration is a real `lmspec train` run (the embedded corpus, a GPT-2-shaped model) with
one CPU thread per rank, so 2 ranks use 2 cores where 1 rank uses 1; a third run gives the one
process both threads, the other way to use the same cores. The median tokens/s over the steps
after warm-up (metrics.jsonl, logged every step) is compared; scaling efficiency is the 2-rank
rate over twice the 1-rank rate. Runs take turns, `--rounds` times. The GPU half of issue 6's
benchmark (MFU with bf16 + torch.compile) is bench/gpu.py.

    python bench/train_scale.py [--layers 4 --dim 256 --context 256 --batch 8 --steps 30 --rounds 2]
"""
from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(args, out: Path, ranks: int, threads: int, strategy: str = "ddp") -> float:
    """Median tokens/s of one training run after its first 5 steps."""
    train = ["train", "specs/gpt2.arch", "--set", f"layers={args.layers}", "--set", f"dim={args.dim}",
             "--set", f"heads={args.dim // 64}", "--set", f"context={args.context}", "--set", "dropout=0.0",
             "--steps", str(args.steps), "--batch", str(args.batch), "--eval-batches", "0", "--ckpt-every", "0",
             "--sample-tokens", "0", "--no-progress", "--threads", str(threads), "--out", str(out),
             "--strategy", strategy]
    if ranks == 1:
        cmd = [sys.executable, "-m", "lmspec.runtime", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "lmspec.runtime", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r["step"] > 5]
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    configs = {"1 rank, 1 thread": (1, 1, "ddp"), "2 ranks (DDP), 1 thread each": (2, 1, "ddp"),
               "2 ranks (FSDP), 1 thread each": (2, 1, "fsdp"), "1 rank, 2 threads": (1, 2, "ddp")}
    rates = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, (ranks, threads, strategy)) in enumerate(configs.items()):
                rates[name].append(run(args, Path(tmp) / f"r{r}-{i}", ranks, threads, strategy))
    best = {name: statistics.median(v) for name, v in rates.items()}
    one, two = best["1 rank, 1 thread"], best["2 ranks (DDP), 1 thread each"]
    print(f"machine: {os.cpu_count()} CPUs; model: GPT-2 shape, {args.layers} layers, dim {args.dim}, "
          f"context {args.context}, batch {args.batch} per rank, {args.steps} steps, {args.rounds} rounds")
    for name, value in best.items():
        print(f"{name:32s}: {value:10,.0f} tokens/s")
    print(f"2-rank DDP / 1 rank: {two / one:.2f}x, scaling efficiency {two / (2 * one):.0%}")
    fsdp = best["2 ranks (FSDP), 1 thread each"]
    print(f"2-rank FSDP / 1 rank: {fsdp / one:.2f}x, scaling efficiency {fsdp / (2 * one):.0%}")
    print(f"2-rank DDP / 1 rank with 2 threads: {two / best['1 rank, 2 threads']:.2f}x")


if __name__ == "__main__":
    main()
