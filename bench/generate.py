"""Generation tokens/s of the exported model in onnxruntime (fp32, int8, int4, with and without fused
attention) against PyTorch eager and `transformers`' `generate`.

Batch 1, greedy, `--tokens` new tokens after a `--prompt`-token prompt of Tiny Shakespeare (GPT-2
tokenizer), GPT-2-small shape with random weights. The baselines are `lmspec.runtime.train.sampling`
(PyTorch eager with its KV cache) and `transformers`' GPT2LMHeadModel.generate (greedy, its KV cache)
with the same weights (`lmspec export hf`, then `from_pretrained`); the contenders are the bundles
`export_bundle` writes (what `lmspec export` gives users: fp32, `--quantize int8`, `--quantize int4`,
each also with `--fused-attention`, and with --variants all `--optimize` too), run by `OnnxModel`.
All engines live in one process and take turns run by run (the order rotates every round), so
drift in the machine's speed hits all alike; the median run of each is compared. Other processes
on a shared machine slow PyTorch's OpenMP threads far more than onnxruntime's, so the load they put
on the CPUs is measured during every run (/proc/stat), the benchmark waits for quiet before runs
(within --wait seconds) and counts only the runs under --max-load when there are enough of them.
A second phase times the prefill of a `--prefill-prompt`-token prompt (one new token) the same way.
Bundles now compute the prompt's last logits only (`logits_to_keep`); "onnx int8 (all logits)" runs
the int8 bundle computing them for every position, as lmspec did when issue 25 was filed: the
baseline of its prefill target.

Also: the machine's copy and read bandwidth (numpy) and, per engine, the bytes of weights read per
token (counted from the initializers of each ONNX file: int4's 4-bit blocks, scales and zero points
as stored), so each decode speed is shown as a fraction of the memory-bandwidth limit; and the int8
and int4 models' validation-loss change on Tiny Shakespeare (a small char model trained here for a
minute or two, since random GPT-2 weights give a meaningless loss). `--profile` adds onnxruntime's
per-operator profile of chosen bundles. Prints ratios; record them in bench/RESULTS.md.

    python bench/generate.py [--tokens 128 --prompt 128 --prefill-prompt 512 --rounds 7 --threads N]
                             [--variants default|all|LABEL,...] [--no-transformers] [--skip-loss | --only-loss]
                             [--profile LABEL,...] [--bundle LABEL=PATH ...] [--workdir DIR]
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
from lmspec.runtime.export.bundle import bundle_sidecar, session_options  # noqa: E402
from lmspec.runtime.serve.language_model import OnnxModel  # noqa: E402
from lmspec.runtime.serve.requests import GenerationRequest  # noqa: E402
from lmspec.runtime.data.tokenizer import FileTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TARGETS = {"fp32": 1.5, "int8": 2.5}  # ONNX tokens/s over eager tokens/s, from issue 4
LOSS_TARGET = 0.02  # int8 validation loss at most 2% above fp32's
BOUND_TARGET = 0.80  # issue 25: int8 decode with fused attention >= 80% of the bandwidth limit for its weights
PREFILL_TARGET = 1.5  # issue 25: prefill of --prefill-prompt tokens, fused int8 >= 1.5x the plain int8 export
ALL_LOGITS = "onnx int8 (all logits)"  # the plain int8 export as issue 25 found it: logits for every position

# (label, export_bundle keywords): every variant `lmspec export` offers for CPU
VARIANTS = [
    ("onnx fp32", {}),
    ("onnx fp32 --optimize", {"optimize": True}),
    ("onnx int8", {"quantize": "int8"}),
    ("onnx int8 --optimize", {"optimize": True, "quantize": "int8"}),
    ("onnx int4", {"quantize": "int4"}),
    ("onnx fp32 fused", {"fused_attention": True}),
    ("onnx int8 fused", {"quantize": "int8", "fused_attention": True}),
    ("onnx int4 fused", {"quantize": "int4", "fused_attention": True}),
]
# what runs without --variants: the --optimize ones were measured in issue 4 (they match the plain
# ones) and would add two minutes
DEFAULT_VARIANTS = [label for label, kwargs in VARIANTS if not kwargs.get("optimize")]

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


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Best bytes/s of reading a `gib` GiB float32 array (a sum, `threads` threads each summing a
    slice): what streaming weights needs, as a decode step reads them and writes almost nothing."""
    src = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in np.array_split(np.arange(src.size), threads)]

    def sum_slice(b):
        return np.add.reduce(src[b[0]:b[1]])  # numpy releases the GIL in the reduction

    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(sum_slice, bounds))
            best = max(best, src.nbytes / (time.perf_counter() - start))
    return best


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

