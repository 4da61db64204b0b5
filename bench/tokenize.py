"""Tokenizing a corpus into shards: lmspec's write_shards against Hugging Face `tokenizers` alone.

The corpus is Tiny Shakespeare's paragraphs (split on blank lines), repeated until it reaches
--mb megabytes, generated lazily so that the corpus itself takes no memory. Both sides encode the
same documents in the same batches with GPT-2's tokenizer; the baseline calls `encode_batch` and
throws the ids away, write_shards also turns them into arrays, adds the end-of-text separators,
splits train/val and writes the shard files. They take turns round by round, so that drift in the
machine's speed hits both, and the median of each is compared. `encode_batch_fast` (the same Rust
call without character offsets, which write_shards uses) is timed too.

Peak memory: each side runs alone in a fresh process on the half corpus and on the whole one;
streaming shows as a peak that does not grow with the corpus.

Dataset formats (issue 24): the same documents written to a Parquet file are tokenized from it
(`documents.read_documents` reading record batches, into write_shards) as a fourth method of the
rounds. And --stream-gb of text (Tiny Shakespeare repeated into one file under the temp folder) goes
through the real `lmspec data tokenize` in a fresh process, against `encode_batch` (and
`encode_batch_fast`) on the same text read in the same 256 KiB pieces, batches of 8, each in another;
each reports tokens/s and its peak resident memory (VmHWM: the whole process, imports included).

    python bench/tokenize.py [--mb 50 --rounds 3 --stream-gb 1 | --stream-only]
"""
from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's `tokenize` module, which torch, inspect and
# linecache import: take its folder off the import path before anything imports it.
BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import tokenizers  # noqa: E402

from lmspec.runtime.data.documents import list_input_files, read_documents  # noqa: E402
from lmspec.runtime.data.formats import PIECE_BYTES  # noqa: E402
from lmspec.runtime.data.shards import DEFAULT_BATCH_CHARS, DEFAULT_BATCH_DOCS, document_batches, write_shards  # noqa: E402
from lmspec.runtime.data.tokenizer import FileTokenizer  # noqa: E402

ROOT = BENCH_DIR.parent
DATA = ROOT.parent / "shared" / "data"
GPT2 = DATA / "gpt2-tokenizer"
SHAKESPEARE = DATA / "tinyshakespeare.txt"


class Corpus:
    """Tiny Shakespeare's paragraphs, cycled until `mb` megabytes of UTF-8; iterating yields the
    same str objects again, so only one copy of the paragraphs is ever in memory."""

    def __init__(self, mb: float):
        text = SHAKESPEARE.read_text(encoding="utf-8")
        self.paragraphs = [p for p in text.split("\n\n") if p.strip()]
        sizes = [len(p.encode("utf-8")) for p in self.paragraphs]
        target = int(mb * 1e6)
        self.documents, self.bytes = 0, 0
        for size in itertools.cycle(sizes):
            if self.bytes >= target:
                break
            self.documents += 1
            self.bytes += size

    def __iter__(self) -> Iterator[str]:
        return itertools.islice(itertools.cycle(self.paragraphs), self.documents)


def run_baseline(hf: tokenizers.Tokenizer, corpus: Corpus, fast: bool = False) -> None:
    encode = hf.encode_batch_fast if fast else hf.encode_batch
    for batch in document_batches(corpus, DEFAULT_BATCH_DOCS, DEFAULT_BATCH_CHARS):
        encode(batch, add_special_tokens=False)  # the ids are discarded


def run_ours(tok: FileTokenizer, corpus: Corpus, out_dir: Path) -> dict:
    return write_shards(corpus, tok, out_dir, overwrite=True)


def write_parquet(corpus: Corpus, path: Path, rows_per_group: int = 65_536) -> None:
    """The corpus's documents as a Parquet file with one string column, `text`, a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        documents = iter(corpus)
        while group := list(itertools.islice(documents, rows_per_group)):
            writer.write_table(pa.table({"text": group}, schema=schema))


def run_ours_parquet(tok: FileTokenizer, parquet: Path, out_dir: Path) -> dict:
    return write_shards(read_documents(list_input_files([str(parquet)])), tok, out_dir, overwrite=True)


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def cpu_seconds() -> float:
    """User + system time of this process, all its threads: what the work cost, whatever else
    the (shared) machine was doing meanwhile."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------- memory, in a subprocess

