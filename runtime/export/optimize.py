"""onnxruntime's own tools on an exported model: graph optimisation with the transformer fusions,
dynamic int8 quantisation, block-wise int4 weights (MatMulNBits) and fp16 conversion; both
quantisations then quantize the token embedding's lookup too (quantized_lookups.py). Each reads one
file and writes another."""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from pathlib import Path

from lmspec.runtime.export.quantized_lookups import quantize_lookups


def optimize(src: Path, dst: Path, heads: int, hidden: int) -> dict[str, int]:
    """onnxruntime's transformer optimiser (GPT-2 fusions: SkipLayerNormalization, BiasGelu,
    attention where its pattern matches) plus its basic graph optimisations. Returns the fused op
    counts that are not zero."""
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimiser's bias fusion turns any `Gelu` into the erf-based BiasGelu, also a tanh-approximated
    # one (opset 20's Gelu(approximate="tanh"), GPT-2's): name those FastGelu, the tanh form, first.
    with _rewritten(src, dst, _tanh_gelu_to_fast_gelu) as src, _quiet():
        model = optimize_model(str(src), model_type="gpt2", num_heads=heads, hidden_size=hidden, opt_level=1)
        fused = {name: count for name, count in model.get_fused_operator_statistics().items() if count}
        model.save_model_to_file(str(dst), use_external_data_format=_large(src))
    return fused


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic quantisation: int8 weights for MatMul/Gemm, activations quantised on the fly per call;
    then the token embedding's table as int8 rows (quantize_embedding_lookups)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # A tied output head is exported as MatMul(x, Transpose(embedding)): the quantiser only takes
    # MatMuls whose weight is an initializer, so it would leave the largest matrix in fp32.
    with _rewritten(src, dst, _fold_weight_transposes) as src, _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=_large(src))
    _rewrite_in_place(dst, quantize_lookups)


INT4_BLOCK = 32  # weights per scale: onnxruntime-genai's default for CPU, finer than its 128 for GPUs


def quantize_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK) -> None:
    """Block-wise weight-only int4 (onnxruntime's MatMulNBits quantizer): each MatMul weight in blocks
    of `block_size` along its input dim, a scale and a zero point per block. The products run at
    accuracy level 4 (activations quantised to int8 per block, the int8 dot-product kernels): at the
    default level onnxruntime unpacks the blocks to fp32, and int4 then decodes slower than int8
    (bench/RESULTS.md, issue 25). The token embedding's table becomes int8 rows, as in quantize_int8."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    import onnx

    # As for int8: a tied head's Transpose(embedding) is folded, so that the largest matrix is quantized too.
    with _rewritten(src, dst, _fold_weight_transposes) as src, _quiet():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=False,
                                         accuracy_level=4)
        quantizer.process()
        quantize_lookups(quantizer.model.model)
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=_large(src))


def to_fp16(src: Path, dst: Path) -> None:
    """Weights and activations in float16 (for GPUs; inputs and outputs stay float32 except the cache)."""
    from onnxruntime.transformers.onnx_model import OnnxModel
    import onnx

    model = OnnxModel(onnx.load(str(src)))
    with _quiet():
        model.convert_float_to_float16(keep_io_types=["logits"])
    model.save_model_to_file(str(dst), use_external_data_format=_large(src))


def _tanh_gelu_to_fast_gelu(model) -> int:
    """Gelu(approximate="tanh") -> com.microsoft FastGelu (the same function), in place."""
    from onnx import helper

    count = 0
    for node in model.graph.node:
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx") and any(
                a.name == "approximate" and a.s == b"tanh" for a in node.attribute):
            node.op_type, node.domain = "FastGelu", "com.microsoft"
            del node.attribute[:]
            count += 1
    if count and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def _fold_weight_transposes(model) -> int:
    """Transpose(initializer) feeding only MatMuls as their weight -> a transposed initializer, in
    place (the original stays for its other users, e.g. the embedding's Gather)."""
    import numpy as np
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    count = 0
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        consumers = users.get(node.output[0], [])
        if not consumers or any(u.op_type != "MatMul" or u.input[1] != node.output[0] for u in consumers):
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(initializers[node.input[0]])
        folded = np.ascontiguousarray(weight.transpose(perm) if perm else weight.T)
        model.graph.initializer.append(numpy_helper.from_array(folded, node.output[0]))
        model.graph.node.remove(node)
        count += 1
    return count


@contextlib.contextmanager
def _rewritten(src: Path, dst: Path, rewrite):
    """`src`, or a temporary copy beside `dst` that `rewrite(model)` changed (it returns how often)."""
    import onnx

    model = onnx.load(str(src))
    if not rewrite(model):
        yield src
        return
    tmp = dst.with_name(dst.stem + ".rewritten.onnx")
    _save(model, tmp)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".data").unlink(missing_ok=True)


def _rewrite_in_place(path: Path, rewrite) -> int:
    """`rewrite(model)` applied to the file at `path` (it returns how often; the file is written again only then)."""
    import onnx

    model = onnx.load(str(path))
    count = rewrite(model)
    if count:
        # what the file pointed at is in memory now; a smaller file replaces it
        Path(str(path) + ".data").unlink(missing_ok=True)
        _save(model, path)
    return count


def _save(model, path: Path) -> None:
    """`model` to `path`, its weights in `path`.data beside it when they pass protobuf's 2 GB limit."""
    import onnx

    large = sum(len(i.raw_data) for i in model.graph.initializer) > 1.8e9
    onnx.save(model, str(path), save_as_external_data=large, location=path.name + ".data")


def op_counts(path: Path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def _large(path: Path) -> bool:
    return os.path.getsize(path) > 1.8e9 or Path(str(path) + ".data").exists()


class _quiet:
    """The optimiser and quantiser log at INFO/WARNING on the root logger; keep the CLI's output readable."""

    def __enter__(self):
        self._level = logging.root.level
        logging.root.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        logging.root.setLevel(self._level)
        return False