def onnx_weight_bytes(path: Path) -> tuple[int, dict[str, int]]:
    """Bytes of weights one decode step reads from an ONNX file, and how they split by the operator
    that reads them: every initializer at its stored size (int4's packed 4-bit blocks, their fp32
    scales and packed zero points as they are), except that a table read only by a gather (token and
    position embeddings) costs one row per token."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total, split = 0, {}
    for init in model.graph.initializer:
        dims = list(init.dims)
        count = int(np.prod(dims)) if dims else 1
        readers = consumers.get(init.name, set())
        if readers and readers <= {"Gather", "GatherBlockQuantized"} and len(dims) >= 2:
            count //= dims[0]  # one row per token
        size = count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += size
        key = "/".join(sorted(readers)) or "unused"
        split[key] = split.get(key, 0) + size
    return total, split


def torch_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one eager decode step reads: all parameters (the tied token embedding is
    the LM head), less the position table, of which one row is read."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, Position):
            w = module.weight
            total -= (w.shape[0] - 1) * w.shape[1] * w.element_size()
    return total


def hf_weight_bytes(model: torch.nn.Module) -> int:
    """The same for transformers' GPT-2: its parameters (lm_head is tied to wte, counted once), less
    all but one row of the position table wpe."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    w = model.transformer.wpe.weight
    return total - (w.shape[0] - 1) * w.shape[1] * w.element_size()


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
    kind: str  # "eager", "hf", "fp32", "int8" or "int4": which target applies
    weight_bytes: int
    run: callable  # the prompt and --tokens new tokens
    prefill: callable  # the --prefill-prompt prompt and one new token
    extra: bool = False  # a bundle given with --bundle, not exported here
    fused: bool = False  # a bundle exported with fused attention
    path: Path | None = None  # a bundle's model file
    split: dict[str, int] = field(default_factory=dict)  # weight bytes by the operator reading them
    runs: list[Run] = field(default_factory=list)
    prefills: list[Run] = field(default_factory=list)
    counted: list[Run] = field(default_factory=list)  # the runs the summary uses
    counted_prefills: list[Run] = field(default_factory=list)

    def median(self, what, runs: list[Run] | None = None) -> float:
        return statistics.median(what(r) for r in (self.counted if runs is None else runs))


def eager_engine(model, prompt: list[int], tokens: int, long_prompt: list[int]) -> Engine:
    stamps: list[float] = []
    model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))

    def runner(ids: list[int], n: int):
        def run() -> Run:
            stamps.clear()
            start = time.perf_counter()
            new = generate(model, ids, n, temperature=0)
            end = time.perf_counter()
            return Run(end - start, stamps[0] - start, new)
        return run

    return Engine("pytorch eager (baseline)", "eager", torch_weight_bytes(model), runner(prompt, tokens),
                  runner(long_prompt, 1))


def transformers_engine(hf_dir: Path, prompt: list[int], tokens: int, long_prompt: list[int]) -> Engine:
    """transformers' GPT2LMHeadModel.generate, greedy with its KV cache, from the directory `lmspec
    export hf` wrote; a streamer stamps the first new token."""
    from transformers import GPT2LMHeadModel
    from transformers.generation.streamers import BaseStreamer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # first the prompt, then each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def runner(ids: list[int], n: int):
        tensor = torch.tensor([ids])
        mask = torch.ones_like(tensor)

        def run() -> Run:
            stamps = Stamps()
            start = time.perf_counter()
            with torch.no_grad():
                # no end-of-text: exactly n tokens, as the other engines make
                out = model.generate(tensor, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True,
                                     eos_token_id=None, pad_token_id=0, streamer=stamps)
            end = time.perf_counter()
            return Run(end - start, stamps.times[1] - start, out[0, len(ids):].tolist())
        return run

    label = f"transformers generate ({model.config._attn_implementation})"
    return Engine(label, "hf", hf_weight_bytes(model), runner(prompt, tokens), runner(long_prompt, 1))


