"""GPU figures, when a GPU is lent: training and generation speed of the lmspec-compiled GPT-2.

Three measurements, each a ratio against a baseline timed in the same process:

- the machine's own ceilings: a large bf16 matrix product (TFLOP/s) and a device-to-device copy;
- training GPT-2 small (124 M) at context 1024: the lowered spec against the hand-written eager
  GPT of tests/reference_gpt.py (same weights, same batches, taking turns step by step), in fp32
  (TF32 matrix units), bf16 autocast, and bf16 autocast + torch.compile with fused AdamW; MFU is
  training FLOPs per token (lmspec's own count: 3 x forward, attention scores included) x tokens/s
  over the H100 SXM's dense bf16 peak (989 TFLOP/s) and over the measured matrix-product rate;
- generation, batch 1, greedy, 128 new tokens after a 128-token prompt: `lmspec.runtime.train.sampling`
  (KV cache) against `transformers`' GPT2LMHeadModel.generate with the same weights, fp32 and bf16.

    python bench/gpu.py [--batch 16 --steps 20 --skip-generate]
"""
from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gpt2_names import copy_into_reference  # noqa: E402
from reference_gpt import GPT, GPTConfig  # noqa: E402

from lmspec.compiler import load_spec  # noqa: E402
from lmspec.compiler.lower import lower  # noqa: E402
from lmspec.compiler.analysis import flops_per_token, parameter_count  # noqa: E402
from lmspec.runtime.train.sampling import generate  # noqa: E402

H100_BF16_DENSE = 989.4e12  # NVIDIA's datasheet figure for the H100 SXM, without sparsity


def ceilings() -> tuple[float, float]:
    """(bf16 matmul FLOP/s, copy bytes/s counting read + write), median of timed runs."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = _cuda_median(lambda: a @ b, 10)
    src = torch.randn(2 ** 30 // 4, device="cuda")
    dst = torch.empty_like(src)
    copy = _cuda_median(lambda: dst.copy_(src), 10)
    return 2 * 8192 ** 3 / mm, 2 * src.numel() * 4 / copy


def _cuda_median(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


class Trainer:
    def __init__(self, model, precision: str, compiled: bool):
        self.model = model.cuda().train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())
        self.forward = torch.compile(self.model) if compiled else self.model

    def step(self, x, y) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with self.autocast:
            logits = self.forward(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start


def train_speed(args, precision: str, compiled: bool) -> tuple[float, float]:
    """tokens/s of (hand-written eager GPT, lmspec) on GPT-2 small, alternating steps."""
    torch.manual_seed(0)
    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"), {"dropout": 0.0, "vocab": args.vocab})
    ours = lower(graph, seed=0)
    ref = GPT(GPTConfig(vocab=args.vocab, context=1024, dim=768, heads=12, layers=12, gelu_approximate="tanh"))
    copy_into_reference(ours, ref)
    trainers = [Trainer(ref, precision, compiled), Trainer(ours, precision, compiled)]
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        t = torch.randint(0, 50257, (args.batch, 1025), generator=gen).cuda()  # real token ids only
        batches.append((t[:, :-1], t[:, 1:]))
    for t in trainers:  # warm-up (compilation, autotuning, allocator)
        for i in range(3):
            t.step(*batches[i % 4])
    times = [[], []]
    for i in range(args.steps):
        for t, log in zip(trainers, times):
            log.append(t.step(*batches[i % 4]))
    del trainers
    torch.cuda.empty_cache()
    tokens = args.batch * 1024
    return tokens / statistics.median(times[0]), tokens / statistics.median(times[1])


def generation_speed(dtype: torch.dtype, prompt_len: int, new: int, rounds: int) -> tuple[float, float, bool]:
    """tokens/s of (transformers generate, lmspec generate) for GPT-2 small, batch 1, greedy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"), {"dropout": 0.0})
    ours = lower(graph, seed=0).eval()
    hf = GPT2LMHeadModel(GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ref = GPT(GPTConfig(vocab=50257, context=1024, dim=768, heads=12, layers=12, gelu_approximate="tanh"))
    copy_into_reference(ours, ref)
    with torch.no_grad():  # the reference GPT's names are HF's; HF's Conv1D keeps [in, out]
        hf_params = dict(hf.named_parameters())
        for name, tensor in ref.state_dict().items():
            if name not in hf_params:
                continue
            conv = any(k in name for k in ("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            hf_params[name].copy_(tensor.t() if conv else tensor)
    ours, hf = ours.cuda().to(dtype), hf.cuda().to(dtype).eval()
    prompt = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()[0]

    def run_ours():
        return generate(ours, prompt, new, temperature=0)

    def run_hf():
        out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
        return out[0, prompt_len:].tolist()

    same = run_ours() == run_hf()
    times = [[], []]
    for _ in range(rounds):
        for fn, log in zip((run_hf, run_ours), times):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            log.append(time.perf_counter() - start)
    return new / statistics.median(times[0]), new / statistics.median(times[1]), same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="training sequences of 1024 tokens per step")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    ap.add_argument("--vocab", type=int, default=50257,
                    help="output rows; 50304 (a multiple of 128) pads GPT-2's vocabulary for faster matmuls")
    ap.add_argument("--rounds", type=int, default=5, help="timed generation runs per engine")
    ap.add_argument("--skip-generate", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name()
    mm, copy = ceilings()
    print(f"device: {name}, torch {torch.__version__}")
    print(f"ceilings: bf16 matmul {mm / 1e12:.0f} TFLOP/s, copy {copy / 1e12:.2f} TB/s (read + write)")

    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"), {"dropout": 0.0, "vocab": args.vocab})
    train_flops = 3 * flops_per_token(graph, 1024)
    print(f"GPT-2 small: {parameter_count(graph):,} parameters, {train_flops / 1e9:.3f} GFLOPs/token training")
    print(f"\ntraining, batch {args.batch} x 1024, median of {args.steps} alternating steps")
    print(f"{'mode':<22}{'eager tok/s':>12}{'lmspec tok/s':>14}{'ratio':>8}{'MFU(peak)':>11}{'MFU(meas)':>11}")
    for precision, compiled in (("fp32", False), ("bf16", False), ("bf16", True)):
        ref_tps, ours_tps = train_speed(args, precision, compiled)
        label = precision + (" + compile" if compiled else "") + (" (tf32)" if precision == "fp32" else "")
        print(f"{label:<22}{ref_tps:12,.0f}{ours_tps:14,.0f}{ours_tps / ref_tps:8.3f}"
              f"{ours_tps * train_flops / H100_BF16_DENSE:11.1%}{ours_tps * train_flops / mm:11.1%}", flush=True)
    if args.skip_generate:
        return
    print("\ngeneration, batch 1, greedy, 128-token prompt + 128 new tokens")
    print(f"{'dtype':<8}{'transformers tok/s':>20}{'lmspec tok/s':>14}{'ratio':>8}  same tokens")
    for dtype in (torch.float32, torch.bfloat16):
        hf_tps, ours_tps, same = generation_speed(dtype, 128, 128, args.rounds)
        print(f"{str(dtype).split('.')[-1]:<8}{hf_tps:20.1f}{ours_tps:14.1f}{ours_tps / hf_tps:8.3f}  {same}",
              flush=True)


if __name__ == "__main__":
    main()
