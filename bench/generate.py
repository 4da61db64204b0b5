"""Generation tokens/s of the exported model in onnxruntime (fp32, int8) against PyTorch eager.

Batch 1, greedy, `--tokens` new tokens after a `--prompt`-token prompt of Tiny Shakespeare (GPT-2
tokenizer), GPT-2-small shape with random weights. The baseline is `lmspec.runtime.train.sampling`
(PyTorch eager with its KV cache); the contenders are the bundles `export_bundle` writes (what
`lmspec export` gives users: fp32, `--optimize`, `--quantize int8`, both), run by `OnnxModel`.
All engines live in one process and take turns run by run (the order rotates every round), so
drift in the machine's speed hits all alike; the median run of each is compared. Other processes
on a shared machine slow PyTorch's OpenMP threads far more than onnxruntime's, so the load they put
on the CPUs is measured during every run (/proc/stat), the benchmark waits for quiet before runs
(within --wait seconds) and counts only the runs under --max-load when there are enough of them.

Also: the machine's copy bandwidth (numpy) and, per engine, the bytes of weights read per token,
so each decode speed is shown as a fraction of the memory-bandwidth limit; and the int8 model's
validation-loss change on Tiny Shakespeare (a small char model trained here for a minute or two,
since random GPT-2 weights give a meaningless loss). Prints ratios; record them in bench/RESULTS.md.

    python bench/generate.py [--tokens 128 --prompt 128 --rounds 7 --threads N --skip-loss]
                             [--bundle LABEL=PATH ...] [--workdir DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's `tokenize` (which logging, inspect and torch import): drop the folder.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmspec.compiler.loader import load_spec  # noqa: E402
from lmspec.compiler.lower import lower  # noqa: E402
from lmspec.compiler.onnx_export import ExportError  # noqa: E402
from lmspec.compiler.torch_modules import Position  # noqa: E402
from lmspec.runtime.checkpoint.store import save_checkpoint  # noqa: E402
from lmspec.compiler.rewrites import spec_record  # noqa: E402
from lmspec.runtime.export.from_checkpoint import export_bundle  # noqa: E402
from lmspec.runtime.train.sampling import generate  # noqa: E402
from lmspec.runtime.export.bundle import bundle_sidecar  # noqa: E402
from lmspec.runtime.serve.language_model import OnnxModel  # noqa: E402
from lmspec.runtime.serve.requests import GenerationRequest  # noqa: E402
from lmspec.runtime.data.tokenizer import FileTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TARGETS = {"fp32": 1.5, "int8": 2.5}  # ONNX tokens/s over eager tokens/s, from the issue
LOSS_TARGET = 0.02  # int8 validation loss at most 2% above fp32's

# (label, export_bundle keywords): every variant `lmspec export` offers for CPU
VARIANTS = [
    ("onnx fp32", {}),
    ("onnx fp32 --optimize", {"optimize": True}),
    ("onnx int8", {"quantize": "int8"}),
    ("onnx int8 --optimize", {"optimize": True, "quantize": "int8"}),
]


# ---------------------------------------------------------------------------------------- the machine

def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def copy_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> tuple[float, float]:
    """Best bytes/s of copying a `gib` GiB float32 array (bytes read + bytes written, as STREAM's
    Copy counts them), with one thread and with `threads` threads each copying a slice."""
    src = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    dst = np.zeros_like(src)  # touched, so page faults are not timed
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def copy_slice(b):
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])  # numpy releases the GIL while copying

    single, multi = [], []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            np.copyto(dst, src)
            single.append(2 * src.nbytes / (time.perf_counter() - start))
            start = time.perf_counter()
            list(pool.map(copy_slice, bounds))
            multi.append(2 * src.nbytes / (time.perf_counter() - start))
    return max(single), max(multi)


def matvec_read_rate(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Best bytes/s that an fp32 matrix-vector product (torch, `threads` threads) reads its matrix
    at: the practical ceiling for streaming fp32 weights, since a pure read stream does not reach the
    copy figure (which counts the bytes written as well)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        matrix = torch.ones(mib * 2**20 // (768 * 4), 768)
        vector = torch.ones(768)
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mv(matrix, vector)
            best = max(best, matrix.numel() * 4 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------- bytes per token

def onnx_weight_bytes(path: Path) -> int:
    """Bytes of weights one decode step reads from an ONNX file: every initializer, except that a
    table read only by Gather (token and position embeddings) costs one row."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        dims = list(init.dims)
        count = int(np.prod(dims)) if dims else 1
        if consumers.get(init.name) == {"Gather"} and len(dims) == 2:
            count = dims[1]  # one row per token
        total += count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def torch_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one eager decode step reads: all parameters (the tied token embedding is
    the LM head), less the position table, of which one row is read."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, Position):
            w = module.weight
            total -= (w.shape[0] - 1) * w.shape[1] * w.element_size()
    return total


