"""Forward tokens/s of the lmspec-compiled Llama against `transformers`' own LlamaForCausalLM.

A Llama-3.2-shaped model (grouped-query attention, RoPE with Llama-3 scaling, SwiGLU, RMSNorm,
tied head) is built with random weights by `transformers`, saved with `save_pretrained`, imported
with `lmspec import hf` into `specs/llama3.2-1b.arch` (scaled by overrides), and lowered. Both
models then run the same batches in one process, taking turns run by run (so drift in the
machine's speed hits both), under `torch.inference_mode`; the median run of each is compared.
The logits are checked to agree first. Prints the ratio; record it in bench/RESULTS.md.

    python bench/forward.py [--layers 8 --dim 1024 --heads 16 --kv-heads 4 --head-dim 64 --ffn 4096]
                            [--vocab 32000 --seq 256 --batch 2 --rounds 10 --device cpu --dtype fp32]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's `tokenize` (which torch imports): drop the folder.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from lmspec.compiler.lower import lower  # noqa: E402
from lmspec.runtime.checkpoint.store import load_checkpoint  # noqa: E402
from lmspec.compiler.rewrites import graph_from_record  # noqa: E402
from lmspec.runtime.hf.convert import import_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_pair(args, workdir: Path):
    """(transformers model, lmspec model) with the same weights, on the device, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=max(args.seq, 1024), rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf = LlamaForCausalLM(config)
    hf.save_pretrained(workdir / "hf")
    overrides = {"vocab": args.vocab, "context": max(args.seq, 1024), "dim": args.dim, "layers": args.layers,
                 "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "ffn": args.ffn}
    import_hf(workdir / "hf", workdir / "lmspec", spec=str(ROOT / "specs" / "llama3.2-1b.arch"), overrides=overrides,
              tokenizer=str(word_tokenizer(workdir / "tokenizer.json", args.vocab)))
    checkpoint = load_checkpoint(workdir / "lmspec")
    ours = lower(graph_from_record(checkpoint.spec))
    checkpoint.load_model(ours)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return hf.to(args.device, dtype).eval(), ours.to(args.device, dtype).eval()


def word_tokenizer(path: Path, size: int) -> Path:
    """A tokenizer with `size` ids (the words t0 ... t<size-1>): the import needs one; timing does not."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="timed forwards per model, taking turns")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_pair(args, Path(tmp))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device) for _ in range(3)]
    with torch.inference_mode():
        diff = (hf(batches[0]).logits.float() - ours(batches[0]).float()).abs().max().item()
        runs = {"transformers": lambda ids: hf(ids).logits, "lmspec": lambda ids: ours(ids)}
        for fn in runs.values():  # warm-up
            fn(batches[1])
        times = {name: [] for name in runs}
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                times[name].append(timed(lambda: runs[name](batches[r % 3]), args.device))
    tokens = args.batch * args.seq
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    import transformers
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    print(f"machine: {where}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: Llama-3.2-shaped, {args.layers} layers, dim {args.dim}, heads {args.heads}/{args.kv_heads} "
          f"x {args.head_dim}, ffn {args.ffn}, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens, {args.dtype}")
    print(f"max |logit difference|: {diff:.2e}")
    print(f"transformers LlamaForCausalLM : {tps['transformers']:10.0f} tokens/s")
    print(f"lmspec compiled (fx)          : {tps['lmspec']:10.0f} tokens/s")
    print(f"ratio lmspec / transformers   : {tps['lmspec'] / tps['transformers']:.3f}  (target >= 1.0)")


if __name__ == "__main__":
    main()
