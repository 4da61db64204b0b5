"""`lmspec export --fused-attention`: attention as onnxruntime's GroupQueryAttention kernel over a
shared KV buffer (compiler/onnx_fused_attention.py). Checked against the PyTorch model with every
attention option the kernel must reproduce (grouped-query heads, RoPE, QK-norm, a sliding window,
soft-capping, a scale), rows of different lengths in one buffer, and refused where it cannot apply."""
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from runtime_helpers import ALTERNATING, lmspec_main
from lmspec.compiler.onnx_export import CachedDecoder, cache_layout
from lmspec.runtime.export.bundle import bundle_sidecar
from lmspec.runtime.export.from_checkpoint import export_bundle
from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest
from lmspec.runtime.train.sampling import generate

from test_export import _char_tokenizer, quiet, random_checkpoint

EVERY_OPTION = """model every_option {{
  vocab = 96; context = 64; dim = 64; layers = 2
  input tokens: i64[batch, seq <= context]
  x = embedding(tokens, vocab, dim) as embed
  repeat layers as block {{
    x = x + attention(rmsnorm(x), 4, kv_heads=2, rope=true, qk_norm=true, window=5, softcap=7.0, scale=0.3,
                      bias=false, causal={causal})
    x = x + mlp(rmsnorm(x), 128, act=silu, gated=true, bias=false)
  }}
  h = linear(rmsnorm(x) as norm, vocab, bias=false) as head
  logits = softcap(h, 30.0)
  output logits
}}
"""


def every_option_checkpoint(tmp_path, causal="true"):
    spec = tmp_path / "every_option.arch"
    spec.write_text(EVERY_OPTION.format(causal=causal))

    def sharpen(model):  # larger weights than init: attention that is far from uniform tests more
        for p in model.parameters():
            p.mul_(3.0)
    return random_checkpoint(tmp_path / "run", str(spec), tokenizer=_char_tokenizer(), tweak=sharpen)


def test_every_attention_option_matches_pytorch_and_generates_the_same_tokens(tmp_path):
    model, tokenizer = every_option_checkpoint(tmp_path)
    meta = export_bundle(str(tmp_path / "run"), str(tmp_path / "m.onnx"), fused_attention=True, log=quiet)
    # rows of different lengths in one buffer, the prompt (16 tokens, past the window of 5) then 4 steps
    assert meta["parity"]["fp32"]["empty_cache"] <= 1e-4 and meta["parity"]["fp32"]["filled_cache"] <= 1e-4
    assert meta["cache"]["buffer"] == "shared"
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    bundle = OnnxModel(tmp_path / "m.onnx")
    # the prefill computes the soft-capped logits of the columns holding each row's last token only
    # (the parity check above compared those with PyTorch's)
    assert [i.name for i in bundle.session.get_overridable_initializers()] == ["logits_to_keep"]
    prompts = [tokenizer.encode("the "), tokenizer.encode("a longer prompt, of more tokens")]
    got = bundle.generate([GenerationRequest(p, 40, temperature=0, stop_at_eot=False) for p in prompts])
    with torch.no_grad():
        assert [c.tokens for c in got] == [generate(model.eval(), p, 40, temperature=0) for p in prompts]


