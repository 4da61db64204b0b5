"""What a tied head's shared quantized table saves: `lmspec export --quantize` with the embedding's
lookup reading the head's own quantized weight (runtime/export/quantized_lookups.py), against the
baseline of the same export with that sharing switched off (the lookup then gets int8 rows of its own),
both in this run.

A GPT-2-vocabulary model (tied head) trained briefly on the-verdict, or `--run DIR` (a `lmspec train`
run). Each export's own quantization report gives, for fp32, int8 and int4: the file's size, the
validation loss (the run's validation split) and batch-1 greedy decode speed. Record the figures in
bench/RESULTS.md.

    python bench/quantized_lookups.py [--run DIR] [--steps 300]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's `tokenize`: drop the folder.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def lmspec(*args) -> str:
    """`lmspec ARGS` in this process; its output, or SystemExit with it when it fails."""
    from lmspec.runtime.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main([str(a) for a in args])
    if code:
        raise SystemExit(f"lmspec {' '.join(map(str, args))} failed:\n{out.getvalue()}")
    return out.getvalue()


def trained_run(directory: Path, steps: int) -> Path:
    run = directory / "run"
    lmspec("train", "specs/gpt2.arch", "--set", "layers=2", "--set", "dim=128", "--set", "heads=2", "--set",
           "context=256", "--tokenizer", DATA / "gpt2-tokenizer", "--data", DATA / "the-verdict.txt", "--seq", "128",
           "--steps", steps, "--out", run, "--no-progress", "--sample-tokens", "0")
    return run


def report(run: Path, out: Path, shared: bool) -> dict:
    """The quantization report of `lmspec export RUN --quantize int8`, tied tables shared or not."""
    from lmspec.runtime.export import quantized_lookups

    original = quantized_lookups.share_tied_tables
    if not shared:
        quantized_lookups.share_tied_tables = lambda model, min_elements=0: 0
    try:
        lmspec("export", run, "-o", out, "--quantize", "int8")
    finally:
        quantized_lookups.share_tied_tables = original
    meta = json.loads(out.with_name(out.stem + ".lmspec.json").read_text())
    return {row["model"]: row for row in meta["quantization_report"]["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a `lmspec train` run of a model with a tied head")
    parser.add_argument("--steps", type=int, default=300, help="steps to train when no --run is given")
    args = parser.parse_args()
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = args.run or trained_run(tmp, args.steps)
        before, after = report(run, tmp / "before" / "m.onnx", False), report(run, tmp / "after" / "m.onnx", True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; run {args.run or 'trained here'}")
    print(f"{'model':<6} {'size (baseline)':>16} {'size (shared)':>14} {'ratio':>6} {'loss (baseline)':>16} "
          f"{'loss (shared)':>14} {'tok/s (baseline)':>17} {'tok/s (shared)':>15}")
    for name in ("fp32", "int8", "int4"):
        b, a = before[name], after[name]
        print(f"{name:<6} {b['size_mib']:>12.1f} MiB {a['size_mib']:>10.1f} MiB {a['size_mib'] / b['size_mib']:>5.2f}x "
              f"{b.get('loss', float('nan')):>16.4f} {a.get('loss', float('nan')):>14.4f} "
              f"{b['tokens_per_s']:>17.1f} {a['tokens_per_s']:>15.1f}")


if __name__ == "__main__":
    main()
