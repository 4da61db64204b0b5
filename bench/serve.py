"""`lmspec serve` with continuous batching against the static scheduler it replaced, side by side.

Two servers of one model, each in its own process, measured one after the other in one run: the
baseline is `--batching static` (whole batches of up to --max-batch, one after the other) on the
plain export (its cache concatenated anew at every step), the new one `--batching continuous` (rows
join and leave between decode steps) on the export with `--fused-attention` (each row in a slot of
one KV buffer, updated in place). `--also-cohorts` adds continuous batching on the plain export:

1. Head-of-line blocking: a 1,024-token request, then, once its first token is out, a 3-token one;
   the 3-token request's latency (target: < 1 s with continuous batching).
2. 32 concurrent clients, each sending `--requests` requests one after another with mixed lengths
   (max_tokens drawn from 8, 32, 128, 512, the same sequence for both servers); generated tokens
   per second over the whole run, and the 95th percentile of request latency (targets: throughput
   at least 1.5x the baseline's, p95 at most 0.5x).

The model is GPT-2 small's body (12 layers of width 768, 85M parameters) over a character
vocabulary, with context 2048 and random weights (speed does not depend on them), trained one step
and exported both ways here; `--dim`, `--layers` and `--heads` shape another, `--run DIR` exports a
trained run instead.

    python bench/serve.py [--run DIR | --dim 768 --layers 12 --heads 12] [--requests 4] [--clients 32]
                          [--threads N] [--provider cpu|cuda] [--max-batch N] [--also-cohorts] [--workdir DIR]

The last line is JSON ({"bench": "serve", ...}) for bench/gpu_check.sh, which runs it on the GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's `tokenize` (which logging imports): drop the folder.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LENGTHS = (8, 32, 128, 512)
LONG, SHORT = 1024, 3


def lmspec(*args) -> list[str]:
    return [sys.executable, "-m", "lmspec.runtime.cli.main", *map(str, args)]


def build_run(workdir: Path, dim: int, layers: int, heads: int) -> Path:
    run = workdir / f"serve-bench-{layers}x{dim}"
    if not (run / "checkpoints").is_dir():
        subprocess.run(lmspec("train", ROOT / "specs/tiny.arch", "--set", "context=2048", "--set", f"layers={layers}",
                              "--set", f"dim={dim}", "--set", f"heads={heads}", "--data", DATA / "the-verdict.txt",
                              "--out", run, "--steps", 1, "--batch", 1, "--seq", 256, "--no-progress",
                              "--sample-tokens", 0, "--eval-batches", 1), check=True, capture_output=True)
    return run


def export(run: Path, workdir: Path, fused: bool) -> Path:
    bundle = workdir / f"{run.name}-{'fused' if fused else 'plain'}.onnx"
    if not bundle.exists():
        subprocess.run(lmspec("export", run, "-o", bundle, *(("--fused-attention",) if fused else ())),
                       check=True, capture_output=True)
    return bundle


@contextmanager
def server(bundle: Path, batching: str, threads: int | None, provider: str, logs: Path, max_batch: int | None = None):
    out, err = logs / f"{bundle.stem}-{batching}.out", logs / f"{bundle.stem}-{batching}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(lmspec("serve", bundle, "--port", 0, "--batching", batching, "--max-tokens", LONG,
                                       "--provider", provider, *(("--threads", threads) if threads else ()),
                                       *(("--max-batch", max_batch) if max_batch else ())),
                                stdout=o, stderr=e, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"at (http://\S+)/v1", out.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {batching} server did not start: {err.read_text()}")
            time.sleep(0.1)
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def complete(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds, tokens generated) for one non-streamed request (a character vocabulary has no
    end-of-text token: every request generates max_tokens)."""
    started = time.perf_counter()
    r = client.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - started, r.json()["usage"]["completion_tokens"]


