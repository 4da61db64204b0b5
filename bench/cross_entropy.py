"""The training losses (runtime/train/loss.py) against F.cross_entropy on fp32 copies of the logits:
peak memory and time of the loss's forward and backward, for GPT-2-sized logits.

Three ways, each in a fresh child process on bf16 logits [tokens, vocab] (what the model makes under
bf16 autocast): `plain` F.cross_entropy(logits.float()), `chunked` (what eager runs train with) and
`compiled` (what --compile runs train with). Each runs once to warm up (the compiled one compiles
then), and is measured on its second run: the peak is the process's resident memory above what the
logits and their gradient take anyway (the high-water mark is reset between the runs), so what is
left is the loss's own. The three must agree (checked). Prints the ratios against `plain`; record
them in bench/RESULTS.md.

    python bench/cross_entropy.py [--tokens 8192 --vocab 50304 --rounds 3 --threads 1]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's `tokenize` (which torch imports): drop the folder.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402

WAYS = ("plain", "chunked", "compiled")


def _resident_peak() -> int:
    """The process's resident high-water mark in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_resident_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark drops to what is resident now


def child(way: str, tokens: int, vocab: int, threads: int) -> None:
    import time

    import torch
    import torch.nn.functional as F

    from lmspec.runtime.train.loss import compiled_next_token_loss, next_token_loss

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=gen).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    logits.grad = torch.zeros_like(logits)  # the gradient's own memory, held either way
    loss_fn = {"plain": lambda x, y: F.cross_entropy(x.float(), y), "chunked": next_token_loss,
               "compiled": compiled_next_token_loss()}[way]
    loss_fn(logits, targets).backward()  # the warm-up (and the compile)
    logits.grad.zero_()
    _reset_resident_peak()
    base = _resident_peak()
    start = time.perf_counter()
    loss = loss_fn(logits, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _resident_peak()
    print(json.dumps({"seconds": seconds, "extra": peak - base, "loss": loss.item(),
                      "grad_sum": float(logits.grad.float().abs().sum())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.vocab, args.threads)
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in runs:  # in turns: drift in the machine's speed hits every way
            done = subprocess.run([sys.executable, __file__, "--child", way, "--tokens", str(args.tokens),
                                   "--vocab", str(args.vocab), "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=True)
            runs[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
    a = runs["plain"][0]
    for way in ("chunked", "compiled"):
        b = runs[way][0]
        assert abs(a["loss"] - b["loss"]) < 1e-4 * a["loss"], (way, a, b)
        assert abs(a["grad_sum"] - b["grad_sum"]) < 1e-2 * a["grad_sum"], (way, a, b)
    seconds = {w: statistics.median(r["seconds"] for r in rs) for w, rs in runs.items()}
    extra = {w: statistics.median(r["extra"] for r in rs) for w, rs in runs.items()}
    logits_gb = args.tokens * args.vocab * 2 / 1e9
    print(f"bf16 logits [{args.tokens}, {args.vocab}] ({logits_gb:.2f} GB), loss forward + backward, "
          f"{args.threads} thread{'s' if args.threads > 1 else ''}, median of {args.rounds}:")
    for way in runs:
        print(f"  {way:>8}: {seconds[way]:6.3f} s, {extra[way] / 1e9:5.2f} GB beyond the logits and their gradient"
              + ("" if way == "plain" else f"  (vs plain: memory {extra[way] / extra['plain']:.2f}x, "
                                           f"time {seconds[way] / seconds['plain']:.2f}x)"))
    print(f"compiled / chunked: time {seconds['compiled'] / seconds['chunked']:.2f}x, "
          f"memory {extra['compiled'] / max(extra['chunked'], 1):.2f}x")


if __name__ == "__main__":
    main()
