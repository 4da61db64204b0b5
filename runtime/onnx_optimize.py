"""onnxruntime's own tools on an exported model: graph optimisation with the transformer fusions,
dynamic int8 quantisation, fp16 conversion. Each reads one file and writes another."""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path


def optimize(src: Path, dst: Path, heads: int, hidden: int) -> dict[str, int]:
    """onnxruntime's transformer optimiser (GPT-2 fusions: SkipLayerNormalization, BiasGelu,
    attention where its pattern matches) plus its basic graph optimisations. Returns the fused op
    counts that are not zero."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        model = optimize_model(str(src), model_type="gpt2", num_heads=heads, hidden_size=hidden, opt_level=1)
        fused = {name: count for name, count in model.get_fused_operator_statistics().items() if count}
        model.save_model_to_file(str(dst), use_external_data_format=_large(src))
    return fused


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic quantisation: int8 weights for MatMul/Gemm, activations quantised on the fly per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=_large(src))


def to_fp16(src: Path, dst: Path) -> None:
    """Weights and activations in float16 (for GPUs; inputs and outputs stay float32 except the cache)."""
    from onnxruntime.transformers.onnx_model import OnnxModel
    import onnx

    model = OnnxModel(onnx.load(str(src)))
    with _quiet():
        model.convert_float_to_float16(keep_io_types=["logits"])
    model.save_model_to_file(str(dst), use_external_data_format=_large(src))


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