def onnx_engine(label: str, path: Path, prompt: list[int], tokens: int, threads: int, long_prompt: list[int],
                extra: bool = False, all_logits: bool = False) -> Engine:
    model = OnnxModel(path, threads=threads)
    if all_logits:  # never ask for the last positions' logits only: the session computes them all
        model.asks_for_kept_logits = False

    def runner(ids: list[int], n: int):
        request = GenerationRequest(ids, max_tokens=n, temperature=0, stop_at_eot=False)

        def run() -> Run:
            new, first = [], None
            start = time.perf_counter()
            for event in model.stream([request]):  # what OnnxModel.generate runs, with a time per token
                if first is None:
                    first = time.perf_counter() - start
                if event.token is not None:
                    new.append(event.token)
            return Run(time.perf_counter() - start, first, new)
        return run

    kind = model.meta.get("quantized") or "fp32"
    total, split = onnx_weight_bytes(path)
    return Engine(label, kind, total, runner(prompt, tokens), runner(long_prompt, 1), extra=extra,
                  fused=model.shared_buffer, path=path, split=split)


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


def short(label: str) -> str:
    label = label.replace("onnx ", "").replace(" (baseline)", "").replace(" (all logits)", " all-logits")
    return label.split(" (")[0].replace("transformers generate", "transformers")


def alternate(engines: list[Engine], rounds: int, limit: float, budget: list[float], phase: str = "run") -> None:
    """One untimed warm-up run each, then `rounds` rounds of one run each, the order rotating.
    Before each run, wait (within the seconds left in budget[0]) for other processes to calm down.
    `phase` "run" times each engine's `run` into its `runs`, "prefill" its `prefill` into `prefills`."""
    probe = ForeignLoad()
    store = "runs" if phase == "run" else "prefills"
    for e in engines:
        getattr(e, phase)()
    for r in range(rounds):
        shift = r % len(engines)
        for e in engines[shift:] + engines[:shift]:
            wait_for_quiet(budget, limit)
            time.sleep(0.1)  # onnxruntime's idle threads spin briefly after a run: let them settle
            probe.start()
            result = getattr(e, phase)()
            result.foreign = probe.stop()
            getattr(e, store).append(result)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{short(e.label)} {getattr(e, store)[-1].seconds:.2f} s ({getattr(e, store)[-1].foreign:.0%})"
            for e in engines), flush=True)


def count_quiet(engines: list[Engine], rounds: int, limit: float, phase: str = "run") -> bool:
    """Keep each engine's runs under `limit` of other load, when every engine has at least half of
    its rounds so; otherwise all of them (and say the result is unreliable). True when quiet enough."""
    store, counted = ("runs", "counted") if phase == "run" else ("prefills", "counted_prefills")
    clean = [[r for r in getattr(e, store) if r.foreign <= limit] for e in engines]
    enough = min(len(c) for c in clean) >= (rounds + 1) // 2
    for e, c in zip(engines, clean):
        setattr(e, counted, c if enough else getattr(e, store))
    loads = [r.foreign for e in engines for r in getattr(e, store)]
    print(f"other processes used {statistics.median(loads):.0%} of the CPUs in the median run (max "
          f"{max(loads):.0%}); " + (f"counting the runs under {limit:.0%}" if enough else
                                    f"WARNING: too few runs under {limit:.0%}: counting all, "
                                    f"the ratios are unreliable (eager suffers most)"), flush=True)
    return enough


# ------------------------------------------------------------------------------------------ export

def bundle_path(out: Path, label: str) -> Path:
    return out / f"gpt2-{label.replace('onnx ', '').replace(' --', '-').replace(' ', '-')}.onnx"


def export_variants(checkpoint: Path, out: Path, variants: list[str], prompt: list[int], tokens: int, threads: int,
                    long_prompt: list[int], reuse: bool) -> tuple[list[Engine], list[str]]:
    engines, notes = [], []
    optimize_failed = None
    for label, kwargs in VARIANTS:
        if label not in variants:
            continue
        path = bundle_path(out, label)
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
        engines.append(onnx_engine(label, path, prompt, tokens, threads, long_prompt))
        if label == "onnx int8":
            engines.append(onnx_engine(ALL_LOGITS, path, prompt, tokens, threads, long_prompt, all_logits=True))
    return engines, notes


