"""Generation speed on a GPU: lmspec's `generate` (its KV cache) against transformers' `generate`, with
the same weights, handed over the way a user would: `lmspec export hf`, then `from_pretrained`.

GPT-2 small (`specs/gpt2.arch`, random weights, the GPT-2 tokenizer; or the checkpoint of `--run`),
batch 1, greedy, `--tokens` new tokens after a `--prompt-tokens` prompt of the-verdict.txt. Per dtype
(fp32, and bf16 with both models cast), one warm-up run each that also compares their tokens, then
`--rounds` runs taking turns (the order alternates), median compared. fp32 here is true fp32 (TF32
off): both must then pick the same tokens, or diverge only where the two best logits tie to within
--tie; bf16 rounding breaks near-ties, so its agreement is reported, not required.

Prints tokens/s of each, the ratio lmspec/transformers and, last, one line of JSON; exits 1 when the
fp32 tokens disagree. `--device cpu --tokens 16` is a quick smoke run of the same path.

    python bench/gpu_generate.py [--device cuda] [--tokens 256] [--prompt-tokens 128] [--rounds 5]
                                 [--dtypes fp32,bf16] [--run RUN | --set layers=2 ...] [--workdir DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's `tokenize` (which torch imports): drop the folder.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Result:
    dtype: str
    lmspec_tokens_per_s: float
    transformers_tokens_per_s: float
    ratio: float
    matching_tokens: int  # leading tokens the two agree on
    new_tokens: int
    logit_gap: float | None  # at the first divergence: |logit(ours) - logit(theirs)| in lmspec's model
    agree: bool  # all tokens the same, or a divergence at a near-tie


def make_checkpoint(work: Path, overrides: dict) -> Path:
    """GPT-2 with random weights (seed 0) saved as an lmspec run with the GPT-2 tokenizer."""
    from lmspec.compiler import load_spec
    from lmspec.compiler.lower import lower
    from lmspec.runtime.checkpoint.store import save_checkpoint
    from lmspec.compiler.rewrites import spec_record
    from lmspec.runtime.data.tokenizer import FileTokenizer

    tokenizer = FileTokenizer.from_path(DATA / "gpt2-tokenizer")
    overrides = {"dropout": 0.0, **overrides}
    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"), overrides)
    model = lower(graph, seed=0)
    run = work / "gpt2-run"
    save_checkpoint(run, step=0, model=model, optimizer=None, rng=None, train_config={}, metrics={},
                    tokenizer=tokenizer.to_json(), spec=spec_record(graph, overrides))
    return run


def export_hf(run: Path, out: Path) -> Path:
    """The checkpoint as a Hugging Face directory, by `lmspec export hf` itself."""
    from lmspec.runtime.cli.main import main
    if main(["export", "hf", str(run), "-o", str(out)]) != 0:
        raise SystemExit(f"lmspec export hf {run} failed")
    return out


def prompt_ids(run: Path, count: int) -> list[int]:
    from lmspec.runtime.checkpoint.store import load_checkpoint
    from lmspec.runtime.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(load_checkpoint(run).tokenizer)
    text = (DATA / "the-verdict.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text[:40 * count])[:count]
    if len(ids) < count:
        raise SystemExit(f"the-verdict.txt gives only {len(ids)} prompt tokens")
    return ids


def set_true_fp32(on: bool) -> None:
    """TF32 off for the fp32 comparison (lmspec turns it on for GPU work): with 10-bit mantissas the
    two models' logits would differ by ~1e-3 and greedy choices would flip at mere near-ties."""
    torch.backends.cuda.matmul.allow_tf32 = not on
    torch.backends.cudnn.allow_tf32 = not on


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, list[int]]:
    synchronise(device)
    start = time.perf_counter()
    tokens = fn()
    synchronise(device)
    return time.perf_counter() - start, tokens


def first_divergence_gap(model, prompt: list[int], ours: list[int], theirs: list[int], device) -> tuple[int, float | None]:
    """(leading tokens in common, the gap between the two picks' logits where they part, or None)."""
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    if same == len(ours) == len(theirs):
        return same, None
    with torch.no_grad():  # the whole prefix at once, no cache: lmspec's own view of that position
        logits = model(torch.tensor([prompt + ours[:same]], device=device))[0, -1].float()
    return same, abs(float(logits[ours[same]] - logits[theirs[same]]))


