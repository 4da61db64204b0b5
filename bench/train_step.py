"""Training tokens/s of the lmspec-compiled GPT against a hand-written eager GPT (nanoGPT-style).

Same config, same weights, same batches, same process; the two take turns step by step so that
drift in the machine's speed hits both, and the median step time of each is compared. Also times `lmspec check` on a 96-layer spec in a cold
process. Prints ratios; record them in bench/RESULTS.md.

    python bench/train_step.py [--layers 6 --dim 384 --heads 6 --context 256 --batch 8 --steps 30]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py (the name for
# that benchmark) would shadow the standard library's tokenize, which torch imports.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gpt2_names import copy_into_reference  # noqa: E402
from reference_gpt import GPT, GPTConfig  # noqa: E402

from lmspec.compiler import load_spec  # noqa: E402
from lmspec.compiler.lower import lower  # noqa: E402


class Trainer:
    """One model with its own AdamW, stepping on given batches."""

    def __init__(self, model):
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self, x, y) -> float:
        """Seconds for one training step."""
        start = time.perf_counter()
        logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def alternate(trainers, batches, steps: int) -> list[list[float]]:
    """Step each trainer in turn on the same batch, `steps` times, after one warm-up step each:
    whatever else the machine does then slows both alike."""
    for t in trainers:
        t.step(*batches[0])
    times = [[] for _ in trainers]
    for i in range(steps):
        for t, log in zip(trainers, times):
            log.append(t.step(*batches[i % len(batches)]))
    return times


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
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model, alternating")
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
    ref_times, ours_times = alternate([Trainer(reference), Trainer(ours)], batches, args.steps)
    # median step time: robust to the odd step slowed by the rest of the machine
    ours_tps = args.batch * args.context / statistics.median(ours_times)
    ref_tps = args.batch * args.context / statistics.median(ref_times)

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
