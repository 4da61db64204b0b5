"""Decoding deep into a long text with sliding-window layers: a bounded KV cache against a full one.

A Gemma-3-like model (five sliding-window layers to one global, window 128, context 4,096, 12
layers x 512, random weights) is exported twice in this run: as `lmspec export` writes it (each
sliding layer keeps its last 127 positions) and, the baseline, with every layer keeping the whole
sequence (the export before bounded caches). Both bundles decode the same greedy tokens from a
prompt of --prompt tokens (checked), timed per token after the prompt; the cache each holds at the
end is measured too. Prints the ratios; record them in bench/RESULTS.md.

    python bench/bounded_cache.py [--prompt 3000 --tokens 64 --threads N]
"""
from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # this folder's tokenize.py would shadow the standard library's

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402

SPEC = """model local_global {
  vocab = 512; context = 4096; dim = 512; heads = 8; layers = 12
  input tokens: i64[batch, seq <= context]
  x = embedding(tokens, vocab, dim) as embed
  repeat layers as block, i {
    x = x + attention(rmsnorm(x) as attn_norm, heads, kv_heads=2, rope=true, bias=false,
                      window=none if i % 6 == 5 else 128) as attn
    x = x + mlp(rmsnorm(x) as mlp_norm, 1536, act=silu, gated=true, bias=false) as mlp
  }
  logits = linear(rmsnorm(x) as norm, vocab, bias=false) as head
  output logits
}
"""


def export(workdir: Path, name: str, bounded: bool) -> Path:
    from lmspec.compiler import onnx_export
    from lmspec.runtime.export.from_checkpoint import export_bundle

    path = workdir / f"{name}.onnx"
    if bounded:
        export_bundle(str(workdir / "run"), str(path), log=lambda *_: None)
    else:
        with mock.patch.object(onnx_export, "_kept_by_window", lambda window, context: None):
            export_bundle(str(workdir / "run"), str(path), log=lambda *_: None)
    return path


def decode(path: Path, prompt: list[int], tokens: int, threads: int | None) -> tuple[list[int], float, int]:
    """Greedy tokens, seconds per decoded token after the prompt, and the cache's bytes at the end."""
    from lmspec.runtime.serve.language_model import OnnxModel

    model = OnnxModel(path, threads=threads)
    ids = np.array([prompt], dtype=np.int64)
    logits, past = model.forward(ids)
    mask = np.ones((1, len(prompt)), dtype=np.int64)
    out, start = [], time.perf_counter()
    for _ in range(tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        logits, past = model.forward(np.array([[token]]), mask, np.array([[mask.shape[1] - 1]]), past)
    return out, (time.perf_counter() - start) / tokens, sum(p.nbytes for p in past)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from lmspec.compiler.loader import load_spec
    from lmspec.compiler.lower import lower
    from lmspec.compiler.rewrites import spec_record
    from lmspec.runtime.checkpoint.store import save_checkpoint
    from lmspec.runtime.data.tokenizer import CharTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "spec.arch").write_text(SPEC)
        graph = load_spec(str(workdir / "spec.arch"))
        model = lower(graph, seed=0)
        tokenizer = CharTokenizer.from_text("".join(chr(c) for c in range(32, 127)))
        save_checkpoint(workdir / "run", step=0, model=model, optimizer=None, rng=None, train_config={},
                        metrics={}, tokenizer=tokenizer.to_json(), spec=spec_record(graph, {}))
        full, bounded = export(workdir, "full", False), export(workdir, "bounded", True)
        prompt = torch.randint(0, 95, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        results = {}
        for _ in range(2):  # alternate, so that drift in the machine's speed hits both alike
            for name, path in (("full", full), ("bounded", bounded)):
                tokens, seconds, cache = decode(path, prompt, args.tokens, args.threads)
                best = results.get(name, (None, float("inf"), 0))[1]
                results[name] = (tokens, min(seconds, best), cache)
    assert results["full"][0] == results["bounded"][0], "the two exports decode different tokens"
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs; prompt {args.prompt} tokens, {args.tokens} decoded (same tokens)")
    for name, (_, seconds, cache) in results.items():
        print(f"{name:>8}: {1000 * seconds:7.2f} ms/token, cache {cache / 2**20:7.1f} MiB")
    (_, full_s, full_c), (_, bounded_s, bounded_c) = results["full"], results["bounded"]
    print(f"bounded / full: decode time {bounded_s / full_s:.2f}x, cache {bounded_c / full_c:.3f}x")


if __name__ == "__main__":
    main()
