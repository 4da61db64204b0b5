"""A quantized export keeps no vocabulary-sized fp32 table: a tied head's lookup reads the head's own
quantized weight (int8 columns, or int4 blocks through GatherBlockQuantized), another table becomes
int8 rows with a scale each; lookups give the table back to within half a step, and a table that
anything but a lookup reads, or a small one, stays as it was."""
import numpy as np
import onnx
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lmspec.runtime.export.optimize import quantize_int4, quantize_int8
from lmspec.runtime.export import quantized_lookups
from lmspec.runtime.export.quantized_lookups import quantize_embedding_lookups
from runtime_helpers import lmspec_main

from test_export import random_checkpoint


def _lookups_model(rng) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ids -> (the table's rows, a second lookup of the same table, positions' rows, x @ shared)."""
    tables = {"table": rng.normal(0, 0.5, (300, 8)).astype(np.float32),
              "positions": rng.normal(0, 0.5, (16, 8)).astype(np.float32),
              "shared": rng.normal(0, 0.5, (300, 8)).astype(np.float32)}
    tables["table"][7] = 0.0  # a row of zeros: scale 1, zeros back
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
             helper.make_node("Gather", ["table", "ids"], ["again"], axis=0),
             helper.make_node("Gather", ["positions", "pos"], ["pos_rows"], axis=0),
             helper.make_node("Gather", ["shared", "ids"], ["shared_rows"], axis=0),
             helper.make_node("MatMul", ["x", "shared"], ["product"])]
    ints = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["b", "t"])  # noqa: E731
    floats = lambda name, *dims: helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))  # noqa: E731
    graph = helper.make_graph(nodes, "lookups", [ints("ids"), ints("pos"), floats("x", 2, 300)],
                              [floats("rows", "b", "t", 8), floats("again", "b", "t", 8),
                               floats("pos_rows", "b", "t", 8), floats("shared_rows", "b", "t", 8),
                               floats("product", 2, 8)],
                              [numpy_helper.from_array(v, k) for k, v in tables.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), tables


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_a_looked_up_table_becomes_int8_rows_and_gives_them_back_within_half_a_step():
    rng = np.random.default_rng(0)
    model, tables = _lookups_model(rng)
    feeds = {"ids": np.array([[0, 7, 299, 5], [5, 5, 1, 2]]), "pos": np.array([[0, 1, 2, 3], [4, 5, 6, 7]]),
             "x": rng.normal(size=(2, 300)).astype(np.float32)}
    before = _run(model, feeds)
    onnx.checker.check_model(model)
    # positions: 128 elements, under the threshold; shared: a MatMul reads it too
    assert quantize_embedding_lookups(model, min_elements=1000) == 1
    onnx.checker.check_model(model)
    rows, again, pos_rows, shared_rows, product = _run(model, feeds)
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "table" not in initializers and {"positions", "shared"} <= set(initializers)
    q, scales = initializers["table.int8_rows"], initializers["table.row_scales"]
    assert q.dtype == np.int8 and q.shape == (300, 8) and scales.shape == (300, 1) and np.abs(q).max() == 127
    table = tables["table"]
    np.testing.assert_array_equal(rows, (q.astype(np.float32) * scales)[feeds["ids"]])  # what the graph computes
    step = np.abs(table).max(axis=1) / 127
    assert (np.abs(rows - table[feeds["ids"]]) <= step[feeds["ids"]][..., None] / 2 + 1e-7).all()
    assert (rows[0, 1] == 0).all() and np.array_equal(again, rows)
    for got, want in ((pos_rows, before[2]), (shared_rows, before[3]), (product, before[4])):
        np.testing.assert_array_equal(got, want)


def _tied_model(table: np.ndarray, head: np.ndarray) -> onnx.ModelProto:
    """ids -> two lookups of `table` (one of ids whose rank is not stated), and x @ Transpose(head)
    (the head tied when it is the table)."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
             helper.make_node("Identity", ["ids"], ["same_ids"]),  # ids of a rank the graph does not state
             helper.make_node("Gather", ["table", "same_ids"], ["again"], axis=0),
             helper.make_node("Transpose", ["table" if head is table else "head"], ["head_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "head_t"], ["logits"])]
    rows, dim = table.shape
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"]),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", dim])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", d]) for n, d in
         (("rows", dim), ("again", dim), ("logits", rows))],
        [numpy_helper.from_array(table, "table")] + ([numpy_helper.from_array(head, "head")] if head is not table else []))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4])