# ----------------------------------------------------------------------------------------- engines

@dataclass
class Run:
    seconds: float  # prompt in, all new tokens out
    first: float  # until the first new token: the prompt's forward pass (prefill) and its pick
    tokens: list[int]
    foreign: float = 0.0  # share of the machine's CPU time that other processes used meanwhile


@dataclass
class Engine:
    label: str
    kind: str  # "eager", "fp32" or "int8": which target applies
    weight_bytes: int
    run: callable
    extra: bool = False  # a bundle given with --bundle, not exported here
    runs: list[Run] = field(default_factory=list)
    counted: list[Run] = field(default_factory=list)  # the runs the summary uses

    def median(self, what) -> float:
        return statistics.median(what(r) for r in self.counted)


def eager_engine(model, prompt: list[int], tokens: int) -> Engine:
    stamps: list[float] = []
    model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))

    def run() -> Run:
        stamps.clear()
        start = time.perf_counter()
        new = generate(model, prompt, tokens, temperature=0)
        end = time.perf_counter()
        return Run(end - start, stamps[0] - start, new)

    return Engine("pytorch eager (baseline)", "eager", torch_weight_bytes(model), run)


def onnx_engine(label: str, path: Path, prompt: list[int], tokens: int, threads: int, extra: bool = False) -> Engine:
    model = OnnxModel(path, threads=threads)
    request = GenerationRequest(prompt, max_tokens=tokens, temperature=0, stop_at_eot=False)

    def run() -> Run:
        new, first = [], None
        start = time.perf_counter()
        for event in model.stream([request]):  # what OnnxModel.generate runs, with a time per token
            if first is None:
                first = time.perf_counter() - start
            if event.token is not None:
                new.append(event.token)
        return Run(time.perf_counter() - start, first, new)

    kind = "int8" if model.meta.get("quantized") == "int8" else "fp32"
    return Engine(label, kind, onnx_weight_bytes(path), run, extra=extra)


# ------------------------------------------------------------------------------- other processes

