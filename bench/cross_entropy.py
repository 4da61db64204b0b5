"""The chunked training loss (runtime/train/loss.py) against F.cross_entropy on fp32 copies of the
logits: peak memory and time of the loss's forward and backward, for GPT-2-sized logits.

Each way runs in a fresh child process on bf16 logits [tokens, vocab] (what the model makes under
bf16 autocast); the peak is the process's resident memory above what the logits and their gradient
take anyway, so what is left is the loss's own. Both ways must agree (checked). Prints the ratios;
record them in bench/RESULTS.md.

    python bench/cross_entropy.py [--tokens 8192 --vocab 50304 --rounds 3]
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


def child(way: str, tokens: int, vocab: int) -> None:
    import resource
    import time

    import torch
    import torch.nn.functional as F

    from lmspec.runtime.train.loss import next_token_loss

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=gen).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    logits.grad = torch.zeros_like(logits)  # the gradient's own memory, held either way
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if way == "chunked":
        loss = next_token_loss(logits, targets)
    else:
        loss = F.cross_entropy(logits.float(), targets)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "extra": peak - base, "loss": loss.item(),
                      "grad_sum": float(logits.grad.float().abs().sum())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=["chunked", "plain"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.vocab)
    runs: dict[str, list[dict]] = {"plain": [], "chunked": []}
    for _ in range(args.rounds):
        for way in runs:  # in turns: drift in the machine's speed hits both
            done = subprocess.run([sys.executable, __file__, "--child", way, "--tokens", str(args.tokens),
                                   "--vocab", str(args.vocab)], capture_output=True, text=True, check=True)
            runs[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
    a, b = runs["plain"][0], runs["chunked"][0]
    assert abs(a["loss"] - b["loss"]) < 1e-4 * a["loss"] and abs(a["grad_sum"] - b["grad_sum"]) < 1e-2 * a["grad_sum"]
    seconds = {w: statistics.median(r["seconds"] for r in rs) for w, rs in runs.items()}
    extra = {w: statistics.median(r["extra"] for r in rs) for w, rs in runs.items()}
    logits_gb = args.tokens * args.vocab * 2 / 1e9
    print(f"bf16 logits [{args.tokens}, {args.vocab}] ({logits_gb:.2f} GB), loss forward + backward, 1 thread:")
    for way in runs:
        print(f"  {way:>7}: {seconds[way]:6.2f} s, {extra[way] / 1e9:5.2f} GB beyond the logits and their gradient")
    print(f"chunked / plain: memory {extra['chunked'] / extra['plain']:.2f}x, time {seconds['chunked'] / seconds['plain']:.2f}x")


if __name__ == "__main__":
    main()
