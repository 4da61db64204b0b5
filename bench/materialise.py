"""Building a model on `meta` and materialising it, against building it on the CPU, for a big spec.

The earlier build made every op module on the CPU (nn.Linear fills its weight with kaiming-uniform
draws, thrown away), then initialised each parameter in place. `compiler/lower.lower` builds on
`meta` and fills each parameter once from the seed's stream; parallel ranks fill only their share.
Both builds run here in one process, in turns (each in a fresh child process, so the peak resident
memory is each build's own), and must give the same weights (checked). Prints wall time and peak
RSS of each and the ratios; record them in bench/RESULTS.md.

    python bench/materialise.py [--spec specs/llama3.2-1b.arch] [--set layers=8] [--rounds 3]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def child(way: str, spec: str, overrides: list[str]) -> None:
    """One build in this process; prints {seconds, peak_rss, checksum} as JSON."""
    import resource
    import time

    import torch

    from lmspec.compiler import load_spec, parse_overrides
    from lmspec.compiler.lower import lower
    from reference_build import built_on_the_cpu  # tests/: the build before this one

    torch.set_num_threads(1)
    graph = load_spec(spec, parse_overrides(overrides))
    start = time.perf_counter()
    model = lower(graph, seed=0) if way == "meta" else built_on_the_cpu(graph, 0)
    seconds = time.perf_counter() - start
    # a checksum of every weight: the two builds must agree bit for bit
    total = sum(float(p.double().sum()) for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "parameters": sum(p.numel() for p in model.parameters()), "checksum": total}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "specs" / "llama3.2-1b.arch"))
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=["meta", "cpu"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.spec, args.set)
    runs: dict[str, list[dict]] = {"cpu": [], "meta": []}
    for _ in range(args.rounds):
        for way in ("cpu", "meta"):  # in turns: drift in the machine's speed hits both
            command = [sys.executable, __file__, "--child", way, "--spec", args.spec,
                       *[x for pair in args.set for x in ("--set", pair)]]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
    sums = {way: {r["checksum"] for r in rs} for way, rs in runs.items()}
    assert len(sums["cpu"] | sums["meta"]) == 1, f"the builds differ: {sums}"
    seconds = {way: statistics.median(r["seconds"] for r in rs) for way, rs in runs.items()}
    rss = {way: max(r["peak_rss"] for r in rs) for way, rs in runs.items()}
    print(f"{Path(args.spec).name} {' '.join(args.set)}: {runs['meta'][0]['parameters']:,} parameters, "
          f"the same weights both ways")
    for way in ("cpu", "meta"):
        print(f"  {way:>4} build: {seconds[way]:7.2f} s  peak RSS {rss[way] / 1e9:6.2f} GB")
    print(f"meta build / CPU build: time {seconds['meta'] / seconds['cpu']:.2f}x, peak RSS {rss['meta'] / rss['cpu']:.2f}x")


if __name__ == "__main__":
    main()