def machine_busy_seconds() -> float | None:
    """CPU seconds that everything on the machine has used, all CPUs together (/proc/stat)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ForeignLoad:
    """The share of all CPUs that other processes use between start() and stop(). On a shared
    machine they slow the engines unequally (PyTorch's OpenMP threads wait at barriers for a
    preempted thread), so runs under load are marked, and the summary prefers the others."""

    def start(self):
        self.t, self.busy, self.own = time.perf_counter(), machine_busy_seconds(), own_seconds()

    def stop(self) -> float:
        wall, busy = time.perf_counter() - self.t, machine_busy_seconds()
        if busy is None or self.busy is None:
            return 0.0
        foreign = (busy - self.busy) - (own_seconds() - self.own)
        return max(0.0, foreign / (wall * (os.cpu_count() or 1)))


def wait_for_quiet(budget: list[float], limit: float, sample: float = 0.5) -> None:
    """Wait until other processes use less than `limit` of the CPUs, spending at most budget[0] seconds
    (shared by all calls)."""
    probe = ForeignLoad()
    while budget[0] > 0:
        started = time.perf_counter()
        probe.start()
        time.sleep(sample)
        load = probe.stop()
        budget[0] -= time.perf_counter() - started
        if load < limit:
            return


def alternate(engines: list[Engine], rounds: int, limit: float, budget: list[float]) -> None:
    """One untimed warm-up run each, then `rounds` rounds of one run each, the order rotating.
    Before each run, wait (within the seconds left in budget[0]) for other processes to calm down."""
    probe = ForeignLoad()
    for e in engines:
        e.run()
    for r in range(rounds):
        shift = r % len(engines)
        for e in engines[shift:] + engines[:shift]:
            wait_for_quiet(budget, limit)
            time.sleep(0.1)  # onnxruntime's idle threads spin briefly after a run: let them settle
            probe.start()
            result = e.run()
            result.foreign = probe.stop()
            e.runs.append(result)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{e.label.replace('onnx ', '')} {e.runs[-1].seconds:.2f} s ({e.runs[-1].foreign:.0%} other load)"
            for e in engines), flush=True)


# ------------------------------------------------------------------------------------------ export

def export_variants(checkpoint: Path, out: Path, prompt: list[int], tokens: int, threads: int,
                    reuse: bool) -> tuple[list[Engine], list[str]]:
    engines, notes = [], []
    optimize_failed = None
    for label, kwargs in VARIANTS:
        name = label.replace("onnx ", "").replace(" --", "-").replace(" ", "-")
        path = out / f"gpt2-{name}.onnx"
        if kwargs.get("optimize") and optimize_failed:
            notes.append(f"{label}: skipped, the --optimize step it needs failed above")
            continue
        if not (reuse and path.is_file() and bundle_sidecar(path).is_file()):
            started = time.perf_counter()
            try:
                export_bundle(str(checkpoint), str(path), log=lambda *_: None, **kwargs)
            except ExportError as err:
                if kwargs.get("optimize"):
                    optimize_failed = err
                notes.append(f"{label}: export refused: {err}")
                print(f"  {label}: export refused: {err}", flush=True)
                continue
            print(f"  {label}: exported in {time.perf_counter() - started:.0f} s "
                  f"({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
        engines.append(onnx_engine(label, path, prompt, tokens, threads))
    return engines, notes


# -------------------------------------------------------------------------------------------- loss

def loss_check(work: Path, steps: int, threads: int, data: Path) -> None:
    """Train the Shakespeare char model briefly, export it fp32 and int8, and compare the mean
    cross-entropy over every window of the validation split (the last 10% of the text)."""
    from lmspec.runtime.checkpoint.store import load_checkpoint
    from lmspec.compiler.rewrites import graph_from_record
    from lmspec.runtime.data.token_data import TokenData
    from lmspec.runtime.data.tokenizer import load_tokenizer

    run_dir = work / f"char-{steps}-steps"
    spec = ROOT / "specs" / "shakespeare-char.arch"
    if not (run_dir / "checkpoints").is_dir():
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "lmspec.runtime.cli.main", "train", str(spec), "--data", str(data),
               "--steps", str(steps), "--batch", "12", "--lr", "1e-3", "--min-lr", "1e-4", "--warmup", "100",
               "--beta2", "0.99", "--eval-every", "0", "--ckpt-every", "0", "--sample-tokens", "0",
               "--no-progress", "--threads", str(threads), "--out", str(run_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"training failed:\n{done.stdout}\n{done.stderr}")
        print(f"  trained {spec.name} for {steps} steps in {time.perf_counter() - started:.0f} s: "
              f"{done.stdout.strip().splitlines()[-3]}", flush=True)

    ckpt = load_checkpoint(run_dir)
    tokenizer = load_tokenizer(ckpt.tokenizer)
    graph = graph_from_record(ckpt.spec)
    model = lower(graph)
    ckpt.load_model(model)
    model.eval()
    val = TokenData(torch.tensor(tokenizer.encode(data.read_text(encoding="utf-8")))).val
    seq = graph.context
    starts = range(0, len(val) - seq - 1, seq)  # every non-overlapping window of the split
    x = torch.stack([val[i:i + seq] for i in starts])
    y = torch.stack([val[i + 1:i + 1 + seq] for i in starts]).numpy()

    def mean_ce(logits_of) -> float:
        total = 0.0
        for i in range(0, len(x), 256):
            logits = logits_of(x[i:i + 256]).astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            total += -np.take_along_axis(logp, y[i:i + 256, :, None], -1).sum()
        return total / y.size

    with torch.no_grad():
        losses = {"pytorch": mean_ce(lambda b: model(b).numpy())}
    for label, kwargs in [("onnx fp32", {}), ("onnx int8", {"quantize": "int8"}),
                          ("onnx int8 --optimize", {"optimize": True, "quantize": "int8"})]:
        path = run_dir / "export" / f"{label.replace('onnx ', '').replace(' --', '-')}.onnx"
        try:
            if not path.is_file():
                export_bundle(str(run_dir), str(path), log=lambda *_: None, **kwargs)
        except ExportError as err:
            print(f"  {label}: export refused: {err}")
            continue
        onnx_model = OnnxModel(path, threads=threads)
        losses[label] = mean_ce(lambda b: onnx_model.forward(b.numpy())[0])

    print(f"\nvalidation loss, {len(x)} windows of {seq} tokens ({y.size:,} tokens, the last 10% of "
          f"{data.name}), {graph.name} after {ckpt.step} steps:")
    base = losses.get("onnx fp32", losses["pytorch"])
    for label, loss in losses.items():
        line = f"  {label:22s} {loss:.4f}"
        if label != "pytorch":
            line += f"   vs pytorch {loss / losses['pytorch'] - 1:+.3%}"
        if label.startswith("onnx int8"):
            change = loss / base - 1
            verdict = "met" if change <= LOSS_TARGET else "MISSED"
            line += f", vs onnx fp32 {change:+.3%} (target <= +{LOSS_TARGET:.0%}: {verdict})"
        print(line)


# -------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (the start of Tiny Shakespeare)")
    ap.add_argument("--rounds", type=int, default=7, help="timed runs per engine, taking turns")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime threads")
    ap.add_argument("--skip-loss", action="store_true", help="skip the int8 validation-loss check")
    ap.add_argument("--loss-steps", type=int, default=2000,
                    help="training steps of the char model for the loss check (~1.5 min on 2 cores)")
    ap.add_argument("--variants", default="all",
                    help="comma-separated subset of: " + ", ".join(label for label, _ in VARIANTS))
    ap.add_argument("--max-load", type=float, default=0.15,
                    help="runs during which other processes use more of the CPUs than this are set aside")
    ap.add_argument("--wait", type=float, default=120,
                    help="seconds in all to wait for other processes to calm down before runs")
    ap.add_argument("--bundle", action="append", default=[], metavar="LABEL=PATH",
                    help="also time an exported bundle made elsewhere (repeatable)")
    ap.add_argument("--workdir", help="keep checkpoints and bundles here and reuse them on the next run "
                                      "(default: a temporary directory, removed at the end)")
    ap.add_argument("--data", default=str(DATA / "tinyshakespeare.txt"))
    ap.add_argument("--tokenizer", default=str(DATA / "gpt2-tokenizer"))
    args = ap.parse_args()
    if args.variants != "all":
        wanted = {v.strip() for v in args.variants.split(",")}
        VARIANTS[:] = [(label, kw) for label, kw in VARIANTS if label in wanted]
    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lmspec-bench-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    import onnxruntime as ort

    data = Path(args.data)
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
          f"({args.threads} threads)")
    budget = [args.wait]
    wait_for_quiet(budget, args.max_load)
    bw_single, bw_multi = copy_bandwidth(args.threads)
    mv_rate = matvec_read_rate(args.threads)
    print(f"copy bandwidth (numpy, 1 GiB, read + write, best of 5): {bw_single / 1e9:.1f} GB/s with 1 thread, "
          f"{bw_multi / 1e9:.1f} GB/s with {args.threads}\n"
          f"read rate of an fp32 matrix-vector product (torch, 512 MiB, {args.threads} threads, best of 5): "
          f"{mv_rate / 1e9:.1f} GB/s", flush=True)

    tokenizer = FileTokenizer.from_path(args.tokenizer)
    text = data.read_text(encoding="utf-8")
    prompt = tokenizer.encode(text[:20 * args.prompt])[:args.prompt]
    overrides = {"dropout": 0.0}
    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"), overrides=overrides)
    if args.prompt + args.tokens > graph.context:
        raise SystemExit(f"--prompt + --tokens must fit the context of {graph.context}")
    model = lower(graph, seed=0).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {graph.name}, {params:,} parameters (random init), batch 1, greedy, {args.prompt}-token prompt "
          f"+ {args.tokens} new tokens", flush=True)

    checkpoint = work / "gpt2-run" / "checkpoints" / "step_000000"
    if not checkpoint.is_dir():
        save_checkpoint(work / "gpt2-run", step=0, model=model, optimizer=None, rng=None, train_config={},
                        metrics={}, tokenizer=tokenizer.to_json(), spec=spec_record(graph, overrides))
    print("exporting with export_bundle (each checked against PyTorch):", flush=True)
    onnx_engines, notes = export_variants(checkpoint, work, prompt, args.tokens, args.threads,
                                          reuse=bool(args.workdir))
    for item in args.bundle:
        label, _, path = item.partition("=")
        onnx_engines.append(onnx_engine(label, Path(path), prompt, args.tokens, args.threads, extra=True))
    engines = [eager_engine(model, prompt, args.tokens)] + onnx_engines

    print(f"timing: {args.rounds} rounds, engines taking turns", flush=True)
    alternate(engines, args.rounds, args.max_load, budget)
    clean = [[r for r in e.runs if r.foreign <= args.max_load] for e in engines]
    enough = min(len(c) for c in clean) >= (args.rounds + 1) // 2
    for e, c in zip(engines, clean):
        e.counted = c if enough else e.runs
    loads = [r.foreign for e in engines for r in e.runs]
    print(f"other processes used {statistics.median(loads):.0%} of the CPUs in the median run (max "
          f"{max(loads):.0%}); " + (f"counting the runs under {args.max_load:.0%}" if enough else
                                    f"WARNING: too few runs under {args.max_load:.0%}: counting all, "
                                    f"the ratios are unreliable (eager suffers most)"))

    eager = engines[0]
    reference = eager.runs[-1].tokens
    n, decode_steps = args.tokens, args.tokens - 1

    def e2e(e):
        return n / e.median(lambda r: r.seconds)

    def decode(e):
        return decode_steps / e.median(lambda r: r.seconds - r.first)

    print(f"\nend to end = {n} new tokens / (prefill + decode), median run; decode = the {decode_steps} tokens "
          f"after the first / their time;\nbound = copy bandwidth {bw_multi / 1e9:.1f} GB/s / weight bytes read "
          f"per token (mv = the same with the matrix-vector read rate {mv_rate / 1e9:.1f} GB/s);\nratios against eager\n")
    header = (f"{'engine':28s} {'weights MB':>10s} {'prefill s':>9s} {'e2e tok/s':>9s} {'ratio':>6s} "
              f"{'decode tok/s':>12s} {'ratio':>6s} {'bound tok/s':>11s} {'of bound':>8s} {'of mv':>6s}  greedy tokens")
    print(header)
    print("-" * len(header))
    for e in engines:
        if not e.counted:
            print(f"{e.label:28s} no runs")
            continue
        bound = bw_multi / e.weight_bytes
        same = sum(1 for _ in iter_while_equal(e.runs[-1].tokens, reference))
        tokens_note = ("reference" if e is eager else
                       "= eager" if e.runs[-1].tokens == reference else f"first {same}/{n} = eager")
        print(f"{e.label:28s} {e.weight_bytes / 1e6:10.1f} {e.median(lambda r: r.first):9.3f} {e2e(e):9.1f} "
              f"{e2e(e) / e2e(eager):6.2f} {decode(e):12.1f} {decode(e) / decode(eager):6.2f} {bound:11.1f} "
              f"{decode(e) / bound:8.0%} {decode(e) * e.weight_bytes / mv_rate:6.0%}  {tokens_note}")
    for note in notes:
        print(f"note: {note}")
    print()
    for extra in sorted({e.extra for e in engines[1:]}):
        for kind, target in TARGETS.items():
            best = max((e for e in engines[1:] if e.kind == kind and e.extra == extra), key=e2e, default=None)
            if best is None:
                continue
            r_e2e, r_dec = e2e(best) / e2e(eager), decode(best) / decode(eager)
            verdict = "met" if r_e2e >= target else "MISSED"
            print(f"best {kind}{' of the --bundle ones' if extra else ''}: {best.label}: {r_e2e:.2f}x end to end, "
                  f"{r_dec:.2f}x decode only (target >= {target}x: {verdict})")
    fp32 = next((e for e in engines if e.label == "onnx fp32"), None)
    if fp32 is not None:
        print(f"greedy tokens of onnx fp32 {'match' if fp32.runs[-1].tokens == reference else 'DO NOT match'} "
              f"PyTorch's")

    if not args.skip_loss:
        print("\nint8 validation loss:", flush=True)
        loss_check(work, args.loss_steps, args.threads, data)


def iter_while_equal(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


if __name__ == "__main__":
    main()
