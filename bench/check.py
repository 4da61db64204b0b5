"""`lmspec check` in a cold process against `python -c "import torch"` alone, measured in the same run.

Checking a spec is meant to cost less than importing torch: parse, build the graph and check every
shape with no tensor allocated and torch never imported. Three commands, each a fresh interpreter
(`python -m lmspec.runtime check …`, as the `lmspec` console script runs it), take turns
--repeats times (the order rotating each round, so that drift in the machine's speed hits all of
them), after one untimed round that warms the page cache for all of them alike; the median
wall-clock time of each is compared:

  - `python -c "import torch"` (the baseline);
  - `lmspec check specs/`: every shipped spec, GPT-3 175B's 96 layers included;
  - `lmspec check specs/gpt3-175b.arch`: the 96-layer spec alone.

Then one more check process reports whether torch was imported, and `-X importtime` names the
slowest imports it makes. Prints ratios; record them in bench/RESULTS.md.

    python bench/check.py [--repeats 5]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's tokenize.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIG = "specs/gpt3-175b.arch"
TARGET = 0.5


def commands() -> dict[str, list[str]]:
    lmspec = [sys.executable, "-m", "lmspec.runtime"]
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "lmspec check specs/": [*lmspec, "check", "specs/"],
        f"lmspec check {BIG}": [*lmspec, "check", BIG],
    }


def seconds(cmd: list[str]) -> float:
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {run.returncode}:\n{run.stdout}{run.stderr}")
    return elapsed


def torch_imported() -> tuple[bool, str]:
    """Whether a `check specs/` process ends with torch in sys.modules, and its summary line."""
    code = ("import sys; from lmspec.runtime.cli import main; rc = main(['check', 'specs/']); "
            "print('TORCH_IMPORTED', 'torch' in sys.modules, rc, file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    found = re.search(r"TORCH_IMPORTED (\w+) (\d+)", run.stderr)
    if found is None or found.group(2) != "0":
        raise SystemExit(f"check failed:\n{run.stdout}{run.stderr}")
    summary = next((line for line in (run.stdout + run.stderr).splitlines() if line.startswith("checked ")), "")
    return found.group(1) == "True", summary.strip()


def slowest_imports(n: int = 6) -> list[tuple[float, str]]:
    """The packages whose modules take longest to import in a check process (their own time, summed
    over their modules, from -X importtime)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmspec.runtime", "check", BIG],
                         cwd=ROOT, capture_output=True, text=True)
    per_package: dict[str, float] = {}
    for line in run.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            package = m.group(2).split(".")[0]
            per_package[package] = per_package.get(package, 0.0) + int(m.group(1)) / 1e6
    return sorted(((s, p) for p, s in per_package.items()), reverse=True)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each command (median)")
    args = ap.parse_args()

    cmds = commands()
    names = list(cmds)
    for name in names:  # warm-up: the page cache holds torch's and lmspec's files for all alike
        seconds(cmds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(seconds(cmds[name]))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    imported, summary = torch_imported()

    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, torch {torch_version}")
    print(f"cold processes, median of {args.repeats} (taking turns, after one warm-up round each); "
          f"`check specs/`: {summary}")
    base = median[names[0]]
    width = max(map(len, names))
    for name in names:
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        ratio = "" if name == names[0] else f"   ratio {median[name] / base:.2f}  (target <= {TARGET})"
        print(f"  {name:<{width}} : {median[name]:6.3f} s  (range {spread}){ratio}")
    print(f"check imported torch: {'YES' if imported else 'no'}")
    print("slowest imports of a check process (own time): " +
          ", ".join(f"{p} {s * 1000:.0f} ms" for s, p in slowest_imports()))
    worst = max(median[n] / base for n in names[1:])
    print(f"result: check / import torch = {worst:.2f} at worst, target <= {TARGET}: "
          f"{'met' if worst <= TARGET and not imported else 'NOT met'}")


if __name__ == "__main__":
    main()
