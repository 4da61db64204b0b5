"""The classification rewrite: the LM head replaced by last_token + classifier, its parameters in
the graph, padding that cannot change a prediction, and the graphs it refuses."""
import pytest
import torch

from lmspec.compiler import load_spec
from lmspec.compiler.analysis import parameter_count
from lmspec.compiler.classify_head import classification_head
from lmspec.compiler.lower import lower
from lmspec.compiler.rewrites import RewriteError, apply_rewrites
from lmspec.compiler.shapes import Sym

SMALL = {"layers": 2, "dim": 32, "heads": 2, "context": 32}

UNTIED = """
model untied {
  vocab = 50; context = 16; dim = 24; heads = 2; layers = 1; causal = true
  input tokens: i64[batch, seq <= context]
  x = embedding(tokens, vocab, dim) as wte + position(seq, context, dim) as wpe
  repeat layers as block {
    x = x + attention(layernorm(x), heads, causal=causal)
    x = x + mlp(layernorm(x), 4 * dim)
  }
  logits = softcap(linear(rmsnorm(x) as norm, vocab, bias=false) as lm_head, 30.0)
  output logits: f32[batch, seq, vocab]
}
"""


def tiny_graph():
    return load_spec("specs/tiny.arch", SMALL)


def test_rewrite_replaces_the_vocabulary_head_with_a_class_head():
    base = tiny_graph()
    graph = apply_rewrites(base, [{"kind": "classify", "classes": 3, "labels": ["a", "b", "c"]}])
    (name, out), = graph.outputs
    assert name == "logits" and out.shape == (Sym("batch"), 3)
    assert [graph.g.nodes[n]["args"]["name"] for n in graph.inputs] == ["tokens", "lengths"]
    assert graph.g.nodes[graph.inputs[1]]["outputs"][0] == ((Sym("batch"),), "i64")
    assert graph.params["classifier.weight"].shape == (3, 32)
    assert graph.params["classifier.bias"].shape == (3,)
    assert "lm_head.weight" not in graph.params and "lm_head" not in graph.g
    # the LM head was tied to the embedding, so the count grows by exactly the new head
    assert parameter_count(graph) == parameter_count(base) + 3 * 32 + 3
    assert base.outputs[0][1].shape[-1] == 128  # the base graph is left as it was
    model = lower(graph)
    assert dict(model.named_parameters())["classifier.weight"].shape == (3, 32)
    logits = model(torch.randint(0, 128, (4, 10)), torch.tensor([10, 3, 1, 7]))
    assert logits.shape == (4, 3)


def test_untied_head_and_what_follows_it_go(tmp_path):
    spec = tmp_path / "untied.arch"
    spec.write_text(UNTIED)
    graph = classification_head(load_spec(str(spec), {}), classes=2)
    assert "lm_head.weight" not in graph.params
    assert not any(d["op"] == "softcap" for _, d in graph.nodes())
    assert "norm.weight" in graph.params  # the final norm stays, before the new head
    assert graph.outputs[0][1].shape == (Sym("batch"), 2)


def test_padding_does_not_change_the_logits():
    model = lower(classification_head(tiny_graph(), classes=2), seed=3)
    model.eval()
    text = torch.randint(0, 128, (7,))
    rows = []
    for pad_length, pad_id in ((7, 0), (12, 0), (32, 5), (20, 127)):
        tokens = torch.full((1, pad_length), pad_id)
        tokens[0, :7] = text
        with torch.no_grad():
            rows.append(model(tokens, torch.tensor([7]))[0])
    for row in rows[1:]:
        assert torch.allclose(row, rows[0], atol=1e-6, rtol=0)
    # and in a batch beside a longer text
    batch = torch.randint(0, 128, (2, 25))
    batch[0, :7] = text
    with torch.no_grad():
        assert torch.allclose(model(batch, torch.tensor([7, 25]))[0], rows[0], atol=1e-6, rtol=0)


def test_refuses_what_it_cannot_rewrite(tmp_path):
    classifier = classification_head(tiny_graph(), classes=2)
    with pytest.raises(RewriteError, match=r"\[batch, seq, vocab\]"):
        classification_head(classifier, classes=2)  # no vocabulary logits left to replace
    with pytest.raises(RewriteError, match="at least 2 classes"):
        classification_head(tiny_graph(), classes=1)
    with pytest.raises(RewriteError, match="3 labels for 2 classes"):
        classification_head(tiny_graph(), classes=2, labels=["a", "b", "c"])
    spec = tmp_path / "bidirectional.arch"
    spec.write_text(UNTIED)
    with pytest.raises(RewriteError, match="not causal"):
        classification_head(load_spec(str(spec), {"causal": False}), classes=2)


def test_last_token_shape_rule_names_a_wrong_lengths(tmp_path):
    spec = tmp_path / "wrong.arch"
    spec.write_text("""
model wrong {
  input x: f32[batch, seq <= 8, 4]
  input lengths: i64[seq]
  y = last_token(x, lengths)
  output y: f32[batch, 4]
}
""")
    from lmspec.dsl.diagnostics import SpecError
    with pytest.raises(SpecError, match=r"lengths must be \[batch\]"):
        load_spec(str(spec), {})
