"""How `lmspec check` grows with the size of a spec: N and 4N statements (half of them dead, so every
other one warns), and N and 4N warnings on one line, each checked through the CLI's own entry point
with the human output captured. Prints seconds, bytes of output, and the ratio 4N / N: about 4 for a
linear check, 16 for a quadratic one. Also `lmspec info --pp 4` and `lmspec plan` on N and 4N
repeated layers (the pipeline cut and the memory plan).

    python bench/check_scale.py [--n 2500]
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
import tempfile  # noqa: E402
import time  # noqa: E402

HEAD = "model m {\n  input t: i64[batch, seq <= 8]\n  x = embedding(t, 10, 16)\n"


def statements(n: int) -> str:
    return HEAD + "".join(f"  x = linear(x, 16)\n  d{i} = linear(x, 4)\n" for i in range(n // 2)) + "  output x\n}\n"


def one_line(n: int) -> str:
    line = "  " + "; ".join(f"h{i} = {i}" for i in range(n))
    return HEAD.replace("model m {\n", "model m {\n" + line + "\n") + "  output x\n}\n"


def layers(n: int) -> str:
    return (f"model deep {{\n  layers = {n}\n  input tokens: i64[batch, seq <= 64]\n"
            "  x = embedding(tokens, 256, 16) as wte\n  repeat layers as block {\n"
            "    x = x + attention(layernorm(x), 2, causal=true)\n  }\n"
            "  logits = linear(layernorm(x), 256, bias=false, tie=wte)\n  output logits\n}\n")


def timed(argv: list[str]) -> tuple[float, int]:
    from lmspec.runtime.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(argv)
    return time.perf_counter() - start, len(out.getvalue().encode()) + len(err.getvalue().encode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2500)
    args = p.parse_args()
    timed(["check", str(Path(__file__).resolve().parents[1] / "specs" / "tiny.arch")])  # imports, warm
    cases = [("statements", statements, ["check"]), ("warnings on one line", one_line, ["check"]),
             ("repeated layers: info --pp 4", layers, ["info", "--pp", "4"]), ("repeated layers: plan", layers, ["plan"])]
    print(f"{'case':32} {'N':>7} {'s':>7} {'output':>9} | {'4N':>7} {'s':>7} {'output':>9} | ratio")
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, verb in cases:
            row = []
            for n in (args.n, 4 * args.n):
                path = Path(tmp) / f"{n}.arch"
                path.write_text(make(n))
                seconds, size = timed([verb[0], str(path), *verb[1:]])
                row.append((n, seconds, size))
            (n1, s1, b1), (n4, s4, b4) = row
            print(f"{name:32} {n1:>7} {s1:>7.2f} {b1:>8,}B | {n4:>7} {s4:>7.2f} {b4:>8,}B | {s4 / s1:.1f}x")


if __name__ == "__main__":
    main()
