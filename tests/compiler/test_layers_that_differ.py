"""Layers that differ: `repeat N as block, i { … }` binds the layer's index, lists are indexed by it
and options depend on it. A model alternating sliding-window and global attention, with a RoPE base
per layer, equals a hand-written PyTorch reference, with and without the KV cache; mistakes in the
new syntax are located errors; `info` shows the layers that differ."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from lmspec.dsl.diagnostics import SpecError
from runtime_helpers import ALTERNATING
from test_modern_ops import decoded_with_cache

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def alternating(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "alternating.arch"
    path.write_text(ALTERNATING)
    return path


def reference(model, ids: torch.Tensor) -> torch.Tensor:
    """The model written out in PyTorch from its parameters: layer i sees a window of 3 keys when i
    is even, all keys when odd, rotates with base 10,000 or 500,000, and the last layer has QK-norm."""
    p = dict(model.named_parameters())
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    b, t = ids.shape
    x = F.embedding(ids, p["embed.weight"])
    for i in range(4):
        h = rms(x, p[f"block.{i}.attn_norm.weight"])
        q, k, v = (h @ p[f"block.{i}.attn.qkv.weight"].T).split([32, 16, 16], dim=-1)
        q, k, v = q.view(b, t, 4, 8), k.view(b, t, 2, 8), v.view(b, t, 2, 8)
        if i == 3:
            q, k = rms(q, p["block.3.attn.q_norm.weight"]), rms(k, p["block.3.attn.k_norm.weight"])
        theta = 10000.0 if i % 2 == 0 else 500000.0
        freqs = torch.arange(t)[:, None].float() * (1.0 / theta ** (torch.arange(0, 8, 2).float() / 8))
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        rotate = lambda z: z * cos[:, None] + torch.cat([-z[..., 4:], z[..., :4]], -1) * sin[:, None]
        q, k = rotate(q).transpose(1, 2), rotate(k).transpose(1, 2).repeat_interleave(2, dim=1)
        v = v.transpose(1, 2).repeat_interleave(2, dim=1)
        query, key = torch.arange(t)[:, None], torch.arange(t)[None]
        visible = (key <= query) & ((query - key < 3) if i % 2 == 0 else True)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        y = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
        x = x + y.transpose(1, 2).reshape(b, t, 32) @ p[f"block.{i}.attn.proj.weight"].T
        h = rms(x, p[f"block.{i}.mlp_norm.weight"])
        gate, up = (h @ p[f"block.{i}.mlp.fc.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ p[f"block.{i}.mlp.proj.weight"].T
    return rms(x, p["norm.weight"]) @ p["head.weight"].T


def test_alternating_windows_equal_a_hand_written_reference_with_and_without_the_cache(alternating):
    model = lower(load_spec(str(alternating)), seed=0).eval()
    assert [model.get_submodule(f"block.{i}.attn").cfg.window for i in range(4)] == [3, None, 3, None]
    assert "block.3.attn.q_norm.weight" in dict(model.named_parameters())
    assert "block.2.attn.q_norm.weight" not in dict(model.named_parameters())
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(full, reference(model, ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decoded_with_cache(model, ids, 5), full, atol=1e-5, rtol=1e-5)


def test_nested_repeats_have_an_index_each_and_it_ends_with_its_body(tmp_path):
    spec = tmp_path / "nested.arch"
    spec.write_text("""model nested {
  widths = [8, 16, 24, 32, 40, 48]
  i = 100
  input tokens: i64[batch, seq <= 16]
  x = embedding(tokens, 10, 8) as embed
  repeat 2 as outer, i {
    repeat 3 as inner, j {
      x = linear(x, widths[i * 3 + j], bias=false) as proj
    }
  }
  y = linear(x, i, bias=false) as head
  output y
}
""")
    shapes = {n: tuple(p.shape) for n, p in lower(load_spec(str(spec)), seed=0).named_parameters()}
    assert shapes["outer.0.inner.2.proj.weight"] == (24, 16) and shapes["outer.1.inner.0.proj.weight"] == (32, 24)
    assert shapes["head.weight"] == (100, 48)  # after the repeat, `i` is the hyper-parameter again


@pytest.mark.parametrize("body, message, at", [
    ("window=windows[i + 4]", "index 4 is out of range for a list of 4", "i + 4"),
    ("window=heads[i]", "only a list can be indexed, not int 4", "heads"),
    ("window=windows[0.5]", "a list index must be an int, got float 0.5", "0.5"),
])
def test_a_bad_index_is_a_located_error(tmp_path, body, message, at):
    spec = tmp_path / "bad.arch"
    text = ALTERNATING.replace("window=windows[i]", body)
    spec.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(str(spec))
    [diagnostic] = info.value.diagnostics  # once, not once per layer
    line = text.splitlines()[7]
    assert diagnostic.message == message
    assert (diagnostic.span.line, diagnostic.span.column) == (8, line.index(body) + body.index(at) + 1)


def test_the_index_is_unknown_outside_its_repeat(tmp_path):
    spec = tmp_path / "outside.arch"
    spec.write_text(ALTERNATING.replace("logits = linear(rmsnorm(x) as norm, vocab,",
                                        "logits = linear(rmsnorm(x) as norm, vocab + i,"))
    with pytest.raises(SpecError, match="unknown name 'i'"):
        load_spec(str(spec))


def test_info_lists_the_layers_that_differ(alternating):
    out = subprocess.run([sys.executable, "-m", "lmspec.runtime.cli.main", "info", str(alternating)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [line.split()[0] for line in out.stdout.splitlines() if line.strip().startswith("block.")]
    assert rows == ["block.0", "block.1", "block.2", "block.3"]  # no "(x4)": they are not one layer four times


def test_qk_norm_over_the_whole_projection_is_counted_and_refused_by_tensor_parallelism(tmp_path):
    """OLMo 2's QK-norm normalises all of q (and of k) at once: one weight per feature of the
    projection, and a rank holding some heads cannot compute it, so the TP plan refuses it at its line."""
    from lmspec.compiler.tensor_parallel import tensor_parallel_plan

    spec = tmp_path / "olmo2.arch"
    spec.write_text(ALTERNATING.replace("qk_norm=true if i == layers - 1 else false",
                                        'qk_norm=true, qk_norm_scope="projection"'))
    graph = load_spec(str(spec))
    model = lower(graph, seed=0).eval()
    assert model.get_submodule("block.0.attn").q_norm.weight.shape == (32,)  # 4 heads of 8
    assert model.get_submodule("block.0.attn").k_norm.weight.shape == (16,)  # 2 kv heads of 8
    with torch.no_grad():
        ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(decoded_with_cache(model, ids, 3), model(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(SpecError) as info:
        tensor_parallel_plan(graph, 2)
    [first, *_] = info.value.diagnostics
    assert "QK-norm over the whole projection" in first.message and first.span.line == 8


def test_the_parallel_plans_and_checkpointing_take_layers_that_differ(alternating):
    """Layers that differ still split: TP over whole heads in every layer, PP cut at layer boundaries,
    each layer its own checkpointed segment, with the same outputs."""
    from lmspec.compiler.checkpointing import checkpoint_blocks
    from lmspec.compiler.pipeline_stages import pipeline_stages
    from lmspec.compiler.tensor_parallel import tensor_parallel_plan

    graph = load_spec(str(alternating))
    plan = tensor_parallel_plan(graph, 2)
    assert plan is not None
    stages = pipeline_stages(graph, 2)
    assert [s.blocks for s in stages] == [["block.0", "block.1"], ["block.2", "block.3"]]
    model = lower(graph, seed=0).eval()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    assert checkpoint_blocks(model, "all") == ["block.0", "block.1", "block.2", "block.3"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want)
