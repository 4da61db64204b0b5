"""Averaging the gradients of data-parallel replicas: one all-reduce per 25 MB bucket
(runtime/distributed/collectives.py, what `lmspec train --tp/--pp` replicas do) against one all-reduce per
parameter (what they did before), on 2 gloo ranks over the loopback.

The gradients are those of a lowered spec (default: GPT-2 small's parameter shapes, 148 tensors,
124 M floats), filled with random values; both ways run on the same tensors, taking turns, and the
result is checked equal. Per way: the median wall time of the slower rank over `--rounds` rounds.
On one machine the loopback moves bytes fast, so this mostly shows the per-collective overhead that
bucketing removes; across nodes latency weighs more.

    python bench/allreduce.py [--spec specs/gpt2.arch --rounds 7 --bucket-mb 25]
"""
from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lmspec.compiler import load_spec  # noqa: E402
from lmspec.compiler.analysis import parameter_count  # noqa: E402
from lmspec.runtime.distributed.collectives import all_reduce_in_buckets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def per_tensor(tensors, group, size):
    for t in tensors:
        dist.all_reduce(t, group=group)
        t.div_(size)
    return len(tensors)


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slower rank's time
    return elapsed.item()


def _worker(rank: int, store: str, shapes, rounds: int, bucket_bytes: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(rank)
        source = [torch.randn(s, generator=gen) for s in shapes]
        a, b = [t.clone() for t in source], [t.clone() for t in source]
        times = {"per tensor": [], "bucketed": []}
        calls = {}
        for _ in range(rounds):
            for t, s in zip(a, source):
                t.copy_(s)
            for t, s in zip(b, source):
                t.copy_(s)
            times["per tensor"].append(_timed(lambda: calls.__setitem__("per tensor", per_tensor(a, None, 2))))
            times["bucketed"].append(_timed(lambda: calls.__setitem__(
                "bucketed", all_reduce_in_buckets(b, None, divide_by=2, bucket_bytes=bucket_bytes))))
        same = all(torch.equal(x, y) for x, y in zip(a, b))
        if rank == 0:
            results["times"], results["calls"], results["same"] = times, calls, same
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs/gpt2.arch"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bucket-mb", type=float, default=25)
    args = parser.parse_args()
    graph = load_spec(args.spec)
    shapes = [tuple(p.shape) for p in graph.owned_params()]
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(f"{tmp}/store", shapes, args.rounds, int(args.bucket_mb * 2 ** 20), results),
                 nprocs=2, join=True)
    times, calls = results["times"], results["calls"]
    print(f"{graph.name}: {len(shapes)} gradient tensors, {parameter_count(graph):,} floats "
          f"({parameter_count(graph) * 4 / 2 ** 20:.0f} MiB), 2 gloo ranks, 1 thread each, {args.rounds} rounds")
    base = statistics.median(times["per tensor"])
    print("| way | all-reduces | median s | ratio (speed-up) |\n|---|---:|---:|---:|")
    for way in ("per tensor", "bucketed"):
        t = statistics.median(times[way])
        print(f"| {way} | {calls[way]} | {t:.3f} | {base / t:.2f} |")
    print(f"results equal bit for bit: {results['same']}")


if __name__ == "__main__":
    main()
