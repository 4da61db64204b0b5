"""A quantized export stores the token embedding's table as int8 rows with a scale each: the lookup
gives the rows back to within half a step, the table is no longer the largest thing in the file, and
a table that anything but a lookup reads, or a small one, stays as it was."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lmspec.runtime.export.optimize import quantize_embedding_lookups
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


def test_an_int8_export_of_a_large_vocabulary_is_about_half_the_fp32_bytes(tmp_path):
    """GPT-2's tied 50,257-token table with one small layer: two int8 copies of it now (the lookup's
    rows, the head's transposed matrix), where the int8 file kept the table in fp32 beside the head's
    copy and was larger than the fp32 export."""
    model, _ = random_checkpoint(tmp_path / "run", "specs/gpt2.arch", {"layers": 1, "dim": 32, "heads": 2,
                                                                       "context": 64})
    out = lmspec_main("export", tmp_path / "run", "-o", tmp_path / "q8" / "m.onnx", "--quantize", "int8",
                      "--no-report")
    assert out.returncode == 0, out.stderr
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert (tmp_path / "q8" / "m.onnx").stat().st_size < 0.6 * fp32_bytes
    graph = onnx.load(str(tmp_path / "q8" / "m.onnx")).graph
    assert not any(i.data_type == TensorProto.FLOAT and list(i.dims) == [50257, 32] for i in graph.initializer)
    assert any(i.data_type == TensorProto.INT8 and list(i.dims) == [50257, 32] for i in graph.initializer)
    generated = lmspec_main("generate", tmp_path / "q8" / "m.onnx", "--prompt", "Hello", "--max-tokens", "4",
                            "--temperature", "0")
    assert generated.returncode == 0 and generated.stdout.startswith("Hello"), generated.stderr