def export_transformers(checkpoint: Path, out: Path) -> Path:
    """The checkpoint as a Hugging Face directory, by what `lmspec export hf` runs (reused if there)."""
    from lmspec.runtime.hf.convert import export_hf

    if not (out / "config.json").is_file():
        started = time.perf_counter()
        shutil.rmtree(out, ignore_errors=True)  # a half-written one
        export_hf(checkpoint, out, log=lambda *_: None)
        print(f"  transformers: `lmspec export hf` in {time.perf_counter() - started:.0f} s", flush=True)
    return out


# -------------------------------------------------------------------------------------------- loss

def loss_check(work: Path, steps: int, threads: int, data: Path) -> None:
    """Train the Shakespeare char model briefly, export it fp32, int8 and int4, and compare the mean
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
                          ("onnx int8 --optimize", {"optimize": True, "quantize": "int8"}),
                          ("onnx int4", {"quantize": "int4"})]:
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
        elif label.startswith("onnx int4"):
            line += f", vs onnx fp32 {loss / base - 1:+.3%} (no target set; int8's would be <= +{LOSS_TARGET:.0%})"
        print(line)


# -------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (the start of Tiny Shakespeare)")
    ap.add_argument("--prefill-prompt", type=int, default=512,
                    help="prompt tokens of the prefill phase (one new token each; 0 skips the phase)")
    ap.add_argument("--rounds", type=int, default=7, help="timed runs per engine, taking turns")
    ap.add_argument("--prefill-rounds", type=int, default=7, help="timed prefill runs per engine, taking turns")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime threads")
    ap.add_argument("--skip-loss", action="store_true", help="skip the int8/int4 validation-loss check")
    ap.add_argument("--only-loss", action="store_true", help="run only the validation-loss check")
    ap.add_argument("--loss-steps", type=int, default=2000,
                    help="training steps of the char model for the loss check (~1.5 min on 2 cores)")
    ap.add_argument("--variants", default="default",
                    help="'default' (" + ", ".join(DEFAULT_VARIANTS) + "), 'all' (adds the --optimize ones), "
                         "or a comma-separated subset of: " + ", ".join(label for label, _ in VARIANTS))
    ap.add_argument("--no-transformers", action="store_true", help="leave out transformers' generate")
    ap.add_argument("--profile", default="onnx int8,onnx int8 fused,onnx int4 fused",
                    help="comma-separated bundle labels ('all', or 'none') to profile with onnxruntime's profiler "
                         "after timing: the operators' shares of a decode step and of the prefill (default: %(default)s)")
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
    if args.variants == "default":
        args.variants = list(DEFAULT_VARIANTS)
    elif args.variants == "all":
        args.variants = [label for label, _ in VARIANTS]
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in args.variants if v not in {label for label, _ in VARIANTS}]
        if unknown:
            ap.error(f"--variants: unknown {', '.join(unknown)}")
    if args.skip_loss and args.only_loss:
        ap.error("--skip-loss and --only-loss exclude each other")
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

    started = time.perf_counter()
    data = Path(args.data)
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
          f"({args.threads} threads)" + ("" if args.no_transformers else f", transformers {transformers_version()}"))
    if args.only_loss:
        print("\nint8 and int4 validation loss:", flush=True)
        loss_check(work, args.loss_steps, args.threads, data)
        return
    budget = [args.wait]
    wait_for_quiet(budget, args.max_load)
    rates = [measure_bandwidth(args.threads)]

    tokenizer = FileTokenizer.from_path(args.tokenizer)
    text = data.read_text(encoding="utf-8")
    prompt = tokenizer.encode(text[:20 * args.prompt])[:args.prompt]
    # with --prefill-prompt 0 the phase is skipped, and its runners are never called
    long_prompt = tokenizer.encode(text[:20 * args.prefill_prompt])[:args.prefill_prompt] or prompt
    overrides = {"dropout": 0.0}
    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"), overrides=overrides)
    if args.prompt + args.tokens > graph.context or args.prefill_prompt + 1 > graph.context:
        raise SystemExit(f"--prompt + --tokens and --prefill-prompt + 1 must fit the context of {graph.context}")
    model = lower(graph, seed=0).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {graph.name}, {params:,} parameters (random init), batch 1, greedy, {args.prompt}-token prompt "
          f"+ {args.tokens} new tokens" + (f"; prefill phase: {len(long_prompt)}-token prompt + 1 token"
                                            if args.prefill_prompt and args.prefill_rounds else ""), flush=True)

    checkpoint = work / "gpt2-run" / "checkpoints" / "step_000000"
    if not checkpoint.is_dir():
        save_checkpoint(work / "gpt2-run", step=0, model=model, optimizer=None, rng=None, train_config={},
                        metrics={}, tokenizer=tokenizer.to_json(), spec=spec_record(graph, overrides))
    print("exporting with export_bundle (each checked against PyTorch):", flush=True)
    onnx_engines, notes = export_variants(checkpoint, work, args.variants, prompt, args.tokens, args.threads,
                                          long_prompt, reuse=bool(args.workdir))
    for item in args.bundle:
        label, _, path = item.partition("=")
        onnx_engines.append(onnx_engine(label, Path(path), prompt, args.tokens, args.threads, long_prompt,
                                        extra=True))
    engines = [eager_engine(model, prompt, args.tokens, long_prompt)]
    if not args.no_transformers:
        engines.append(transformers_engine(export_transformers(checkpoint, work / "gpt2-hf"), prompt, args.tokens,
                                           long_prompt))
    engines += onnx_engines
    print(f"exports and sessions ready after {time.perf_counter() - started:.0f} s", flush=True)

    print(f"timing: {args.rounds} rounds of {args.prompt} + {args.tokens} tokens, engines taking turns "
          f"(seconds per run, other processes' share of the CPUs)", flush=True)
    alternate(engines, args.rounds, args.max_load, budget)
    count_quiet(engines, args.rounds, args.max_load)
    if args.prefill_prompt and args.prefill_rounds:
        print(f"prefill: {args.prefill_rounds} rounds of {len(long_prompt)} prompt tokens + 1, engines taking turns",
              flush=True)
        alternate(engines, args.prefill_rounds, args.max_load, budget, phase="prefill")
        count_quiet(engines, args.prefill_rounds, args.max_load, phase="prefill")
    wait_for_quiet(budget, args.max_load)
    rates.append(measure_bandwidth(args.threads, again=True))  # a single measurement can fall short
    bound_rate = max(max(r["copy"], r["read"]) for r in rates)
    mv_rate = max(r["mv"] for r in rates)
    print(f"bandwidth limit used below: the highest copy or read figure measured, {bound_rate / 1e9:.1f} GB/s",
          flush=True)
    report(args, engines, notes, bound_rate, mv_rate, len(long_prompt))

    if args.profile != "none":
        wanted = [e for e in engines if e.path is not None
                  and (args.profile == "all" or e.label in {v.strip() for v in args.profile.split(",")})]
        for e in wanted:
            profile_bundle(e, prompt, args.tokens, long_prompt, args.threads, work)
    print(f"\ntimings done after {time.perf_counter() - started:.0f} s", flush=True)

    if not args.skip_loss:
        print("\nint8 and int4 validation loss:", flush=True)
        loss_check(work, args.loss_steps, args.threads, data)
    print(f"\nall done after {time.perf_counter() - started:.0f} s")


def measure_bandwidth(threads: int, again: bool = False) -> dict[str, float]:
    copy_single, copy = copy_bandwidth(threads)
    rates = {"copy": copy, "read": read_bandwidth(threads), "mv": matvec_read_rate(threads)}
    print(f"{'again, after the timings: ' if again else ''}copy bandwidth (numpy, 1 GiB, read + write, best of 5): "
          f"{copy_single / 1e9:.1f} GB/s with 1 thread, {copy / 1e9:.1f} GB/s with {threads}; read bandwidth (numpy "
          f"sum, 1 GiB, {threads} threads, best of 5): {rates['read'] / 1e9:.1f} GB/s; read rate of an fp32 "
          f"matrix-vector product (torch, 512 MiB, {threads} threads, best of 5): {rates['mv'] / 1e9:.1f} GB/s",
          flush=True)
    return rates


def transformers_version() -> str:
    try:
        from importlib.metadata import version
        return version("transformers")
    except Exception:  # not installed: the engine will say so
        return "not installed"


def report(args, engines: list[Engine], notes: list[str], bound_rate: float, mv_rate: float, long: int) -> None:
    eager = engines[0]
    hf = next((e for e in engines if e.kind == "hf"), None)
    by_label = {e.label: e for e in engines}
    reference = eager.runs[-1].tokens
    n, decode_steps = args.tokens, args.tokens - 1
    prefilled = bool(args.prefill_prompt and args.prefill_rounds)

    def e2e(e):
        return n / e.median(lambda r: r.seconds)

    def decode(e):
        return decode_steps / e.median(lambda r: r.seconds - r.first)

    def prefill_long(e):
        return e.median(lambda r: r.seconds, e.counted_prefills) if prefilled and e.counted_prefills else float("nan")

    def agreement(tokens, ref, name):
        if tokens == ref:
            return f"= {name}"
        return f"first {sum(1 for _ in iter_while_equal(tokens, ref))}/{n} = {name}"

    print(f"\nend to end = {n} new tokens / (prefill + decode), median run; decode = the {decode_steps} tokens "
          f"after the first / their time;\nprefill P = seconds from a P-token prompt to its first new token "
          f"(median run); bound = bandwidth limit {bound_rate / 1e9:.1f} GB/s / weight bytes read per token "
          f"(mv = the same with the matrix-vector read rate {mv_rate / 1e9:.1f} GB/s);\nratios: vs eager, "
          f"vs transformers\n")
    header = (f"{'engine':28s} {'weights MB':>10s} {f'prefill {args.prompt}':>11s} {f'prefill {long}':>11s} "
              f"{'e2e tok/s':>9s} {'/eager':>6s} {'/hf':>5s} {'decode tok/s':>12s} {'/eager':>6s} {'/hf':>5s} "
              f"{'bound tok/s':>11s} {'of bound':>8s} {'of mv':>6s}  greedy tokens")
    print(header)
    print("-" * len(header))
    for e in engines:
        if not e.counted:
            print(f"{e.label:28s} no runs")
            continue
        bound = bound_rate / e.weight_bytes
        note = "reference" if e is eager else agreement(e.runs[-1].tokens, reference, "eager")
        plain = by_label.get(e.label.replace(" fused", "")) if e.fused else None
        if plain is not None and plain is not e:
            note += "; " + agreement(e.runs[-1].tokens, plain.runs[-1].tokens, "unfused")
        vs_hf = (lambda a, b: f"{a / b:5.2f}") if hf is not None else (lambda a, b: f"{'-':>5s}")
        print(f"{e.label:28s} {e.weight_bytes / 1e6:10.1f} {e.median(lambda r: r.first):11.3f} "
              f"{prefill_long(e):11.3f} {e2e(e):9.1f} {e2e(e) / e2e(eager):6.2f} "
              f"{vs_hf(e2e(e), e2e(hf) if hf else 1)} {decode(e):12.1f} {decode(e) / decode(eager):6.2f} "
              f"{vs_hf(decode(e), decode(hf) if hf else 1)} {bound:11.1f} {decode(e) / bound:8.0%} "
              f"{decode(e) * e.weight_bytes / mv_rate:6.0%}  {note}")
    for note in notes:
        print(f"note: {note}")
    print("\nweights read per token, by the operator that reads them (ONNX initializers at their stored size):")
    for e in engines:
        if e.split:
            print(f"  {e.label:26s} " + ", ".join(f"{op} {size / 1e6:.1f} MB" for op, size in
                                                  sorted(e.split.items(), key=lambda kv: -kv[1]) if size >= 5e4))
    print()
    for extra in sorted({e.extra for e in engines if e.path is not None}):
        for kind, target in TARGETS.items():
            best = max((e for e in engines if e.path is not None and e.kind == kind and e.extra == extra), key=e2e,
                       default=None)
            if best is None:
                continue
            r_e2e, r_dec = e2e(best) / e2e(eager), decode(best) / decode(eager)
            verdict = "met" if r_e2e >= target else "MISSED"
            print(f"issue 4, best {kind}{' of the --bundle ones' if extra else ''}: {best.label}: {r_e2e:.2f}x eager "
                  f"end to end, {r_dec:.2f}x decode only (target >= {target}x: {verdict})")
    fused8, plain8 = by_label.get("onnx int8 fused"), by_label.get("onnx int8")
    for e in (plain8, fused8, by_label.get("onnx int4"), by_label.get("onnx int4 fused")):
        if e is not None and e.counted:
            line = f"decode of {e.label}: {decode(e) / (bound_rate / e.weight_bytes):.0%} of the bandwidth limit"
            if e is fused8:
                line += f" (issue 25 target >= {BOUND_TARGET:.0%}: " + \
                        ("met" if decode(e) / (bound_rate / e.weight_bytes) >= BOUND_TARGET else "MISSED") + ")"
            print(line)
    today = by_label.get(ALL_LOGITS)
    if prefilled and fused8 is not None and today is not None and fused8.counted_prefills and today.counted_prefills:
        ratio = prefill_long(today) / prefill_long(fused8)
        print(f"{fused8.label} vs {today.label}: prefill of {long} tokens {ratio:.2f}x "
              f"(issue 25 target >= {PREFILL_TARGET}x: {'met' if ratio >= PREFILL_TARGET else 'MISSED'})")
    for e in engines:  # each fused bundle against the same weights unfused
        plain = by_label.get(e.label.replace(" fused", "")) if e.fused else None
        if plain is None or plain is e or not (e.counted and plain.counted):
            continue
        line = (f"{e.label} vs {plain.label}: decode {decode(e) / decode(plain):.2f}x, prefill of {args.prompt} "
                f"tokens {plain.median(lambda r: r.first) / e.median(lambda r: r.first):.2f}x")
        if prefilled and e.counted_prefills and plain.counted_prefills:
            ratio = prefill_long(plain) / prefill_long(e)
            line += f", prefill of {long} tokens {ratio:.2f}x"
        print(line)
    for label in ("onnx fp32", "onnx fp32 fused"):
        e = by_label.get(label)
        if e is not None:
            print(f"greedy tokens of {label} {'match' if e.runs[-1].tokens == reference else 'DO NOT match'} "
                  f"PyTorch's")
    if hf is not None:
        print(f"greedy tokens of transformers {'match' if hf.runs[-1].tokens == reference else 'DO NOT match'} "
              f"PyTorch eager's")


def profile_bundle(e: Engine, prompt: list[int], tokens: int, long_prompt: list[int], threads: int,
                   work: Path) -> None:
    """One run of `prompt` + `tokens` and one prefill of `long_prompt` in a session with onnxruntime's
    profiler on; prints each operator type's share of the kernel time of a decode step and of the
    long prefill, and how much of a step's time is outside the kernels."""
    import json

    import onnxruntime as ort

    model = OnnxModel(e.path, threads=threads)
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(work / f"profile-{bundle_path(work, e.label).stem}")
    model.session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
    for ids, n in ((prompt, tokens), (long_prompt, 1)):
        list(model.stream([GenerationRequest(ids, max_tokens=n, temperature=0, stop_at_eot=False)]))
    trace = Path(model.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = sorted((ev for ev in events if ev.get("name") == "model_run"), key=lambda ev: ev["ts"])
    nodes = sorted((ev for ev in events if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time")),
                   key=lambda ev: ev["ts"])
    per_run: list[dict[str, float]] = [{} for _ in runs]
    i = 0
    for node in nodes:
        while i < len(runs) and node["ts"] > runs[i]["ts"] + runs[i]["dur"]:
            i += 1
        if i == len(runs):
            break
        op = node.get("args", {}).get("op_name", "?")
        per_run[i][op] = per_run[i].get(op, 0.0) + node["dur"]
    decode_runs = list(range(1, len(runs) - 1))  # 0: the short prompt, last: the long one

    def shares(indices: list[int]) -> str:
        ops: dict[str, float] = {}
        for j in indices:
            for op, d in per_run[j].items():
                ops[op] = ops.get(op, 0.0) + d
        kernels = sum(ops.values())
        wall = sum(runs[j]["dur"] for j in indices)
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:7]
        return (f"{wall / len(indices) / 1e3:.2f} ms per call, kernels {kernels / wall:.0%} of it: "
                + ", ".join(f"{op} {d / kernels:.0%}" for op, d in top))

    print(f"\nprofile of {e.label} (onnxruntime's profiler, {threads} threads):")
    if decode_runs:
        print(f"  decode ({len(decode_runs)} steps, {len(prompt) + 1}-{len(prompt) + tokens - 1} tokens in the cache): "
              f"{shares(decode_runs)}")
    print(f"  prefill of {len(long_prompt)} tokens: {shares([len(runs) - 1])}", flush=True)


def iter_while_equal(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


if __name__ == "__main__":
    main()