def short_behind_long(url: str) -> tuple[float, float]:
    """(the 3-token request's latency, the 1,024-token one's) when the short one is sent as soon as
    the long one has produced its first token."""
    first = threading.Event()
    long_seconds = []

    def long_request():
        started = time.perf_counter()
        with httpx.Client(timeout=600) as c, c.stream("POST", f"{url}/v1/completions", json={
                "prompt": "I had always", "max_tokens": LONG, "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    first.set()
        long_seconds.append(time.perf_counter() - started)

    worker = threading.Thread(target=long_request)
    worker.start()
    first.wait(120)
    with httpx.Client(timeout=600) as c:
        short, _ = complete(c, url, "It was", SHORT)
    worker.join()
    return short, long_seconds[0]


def mixed_load(url: str, clients: int, requests: int, seed: int = 0) -> dict:
    """Generated tokens per second, and latencies (p95, median, and p95 of the requests for at most 32
    tokens), for `clients` concurrent clients."""
    rng = random.Random(seed)
    plan = [[rng.choice(LENGTHS) for _ in range(requests)] for _ in range(clients)]
    latencies: list[tuple[int, float]] = []
    tokens = [0]
    lock = threading.Lock()

    def client_loop(lengths: list[int]) -> None:
        with httpx.Client(timeout=600) as c:
            for n in lengths:
                seconds, generated = complete(c, url, "The picture was", n)
                with lock:
                    latencies.append((n, seconds))
                    tokens[0] += generated

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, plan))
    wall = time.perf_counter() - started
    every = [s for _, s in latencies]
    short = [s for n, s in latencies if n <= 32]
    return dict(throughput=tokens[0] / wall, p95=p95(every), median=statistics.median(every), short_p95=p95(short),
                requests=len(every))


def p95(values: list[float]) -> float:
    """The 95th percentile; with fewer than two values (a smoke run), the largest, or NaN for none."""
    if len(values) < 2:
        return max(values, default=float("nan"))
    return statistics.quantiles(values, n=20)[18]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run to export and serve (default: a random model)")
    parser.add_argument("--also-cohorts", action="store_true",
                        help="also measure continuous batching on the plain export (cohorts of padded rows)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--threads", type=int, help="onnxruntime threads of each server (default: its own)")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="onnxruntime's provider")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--max-batch", type=int, help="each server's --max-batch (default: serve's own, 16)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lmspec-bench-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run = args.run or build_run(workdir, args.dim, args.layers, args.heads)
    plain, fused = export(run, workdir, fused=False), export(run, workdir, fused=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"bundles {plain} and {fused}", flush=True)
    servers = {"static": (plain, "static"), "continuous": (fused, "continuous")}
    if args.also_cohorts:
        servers["cohorts"] = (plain, "continuous")
    results = {}
    for name, (bundle, batching) in servers.items():
        with server(bundle, batching, args.threads, args.provider, workdir, args.max_batch) as url:
            short, long = short_behind_long(url)
            load = mixed_load(url, args.clients, args.requests)
        results[name] = r = dict(short=short, long=long, **load)
        print(f"{name:>10}: {SHORT}-token request behind a {LONG}-token one: {short:.2f} s (the long one "
              f"{long:.2f} s); {args.clients} clients, {r['requests']} requests: {r['throughput']:.0f} tokens/s, "
              f"latency p95 {r['p95']:.2f} s, median {r['median']:.2f} s, p95 of those <= 32 tokens "
              f"{r['short_p95']:.2f} s", flush=True)
    base, new = results["static"], results["continuous"]
    ratios = {"short_behind_long_s": round(new["short"], 3), "was_s": round(base["short"], 3),
              "throughput": round(new["throughput"] / base["throughput"], 3), "p95": round(new["p95"] / base["p95"], 3),
              "median": round(new["median"] / base["median"], 3),
              "short_p95": round(new["short_p95"] / base["short_p95"], 3)}
    print(f"short request behind a long one: {new['short']:.2f} s (target < 1 s), was {base['short']:.2f} s; "
          f"throughput {ratios['throughput']:.2f}x (target >= 1.5x); p95 latency {ratios['p95']:.2f}x "
          f"(target <= 0.5x); median latency {ratios['median']:.2f}x; p95 of requests <= 32 tokens "
          f"{ratios['short_p95']:.2f}x")
    print(json.dumps({"bench": "serve", "provider": args.provider, "ratios": ratios,
                      "results": {k: {m: round(v, 3) for m, v in r.items()} for k, r in results.items()}}))


if __name__ == "__main__":
    main()