@pytest.mark.parametrize("ranks", ["stated", "unknown"])
def test_a_tied_heads_lookup_reads_the_heads_quantized_weight(tmp_path, quantize, ranks, monkeypatch):
    """A 8,192 x 128 table (a million entries) that the head multiplies by: after quantizing, the
    lookups read the head's quantized weight, no copy of the table is left, and each row comes back
    within half a step of the head's own quantization, whether the graph states the rank of the ids
    or not. A head that is not the table changes nothing of this: its lookup gets int8 rows of its own."""
    if ranks == "unknown":
        monkeypatch.setattr(quantized_lookups, "_rank", lambda model, name: None)
    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.02, (8192, 128)).astype(np.float32)
    feeds = {"ids": np.array([[0, 8191, 5], [5, 77, 4096]]), "x": rng.normal(size=(2, 3, 128)).astype(np.float32)}
    for head, shared in ((table, True), (rng.normal(0, 0.02, (8192, 128)).astype(np.float32), False)):
        onnx.save(_tied_model(table, head), str(tmp_path / "fp32.onnx"))
        quantize(tmp_path / "fp32.onnx", tmp_path / "q.onnx")
        model = onnx.load(str(tmp_path / "q.onnx"))
        onnx.checker.check_model(model)
        initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        assert not any(v.dtype == np.float32 and v.shape == table.shape for v in initializers.values())
        assert (not shared) == any(name.endswith(".int8_rows") for name in initializers)
        ops = {n.op_type for n in model.graph.node}
        assert shared == ("GatherBlockQuantized" in ops if quantize is quantize_int4 else "Transpose" in ops)
        rows, again, logits = _run(model, feeds)
        assert np.array_equal(rows, again)
        # half a step of the head's own quantization: int8's one scale, int4's blocks of 32 a scale each
        step = (np.abs(table).max() / 127 if quantize is quantize_int8 else
                (table.reshape(8192, 4, 32).max(-1) - table.reshape(8192, 4, 32).min(-1)).max() / 15)
        assert np.abs(rows - table[feeds["ids"]]).max() <= 0.51 * step
        np.testing.assert_allclose(logits, feeds["x"] @ head.T, atol=0.05 if quantize is quantize_int8 else 0.2)


@pytest.mark.parametrize("kind, largest", [("int8", 0.3), ("int4", 0.25)])
def test_a_quantized_export_of_a_large_vocabulary_holds_the_table_once(tmp_path, kind, largest):
    """GPT-2's tied 50,257-token table with one small layer: the head's quantized copy is the only
    one (the int8 file once kept the fp32 table beside it and was larger than the fp32 export; then
    two int8 copies, 0.4x of the fp32 bytes)."""
    model, _ = random_checkpoint(tmp_path / "run", "specs/gpt2.arch", {"layers": 1, "dim": 32, "heads": 2,
                                                                       "context": 64})
    path = tmp_path / kind / "m.onnx"
    out = lmspec_main("export", tmp_path / "run", "-o", path, "--quantize", kind, "--no-report")
    assert out.returncode == 0, out.stderr
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert path.stat().st_size < largest * fp32_bytes, path.stat().st_size / fp32_bytes
    graph = onnx.load(str(path)).graph
    assert not any(list(i.dims) == [50257, 32] for i in graph.initializer)  # neither fp32 nor int8 rows
    generated = lmspec_main("generate", path, "--prompt", "Hello", "--max-tokens", "4", "--temperature", "0")
    assert generated.returncode == 0 and generated.stdout.startswith("Hello"), generated.stderr