def test_the_ops_torch_implementation_is_the_models_attention(tmp_path):
    """The custom op's eager loop (the reference the export is traced from) computes what the model
    computes: a prompt, then one token at a time, rows of different lengths in one buffer."""
    model, _ = every_option_checkpoint(tmp_path)
    model.eval()
    layout = cache_layout(model)
    decoder = CachedDecoder(model, dataclasses.replace(layout, shared_buffer=True))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    lengths = [9, 6]
    buffers = [torch.zeros(2, kv, 16, hd) for kv, hd in zip(layout.kv_heads, layout.head_dim) for _ in "kv"]
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        logits, *buffers = decoder(ids[:, :9], mask, torch.arange(9).expand(2, 9), *buffers)
        for row, n in enumerate(lengths):
            torch.testing.assert_close(logits[row, :n], model(ids[row:row + 1, :n])[0], atol=1e-4, rtol=1e-4)
        for step in range(3):
            now = torch.tensor(lengths) + step
            column = ids[torch.arange(2), now][:, None]
            mask = (torch.arange(int(now.max()) + 1)[None] < (now + 1)[:, None]).long()
            logits, *buffers = decoder(column, mask, now[:, None], *buffers)
            for row in range(2):
                want = model(ids[row:row + 1, :int(now[row]) + 1])[0, -1]
                torch.testing.assert_close(logits[row, 0], want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # the plain export's optimize/int8/fp16 tests run by default; this is the fused variant
def test_optimize_int8_and_fp16_keep_the_fused_kernel(tiny_run, tmp_path):
    out = lmspec_main("export", tiny_run, "-o", tmp_path / "q.onnx", "--fused-attention", "--optimize",
                     "--quantize", "int8", "--no-report")
    assert out.returncode == 0, out.stderr
    meta = json.loads(bundle_sidecar(tmp_path / "q.onnx").read_text())
    # int8 logits differ by design (0.11-0.14 for this model, the plain export's too): fusing may add
    # next to nothing to what quantizing costs the plain export of the same weights
    plain = lmspec_main("export", tiny_run, "-o", tmp_path / "p.onnx", "--optimize", "--quantize", "int8",
                        "--no-report")
    assert plain.returncode == 0, plain.stderr
    plain_int8 = json.loads(bundle_sidecar(tmp_path / "p.onnx").read_text())["parity"]["int8"]
    assert meta["parity"]["optimized"]["filled_cache"] <= 1e-4
    assert max(meta["parity"]["int8"].values()) <= 1.5 * max(plain_int8.values()), (meta["parity"], plain_int8)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "GroupQueryAttention" in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops)
    half = tmp_path / "h.onnx"
    assert lmspec_main("export", tiny_run, "-o", half, "--fused-attention", "--fp16").returncode == 0
    model = OnnxModel(half)
    [c] = model.generate([GenerationRequest(model.tokenizer.encode("I had"), 8, temperature=0)])
    assert model.shared_buffer and len(c.tokens) == 8 and np.dtype(model.new_cache(1, 4)[0].dtype) == np.float16


def test_what_cannot_be_fused_is_one_clear_error_and_writes_nothing(tmp_path, tiny_run):
    every_option_checkpoint(tmp_path, causal="false")
    out = lmspec_main("export", tmp_path / "run", "-o", tmp_path / "m.onnx", "--fused-attention")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("lmspec export: error: every_option: fused attention needs causal attention over "
                                  "a KV cache, but attention layer 0 is not causal; the fused kernel always is")
    handwritten = tmp_path / "handwritten"
    random_checkpoint(handwritten, "specs/handwritten.arch", tokenizer=_char_tokenizer())
    out = lmspec_main("export", handwritten, "-o", tmp_path / "h.onnx", "--fused-attention")
    assert out.returncode == 1 and "its attention cannot use a KV cache" in out.stderr
    hf = lmspec_main("export", "hf", tiny_run, "-o", tmp_path / "hf", "--fused-attention")
    assert hf.returncode == 2 and "--fused-attention: only for ONNX export" in hf.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["every_option.arch", "handwritten", "run"]


def test_layers_that_differ_export_fused(tmp_path):
    """Alternating sliding-window and global layers with a RoPE base each (`repeat … as block, i`):
    the fused export matches PyTorch, with the cache, and generates its tokens. (The plain export of
    such layers is checked on an imported Gemma 3 in tests/runtime/hf/test_hf.py.)"""
    spec = tmp_path / "alternating.arch"
    spec.write_text(ALTERNATING)
    model, tokenizer = random_checkpoint(tmp_path / "run", str(spec), {"layers": 2, "vocab": 96},
                                         tokenizer=_char_tokenizer())
    prompt = tokenizer.encode("layers that differ")
    with torch.no_grad():
        want = generate(model.eval(), prompt, 20, temperature=0)
    meta = export_bundle(str(tmp_path / "run"), str(tmp_path / "m.onnx"), fused_attention=True, log=quiet)
    assert meta["parity"]["fp32"]["filled_cache"] <= 1e-4
    [got] = OnnxModel(tmp_path / "m.onnx").generate([GenerationRequest(prompt, 20, temperature=0, stop_at_eot=False)])
    assert got.tokens == want
