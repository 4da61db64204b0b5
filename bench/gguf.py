"""GGUF export at GPT-2-small size: what `lmspec export gguf` writes, and how llama.cpp runs it against
`lmspec generate`'s int8 ONNX bundle of the same checkpoint.

GPT-2 small (`specs/gpt2.arch`, 124 M parameters, its random initial weights), GPT-2's tokenizer. Exports f16 and q8_0 GGUF files and an int8 ONNX bundle; checks that
llama.cpp (llama-cpp-python, built from source; the benchmark stops without it) computes lmspec's
logits for a 128-token prompt of Tiny Shakespeare; then times batch-1 greedy decoding of `--tokens`
tokens after that prompt, each engine in turn (best of `--rounds`), on `--threads` threads. The
baseline is the int8 ONNX bundle run by `OnnxModel.generate`. Record the figures in bench/RESULTS.md.

    python bench/gguf.py [--tokens 128 --rounds 3 --threads 2]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's `tokenize`: drop the folder.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def checkpoint(workdir: Path):
    from lmspec.compiler.loader import load_spec
    from lmspec.compiler.lower import lower
    from lmspec.compiler.rewrites import spec_record
    from lmspec.runtime.checkpoint.store import save_checkpoint
    from lmspec.runtime.data.tokenizer import FileTokenizer

    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"))
    model = lower(graph, seed=0).eval()
    tokenizer = FileTokenizer.from_path(DATA / "gpt2-tokenizer")
    save_checkpoint(workdir / "run", step=0, model=model, optimizer=None, rng=None, train_config={}, metrics={},
                    tokenizer=tokenizer.to_json(), spec=spec_record(graph, {}))
    return model, tokenizer


def llama_cpp_decode(llm, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    llm.reset()
    started = time.perf_counter()
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == tokens:
            break
    return out, time.perf_counter() - started


def onnx_decode(model, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    from lmspec.runtime.serve.requests import GenerationRequest

    started = time.perf_counter()
    [done] = model.generate([GenerationRequest(prompt, tokens, temperature=0, stop_at_eot=False)])
    return done.tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("bench/gguf.py needs llama.cpp's Python binding: pip install llama-cpp-python (builds from source)")
    from lmspec.runtime.export.from_checkpoint import export_bundle
    from lmspec.runtime.export.gguf_file import export_gguf
    from lmspec.runtime.serve.language_model import OnnxModel

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, tokenizer = checkpoint(workdir)
        prompt = tokenizer.encode((DATA / "tinyshakespeare.txt").read_text()[:4000])[:args.prompt]
        with torch.no_grad():
            ours = model(torch.tensor([prompt]))[0].numpy()
        engines, sizes = {}, {}
        for kind in ("f16", "q8_0"):
            started = time.perf_counter()
            path = export_gguf(str(workdir / "run"), str(workdir / f"gpt2-{kind}.gguf"), kind, log=lambda *_: None)
            print(f"export gguf --type {kind}: {time.perf_counter() - started:.1f} s, {path.stat().st_size / 2**20:.1f} MiB")
            llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=args.threads,
                                  n_threads_batch=args.threads)
            llm.eval(prompt)
            theirs = np.array(llm.scores[:len(prompt)])
            worst = float(np.abs(theirs - ours).max())
            agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
            print(f"  llama.cpp logits vs lmspec: max |difference| {worst:.4f} (logits up to "
                  f"{np.abs(ours).max():.1f}), next-token argmax agrees at {100 * agree:.0f}% of positions")
            engines[f"llama.cpp {kind}"] = (llama_cpp_decode, llm)
            sizes[f"llama.cpp {kind}"] = path.stat().st_size
        export_bundle(str(workdir / "run"), str(workdir / "int8"), quantize="int8", log=lambda *_: None)
        engines["lmspec generate, onnx int8"] = (onnx_decode, OnnxModel(workdir / "int8" / "model.onnx",
                                                                          threads=args.threads))
        sizes["lmspec generate, onnx int8"] = (workdir / "int8" / "model.onnx").stat().st_size
        best: dict[str, float] = {}
        tokens: dict[str, list[int]] = {}
        for round_ in range(args.rounds):  # take turns, so that drift in the machine's speed hits all alike
            for name, (decode, engine) in engines.items():
                out, seconds = decode(engine, prompt, args.tokens)
                best[name] = min(best.get(name, float("inf")), seconds)
                tokens[name] = out
    baseline = best["lmspec generate, onnx int8"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads; "
          f"llama-cpp-python {llama_cpp.__version__}; batch 1, greedy, {args.tokens} tokens after {len(prompt)}")
    print(f"{'engine':<28} {'file':>10} {'tok/s':>8} {'vs onnx int8':>13}")
    for name, seconds in best.items():
        print(f"{name:<28} {sizes[name] / 2**20:7.1f} MiB {args.tokens / seconds:8.1f} {baseline / seconds:12.2f}x")
    same = [n for n in tokens if tokens[n] == tokens["lmspec generate, onnx int8"]]
    print(f"greedy tokens equal to onnx int8's: {', '.join(same)}")


if __name__ == "__main__":
    main()