def run_holding_ids(hf: tokenizers.Tokenizer, corpus: Corpus) -> list:
    """The control: encode like the baseline but keep every id (as uint16), as a pipeline that
    tokenizes the whole corpus before writing would; its peak must grow with the corpus."""
    import numpy as np

    return [np.array(e.ids, dtype=np.uint16)
            for batch in document_batches(corpus, DEFAULT_BATCH_DOCS, DEFAULT_BATCH_CHARS)
            for e in hf.encode_batch_fast(batch, add_special_tokens=False)]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of resident memory (VmHWM) to the current RSS, so the
    peak measured afterwards is that of the run alone, not of loading the tokenizer."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(method: str, mb: float) -> None:
    """Run one method alone; print the resident memory before it and its peak during it."""
    import gc

    tok = FileTokenizer.from_path(GPT2)
    corpus = Corpus(mb)
    gc.collect()
    exact = _reset_peak_rss()
    before = _status_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        if method == "ours":
            seconds, _ = timed(run_ours, tok, corpus, Path(tmp))
        elif method == "baseline":
            seconds, _ = timed(run_baseline, tok.tokenizer, corpus)
        else:
            seconds, _ = timed(run_holding_ids, tok.tokenizer, corpus)
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "peak_kib": peak, "seconds": seconds, "exact": exact}))


def write_repeated_text(path: Path, gb: float) -> int:
    """Tiny Shakespeare repeated into one file of about `gb` GB; its size in bytes."""
    text = SHAKESPEARE.read_bytes()
    with path.open("wb") as f:
        for _ in range(max(1, round(gb * 1e9 / len(text)))):
            f.write(text)
    return path.stat().st_size


