"""An export's `logits_to_keep` (compiler/onnx_last_logits.py): the logits of the last positions
only, when asked; all of them for a caller that does not know the input; left out where the logits
are not one head's. (A plain linear head is every export's: their parity checks ask for its last logits.)"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lmspec.compiler.loader import load_spec
from lmspec.compiler.lower import lower
from lmspec.compiler.onnx_export import export_onnx
from lmspec.compiler.onnx_last_logits import KEPT_POSITIONS, LOGITS_TO_KEEP

HEADS = {
    "scaled and capped": "logits = softcap(linear(x, vocab, bias=false) as head, 5.0) * 0.5",
    "two heads": "logits = linear(x, vocab, bias=false) as head + linear(x, vocab, bias=false) as other",
}
SPEC = """model heads {{
  vocab = 48; context = 32; dim = 32
  input tokens: i64[batch, seq <= context]
  x = embedding(tokens, vocab, dim) as embed
  x = x + attention(layernorm(x), 4, causal=true)
  x = layernorm(x) as norm
  {head}
  output logits
}}
"""


# the every-option fused export (test_fused_attention.py) soft-caps its head too, by default
@pytest.fixture(scope="module", params=[pytest.param("scaled and capped", marks=pytest.mark.slow), "two heads"])
def exported(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(request.param.replace(" ", "_"))
    (work / "m.arch").write_text(SPEC.format(head=HEADS[request.param]))
    graph = load_spec(str(work / "m.arch"))
    export_onnx(lower(graph, seed=0).eval(), graph, work / "m.onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return request.param, work / "m.onnx", ort.InferenceSession(str(work / "m.onnx"), options)


def _run(session, ids, keep=None):
    batch, seq = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64),
             "position_ids": np.broadcast_to(np.arange(seq), (batch, seq)).copy()}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((batch, 4, 0, 8), dtype=np.float32)
    if keep is not None:
        feeds[LOGITS_TO_KEEP] = np.array(keep, dtype=np.int64)
    return session.run(["logits"], feeds)[0]


def test_logits_to_keep_slices_the_heads_input_and_defaults_to_every_position(exported):
    head, path, session = exported
    ids = np.random.default_rng(0).integers(0, 48, (2, 7))
    every = _run(session, ids)
    assert every.shape == (2, 7, 48)
    if head == "two heads":  # the logits are no single product: the export computes them all, as before
        assert LOGITS_TO_KEEP not in [i.name for i in onnx.load(str(path)).graph.input]
        return
    assert [i.name for i in session.get_overridable_initializers()] == [LOGITS_TO_KEEP]
    logits = next(o for o in onnx.load(str(path)).graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_param == KEPT_POSITIONS
    for keep, expected in [(0, every), (1, every[:, -1:]), (3, every[:, -3:]), (50, every)]:
        got = _run(session, ids, keep)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # the head multiplies the kept positions only: one MatMul fed by the Slice
    nodes = onnx.load(str(path)).graph.node
    [slice_node] = [n for n in nodes if n.name == f"{LOGITS_TO_KEEP}_slice"]
    assert sum(slice_node.output[0] in n.input for n in nodes if n.op_type == "MatMul") == 1


def test_onnx_model_asks_for_the_last_logits_and_slices_those_of_an_older_export(tiny_bundle):
    from lmspec.runtime.serve.language_model import OnnxModel

    model = OnnxModel(tiny_bundle)
    ids = np.random.default_rng(1).integers(0, model.vocab_size, (2, 9))
    assert model.asks_for_kept_logits  # every export takes logits_to_keep where its head allows
    every, every_past = model.forward(ids)
    for keeps in (True, False):  # an export from before logits_to_keep computes them all
        model.asks_for_kept_logits = keeps
        last, past = model.forward(ids, last=2)
        assert last.shape == (2, 2, model.vocab_size)
        np.testing.assert_allclose(last, every[:, -2:], rtol=1e-5, atol=1e-5)
        for a, b in zip(past, every_past):
            np.testing.assert_array_equal(a, b)