def compare(name: str, ours_model, hf_model, prompt: list[int], new: int, rounds: int, tie: float,
            device: torch.device) -> Result:
    from lmspec.runtime.train.sampling import generate

    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)

    def run_ours() -> list[int]:
        return generate(ours_model, prompt, new, temperature=0)

    def run_hf() -> list[int]:
        # no end-of-text: both generate exactly `new` tokens (min_new_tokens would instead mask
        # the EOS logit, a different greedy choice)
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True,
                                eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    with torch.no_grad():
        _, ours = timed(run_ours, device)  # warm-up runs, whose tokens are compared
        _, theirs = timed(run_hf, device)
        times: dict[str, list[float]] = {"lmspec": [], "transformers": []}
        for r in range(rounds):
            order = [("lmspec", run_ours), ("transformers", run_hf)]
            for label, fn in order if r % 2 == 0 else order[::-1]:
                times[label].append(timed(fn, device)[0])
    same, gap = first_divergence_gap(ours_model, prompt, ours, theirs, device)
    ours_rate = new / statistics.median(times["lmspec"])
    hf_rate = new / statistics.median(times["transformers"])
    return Result(name, ours_rate, hf_rate, ours_rate / hf_rate, same, new, gap,
                  agree=gap is None or gap <= tie)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per run (default: 256)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default: 128)")
    ap.add_argument("--rounds", type=int, default=5, help="timed runs of each, after a warm-up (default: 5)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default: both)")
    ap.add_argument("--tie", type=float, default=1e-3,
                    help="fp32: the largest logit gap at which the two may pick differently (default: 1e-3)")
    ap.add_argument("--run", help="an lmspec run or checkpoint to use instead of random GPT-2 weights")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a hyper-parameter of specs/gpt2.arch (random weights only)")
    ap.add_argument("--workdir", help="keep the checkpoint and the HF directory here, in a directory that does not "
                                      "hold them yet (default: a temporary directory, removed at the end)")
    args = ap.parse_args()
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        ap.error(f"--dtypes: expected fp32 and/or bf16, got {', '.join(unknown) or 'nothing'}")
    if args.run and args.set:
        ap.error("--set shapes the random model; a --run has its own")
    return args


def main() -> int:
    args = parse_args()
    from transformers import AutoModelForCausalLM

    from lmspec.runtime.distributed.device import device_name, resolve_device
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.errors import UsageError
    from lmspec.runtime.cli.options import cli_overrides

    try:
        device = resolve_device(args.device)
        overrides = cli_overrides(args.set)
    except UsageError as err:  # no GPU, or a malformed --set: one line, not a traceback
        raise SystemExit(f"gpu_generate: error: {err}") from None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lmspec-gpu-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run = Path(args.run) if args.run else make_checkpoint(work, overrides)
        hf_dir = export_hf(run, work / "hf")
        loaded = load_model(run, device)
        ours = loaded.model.eval()
        hf = AutoModelForCausalLM.from_pretrained(hf_dir).to(device).eval()
        if loaded.graph.context is not None and args.prompt_tokens + args.tokens > loaded.graph.context:
            raise SystemExit(f"--prompt-tokens + --tokens must fit the model's context of {loaded.graph.context}")
        prompt = prompt_ids(run, args.prompt_tokens)
        params = sum(p.numel() for p in ours.parameters())
        print(f"{loaded.graph.name}: {params:,} parameters ({'from ' + str(run) if args.run else 'random weights'}); "
              f"transformers {type(hf).__name__} from `lmspec export hf`; {device_name(device)}; batch 1, greedy, "
              f"{args.prompt_tokens}-token prompt + {args.tokens} new tokens, median of {args.rounds}", flush=True)
        results = []
        for name in args.dtypes:
            set_true_fp32(name == "fp32")
            ours, hf = ours.to(DTYPES[name]), hf.to(DTYPES[name])
            results.append(compare(name, ours, hf, prompt, args.tokens, args.rounds, args.tie, device))
            print(_row(results[-1]), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    ok = all(r.agree for r in results if r.dtype == "fp32")
    print(json.dumps({"bench": "gpu_generate", "device": device_name(device), "model": loaded.graph.name,
                      "parameters": params, "prompt_tokens": args.prompt_tokens, "new_tokens": args.tokens,
                      "rounds": args.rounds, "results": {r.dtype: asdict(r) for r in results}, "ok": ok}))
    return 0 if ok else 1


def _row(r: Result) -> str:
    agreement = (f"all {r.new_tokens} tokens the same" if r.matching_tokens == r.new_tokens else
                 f"{r.matching_tokens}/{r.new_tokens} tokens the same, then a logit gap of {r.logit_gap:.2e}"
                 + (" (a near-tie)" if r.agree else "" if r.dtype != "fp32" else " (NOT a near-tie)"))
    return (f"{r.dtype}: lmspec {r.lmspec_tokens_per_s:,.1f} tokens/s, transformers "
            f"{r.transformers_tokens_per_s:,.1f} tokens/s, ratio {r.ratio:.2f}x; {agreement}")


if __name__ == "__main__":
    sys.exit(main())