def stream_worker(method: str, text_file: str) -> None:
    """Tokenize one big text file alone: `lmspec data tokenize` as a user runs it, or encode_batch on
    the same 256 KiB pieces, 8 a batch (the ids thrown away); print tokens, seconds and the peak."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if method == "ours":
            from lmspec.runtime.cli.main import main as lmspec_main

            assert lmspec_main(["data", "tokenize", text_file, "--tokenizer", str(GPT2), "--out", tmp,
                                "--val-fraction", "0", "--no-progress", "--overwrite"]) == 0
            tokens = json.loads((Path(tmp) / "meta.json").read_text())["tokens"] - 1  # less the one end-of-text
        else:
            hf = FileTokenizer.from_path(GPT2).tokenizer
            encode = hf.encode_batch_fast if method == "fast" else hf.encode_batch
            tokens = 0
            with open(text_file, encoding="utf-8") as f:
                while batch := [piece for piece in (f.read(PIECE_BYTES) for _ in range(8)) if piece]:
                    tokens += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
        seconds = time.perf_counter() - start
    print(json.dumps({"tokens": tokens, "seconds": seconds, "peak_kib": _status_kib("VmHWM")}))


def measure_stream(method: str, text_file: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--stream-worker", method, "--text-file", str(text_file)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(method: str, mb: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", method, "--mb", str(mb)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each method (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--stream-gb", type=float, default=1.0,
                        help="GB of text for the streaming run through `lmspec data tokenize` (default 1; 0: none)")
    parser.add_argument("--worker", choices=["ours", "baseline", "hold"], help=argparse.SUPPRESS)
    parser.add_argument("--stream-only", action="store_true", help="only the streaming run")
    parser.add_argument("--stream-worker", choices=["ours", "baseline", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--text-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.mb)
        return
    if args.stream_worker:
        stream_worker(args.stream_worker, args.text_file)
        return
    if args.stream_only:
        stream(args.stream_gb)
        return

    tok = FileTokenizer.from_path(GPT2)
    corpus = Corpus(args.mb)
    print(f"corpus: {SHAKESPEARE.name} paragraphs repeated, {corpus.bytes / 1e6:.1f} MB, "
          f"{corpus.documents:,} documents")
    print(f"tokenizer: GPT-2 ({GPT2}), tokenizers {tokenizers.__version__}, {os.cpu_count()} CPUs, "
          f"batches of {DEFAULT_BATCH_DOCS} documents")

    methods = {
        "tokenizers encode_batch (baseline)": lambda: run_baseline(tok.tokenizer, corpus),
        "tokenizers encode_batch_fast": lambda: run_baseline(tok.tokenizer, corpus, fast=True),
        "lmspec write_shards": lambda: run_ours(tok, corpus, out_dir),
        "lmspec write_shards from .parquet": lambda: run_ours_parquet(tok, parquet, out_dir),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "shards"
        parquet = Path(tmp) / "corpus.parquet"
        write_parquet(corpus, parquet)
        print(f"parquet: {parquet.stat().st_size / 1e6:.1f} MB (snappy), {corpus.documents:,} rows")
        meta = run_ours(tok, corpus, out_dir)  # warm-up: page cache, the tokenizer's word cache
        run_ours_parquet(tok, parquet, out_dir)  # and pyarrow's import
        names = list(methods)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                cpu_before = cpu_seconds()
                seconds, _ = timed(methods[name])
                times[name].append(seconds)
                cpu[name].append(cpu_seconds() - cpu_before)
                print(f"  round {r + 1}: {name}: {seconds:.2f} s, {cpu[name][-1]:.2f} CPU s", flush=True)
    text_tokens = meta["tokens"] - meta["documents"]  # without the end-of-text separators
    print(f"tokens: {text_tokens:,} (+ {meta['documents']:,} end-of-text separators in the shards, "
          f"{meta['dtype']}, {len(meta['splits']['train']['shards'])} train shards)")

    print(f"\nthroughput, median of {args.rounds} rounds taken in turns:")
    print(f"  {'method':<36}{'MB/s':>8}{'tokens/s':>14}{'seconds':>10}{'CPU s':>8}")
    median = {name: statistics.median(t) for name, t in times.items()}
    median_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    for name, seconds in median.items():
        print(f"  {name:<36}{corpus.bytes / 1e6 / seconds:>8.2f}{text_tokens / seconds:>14,.0f}{seconds:>10.2f}"
              f"{median_cpu[name]:>8.2f}")
    (base, fast, ours, ours_parquet), (base_cpu, fast_cpu, ours_cpu, _) = median.values(), median_cpu.values()
    print(f"ratio write_shards / encode_batch (throughput):      {base / ours:.3f}  (target >= 0.9)")
    print(f"ratio write_shards from .parquet / encode_batch:     {base / ours_parquet:.3f}")
    print(f"ratio write_shards / encode_batch_fast (throughput): {fast / ours:.3f}")
    print(f"CPU time per byte, encode_batch / write_shards:      {base_cpu / ours_cpu:.3f}  "
          f"(encode_batch_fast / write_shards: {fast_cpu / ours_cpu:.3f})")

    if args.stream_gb > 0:
        stream(args.stream_gb)
    if args.no_memory:
        return
    print("\npeak resident memory, each run alone in a fresh process; growth = peak during the run - RSS before it:")
    print(f"  {'method':<40}{'corpus':>8}{'peak MiB':>10}{'growth MiB':>12}{'seconds':>10}")
    for method, label in (("ours", "lmspec write_shards"), ("baseline", "tokenizers encode_batch"),
                          ("hold", "control: encode, keep all ids as uint16")):
        for mb in (args.mb / 2, args.mb):
            m = measure_memory(method, mb)
            peak, growth = m["peak_kib"] / 1024, (m["peak_kib"] - m["before_kib"]) / 1024
            print(f"  {label:<40}{mb:>6.0f}MB{peak:>10.1f}{growth:>12.1f}{m['seconds']:>10.2f}", flush=True)
    if not m["exact"]:
        print("  (no /proc/self/clear_refs here: peaks are ru_maxrss, including the set-up)")


def stream(gb: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "repeated.txt"
        size = write_repeated_text(text_file, gb)
        print(f"\nstreaming {size / 1e9:.2f} GB of text ({text_file.name}: {SHAKESPEARE.name} repeated), each run "
              f"alone in a fresh process:")
        print(f"  {'method':<44}{'MB/s':>8}{'tokens/s':>14}{'seconds':>10}{'peak RSS MiB':>14}")
        results = {}
        for method, label in (("baseline", "tokenizers encode_batch, 256 KiB pieces x 8"),
                              ("fast", "tokenizers encode_batch_fast, the same"),
                              ("ours", "lmspec data tokenize (into shards)")):
            m = results[method] = measure_stream(method, text_file)
            print(f"  {label:<44}{size / 1e6 / m['seconds']:>8.2f}{m['tokens'] / m['seconds']:>14,.0f}"
                  f"{m['seconds']:>10.1f}{m['peak_kib'] / 1024:>14.0f}", flush=True)
    rate = {method: m["tokens"] / m["seconds"] for method, m in results.items()}
    print(f"ratio lmspec data tokenize / encode_batch (tokens/s):      {rate['ours'] / rate['baseline']:.3f}")
    print(f"ratio lmspec data tokenize / encode_batch_fast (tokens/s): {rate['ours'] / rate['fast']:.3f}")
    print(f"peak RSS of lmspec data tokenize: {results['ours']['peak_kib'] / 1024:.0f} MiB (target < 1024 MiB)")


if __name__ == "__main__":
    main()
