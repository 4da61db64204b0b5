"""A checkpoint to an ONNX bundle: export, the parity check against PyTorch, optimisation,
quantisation or float16, and the model and its sidecar moved into place. What `lmspec export` runs.

torch, onnxruntime and the compiler's exporter are imported inside the functions, so that the CLI,
which imports this module with its handler, loads them only when an export runs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from lmspec.runtime.atomic import failures_as_write_errors, install_file, scratch_directory, write_text_atomically
from lmspec.runtime.errors import UsageError
from lmspec.runtime.export.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CLASSIFIER,
    LANGUAGE_MODEL,
    bundle_sidecar,
    session_options,
)

QUANTIZED_TOLERANCE_NOTE = "quantized weights: logits differ by design; the fp32 export was checked to 1e-4"
CLASSIFIER_QUANTIZED_NOTE = ("quantized weights: logits differ by design, what counts is the predicted class; "
                             "the fp32 export was checked to 1e-4")


def output_path(out: str) -> Path:
    """`-o model.onnx` names the file; `-o DIR` means DIR/model.onnx."""
    path = Path(out)
    return path if path.suffix == ".onnx" else path / "model.onnx"


def export_bundle(checkpoint: str, out: str, opset: int | None = None, optimize: bool = False,
                  quantize: str | None = None, fp16: bool = False, fused_attention: bool = False,
                  measure=None, log=print) -> dict:
    """Export a checkpoint, a language model or a classifier, to `out` with its sidecar; returns the
    sidecar's content.

    The fp32 export is checked against PyTorch (ExportError beyond 1e-4), then optimised, quantised
    or converted as asked, and each of those checked again. Files are written in a temporary
    directory beside the destination and moved into place only when everything passed.

    With `measure` (runtime/serve/quantized_report.py's), a quantised language model is measured beside
    fp32 and the other quantisation, built in the temporary directory and not installed: `measure`
    gets {"fp32", "int8", "int4": ONNX file} and the sidecar, and what it returns is kept in the
    sidecar as "quantization_report"."""
    import onnxruntime as ort
    import torch

    from lmspec.compiler.onnx_export import DEFAULT_OPSET, PARITY_TOLERANCE, ExportError
    from lmspec.runtime.data.chat_template import checkpoint_chat_template

    from lmspec.runtime.export import optimize as onnx_optimize

    if quantize not in (None, "int8", "int4"):
        raise UsageError(f"--quantize {quantize}: int8 or int4")
    if quantize and fp16:
        raise UsageError(f"--quantize {quantize} and --fp16 exclude each other: quantized weights run with fp32 "
                         f"activations")
    opset = DEFAULT_OPSET if opset is None else opset  # 0 is refused below, not taken for the default
    destination = output_path(out)
    target = export_target(checkpoint, log)
    graph, model = target.graph, target.model
    if fused_attention and target.kind != LANGUAGE_MODEL:
        raise UsageError("--fused-attention: a classifier has no KV cache; it exports without one")
    target.fused_attention = fused_attention
    measured = measure is not None and quantize is not None and target.kind == LANGUAGE_MODEL

    with failures_as_write_errors(destination), scratch_directory(destination.parent, "export") as work:
        started = time.perf_counter()
        exported = work / "fp32.onnx"
        target.export(exported, opset)
        log(f"exported {graph.name} ({sum(p.numel() for p in model.parameters()):,} parameters, opset {opset}) "
            f"in {time.perf_counter() - started:.1f} s")

        def parity_of(path: Path, label: str, enforce: bool):
            session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
            with torch.no_grad():
                result = target.check(session)
            log(f"parity {label}: {result.describe()}")
            if enforce and not result.worst <= PARITY_TOLERANCE:  # `not <=` also catches NaN
                raise ExportError(f"the {label} ONNX model does not match PyTorch: max |logits difference| "
                                  f"{result.worst:.3e} > {PARITY_TOLERANCE:g}; nothing was written")
            return result.as_dict()

        parity = {"fp32": parity_of(exported, "fp32", enforce=True)}
        final, fused = exported, {}
        if optimize:
            optimized = work / "optimized.onnx"
            heads, hidden = _heads_and_hidden(model)
            fused = onnx_optimize.optimize(final, optimized, heads, hidden)
            log("optimized: fused " + (", ".join(f"{n} x{c}" for n, c in fused.items()) or "nothing"))
            parity["optimized"] = parity_of(optimized, "optimized", enforce=True)
            final = optimized
        if quantize:
            unquantized = final
            quantized = work / f"{quantize}.onnx"
            if quantize == "int8":
                onnx_optimize.quantize_int8(final, quantized)
            else:
                onnx_optimize.quantize_int4(final, quantized)
            parity[quantize] = parity_of(quantized, quantize, enforce=False)
            log(f"  ({target.quantized_note})")
            final = quantized
        if fp16:
            half = work / "fp16.onnx"
            onnx_optimize.to_fp16(final, half)
            parity["fp16"] = parity_of(half, "fp16", enforce=False)
            log("  (float16 rounds every activation: meant for GPU execution providers)")
            final = half

        ckpt = target.checkpoint
        meta = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "kind": target.kind,
            "name": graph.name,
            "file": destination.name,
            "context": graph.context,
            "vocab_size": target.vocab,
            "eot_id": target.tokenizer.eot_id,
            **target.sidecar_fields(),
            "dtype": "float16" if fp16 else "float32",
            "quantized": quantize,
            "optimized": optimize,
            "fused": fused,
            "opset": opset,
            "parity": parity,
            "checkpoint": {"path": str(ckpt.path), "step": ckpt.step},
            "tokenizer": ckpt.tokenizer,
        }
        chat = checkpoint_chat_template(ckpt.train_config, target.tokenizer) if target.kind == LANGUAGE_MODEL else None
        if chat is not None:  # what generate --chat and serve render (bundle.bundle_chat_template)
            meta["chat_template"] = chat
        if measured:
            meta["quantization_report"] = measure(_all_quantizations(unquantized, work, quantize), meta)
        _install(final, destination)
        if target.kind == LANGUAGE_MODEL:
            _write_runtime_files(meta, target, destination, directory=Path(out).suffix != ".onnx", log=log)
        # last: a bundle with a sidecar is complete
        write_text_atomically(bundle_sidecar(destination), json.dumps(meta, indent=1) + "\n")
    size = destination.stat().st_size + _data_size(destination)
    log(f"wrote {destination} ({size / 2**20:.1f} MiB) and {bundle_sidecar(destination).name}"
        + (f" (chat template: {meta['chat_template'].get('source') or 'Jinja'})" if "chat_template" in meta else ""))
    return meta


class ModelExport:
    """A checkpoint's model on its way to ONNX: `export` writes it, `check` compares a session of the
    export with PyTorch, `sidecar_fields` is what its kind adds to the sidecar."""

    kind: str  # the sidecar's "kind"
    quantized_note: str  # what the parity of an int8 export means

    def __init__(self, loaded, model, graph, tokenizer):
        # `reference` is the checkpoint's model as it was trained, which parity compares with;
        # `model` is what gets exported (the same, or with its LoRA adapters folded in).
        self.reference, self.checkpoint, self.model, self.graph = loaded.model, loaded.checkpoint, model, graph
        self.tokenizer, self.vocab = tokenizer, _vocab(graph, tokenizer)


class LanguageModelExport(ModelExport):
    """A language model's export: with the KV cache where its attention allows one."""

    kind = LANGUAGE_MODEL
    quantized_note = QUANTIZED_TOLERANCE_NOTE
    layout = None  # known once exported
    fused_attention = False

    def export(self, path: Path, opset: int) -> None:
        from lmspec.compiler.onnx_export import export_onnx
        self.layout = export_onnx(self.model, self.graph, path, opset=opset, fused_attention=self.fused_attention)

    def check(self, session):
        from lmspec.compiler.onnx_parity import check_parity
        return check_parity(self.reference, session, self.layout, self.vocab, self.graph.context)

    def sidecar_fields(self) -> dict:
        return {"cache": self.layout.as_dict() if self.layout is not None else None}


class ClassifierExport(ModelExport):
    """A classifier's export: tokens and lengths in, class logits out, no cache; its sidecar names
    the classes and how texts are encoded (`lmspec classify BUNDLE` encodes them the same way)."""

    kind = CLASSIFIER
    quantized_note = CLASSIFIER_QUANTIZED_NOTE

    def __init__(self, loaded, model, graph, tokenizer, labels: list[str], encoder):
        super().__init__(loaded, model, graph, tokenizer)
        self.labels, self.encoder = labels, encoder

    def export(self, path: Path, opset: int) -> None:
        from lmspec.compiler.onnx_export import export_classifier_onnx
        export_classifier_onnx(self.model, self.graph, path, opset=opset)

    def check(self, session):
        from lmspec.compiler.onnx_parity import check_classifier_parity
        return check_classifier_parity(self.reference, session, self.vocab, self.graph.context)

    def sidecar_fields(self) -> dict:
        return {"cache": None, "labels": self.labels, "max_length": self.encoder.max_length,
                "pad_id": self.encoder.pad_id}


def export_target(checkpoint: str, log=print) -> ModelExport:
    """What `checkpoint` exports as: its model rebuilt with its rewrites (an adapter checkpoint on
    its base), LoRA adapters folded into their weights, as a classifier or a language model."""
    from lmspec.runtime.finetune.classifier import classifier_inputs, classify_record
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.data.tokenizer import load_tokenizer

    loaded = load_model(checkpoint)
    tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
    graph, model = _adapters_folded(loaded, log)
    if classify_record(loaded.checkpoint) is None:
        return LanguageModelExport(loaded, model, graph, tokenizer)
    labels, encoder = classifier_inputs(loaded)
    return ClassifierExport(loaded, model, graph, tokenizer, labels, encoder)


def _adapters_folded(loaded, log) -> tuple:
    """(graph, model) with the LoRA adapters folded into their matrices (W + scale B A, as `lmspec
    lora merge` does), so the ONNX graph holds one MatMul per layer, not three."""
    from lmspec.compiler.lora import adapted_matrices, is_lora, merge_lora
    from lmspec.compiler.lower import lower

    if not is_lora(loaded.graph):
        return loaded.graph, loaded.model
    graph, weights = merge_lora(loaded.graph, loaded.model.state_dict())
    model = lower(graph)
    model.load_state_dict(weights, strict=True)
    log(f"folded the LoRA adapters of {len(adapted_matrices(loaded.graph))} matrices into their weights")
    return graph, model.eval()


def _install(src: Path, destination: Path) -> None:
    """Move the model (and its external weights, for models over 2 GB) to their final names. The
    graph names its weights' file, so only the graph is rewritten: the weights are moved, not copied."""
    data = Path(str(src) + ".data")
    if data.exists():
        import onnx

        model = onnx.load(str(src), load_external_data=False)
        for tensor in _external_tensors(model.graph):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = destination.name + ".data"
        onnx.save(model, str(src))
        install_file(data, Path(str(destination) + ".data"))
    install_file(src, destination)


def _external_tensors(graph):
    """The tensors of `graph` and its subgraphs whose data lies in a file beside the model."""
    from onnx import AttributeProto, TensorProto

    for tensor in graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            yield tensor
    for node in graph.node:
        for attribute in node.attribute:
            tensors = [attribute.t] if attribute.type == AttributeProto.TENSOR else list(attribute.tensors)
            yield from (t for t in tensors if t.data_location == TensorProto.EXTERNAL)
            for subgraph in [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs):
                yield from _external_tensors(subgraph)


def _write_runtime_files(meta: dict, target, destination: Path, directory: bool, log) -> None:
    """onnxruntime-genai's config and Optimum's beside an export to a directory, and the tokenizer files
    both read (the same files); meta["genai"] and meta["optimum"] name their configs, or are None (and
    why, in one line each) when that runtime cannot run the bundle as it is."""
    from lmspec.compiler.torch_modules import Attention
    from lmspec.runtime.export.genai_files import GENAI_CONFIG, genai_files, genai_refusal, tokenizer_files
    from lmspec.runtime.export.optimum_files import GENERATION_CONFIG, OPTIMUM_CONFIG, optimum_files, optimum_refusal

    heads = [m.heads for m in target.model.modules() if isinstance(m, Attention)]
    not_a_directory = None if directory else \
        f"it reads a directory, and a file name was given: export with -o {destination.parent / 'DIR'}"
    files: dict[str, str] = {}
    meta["genai"] = meta["optimum"] = None
    why = genai_refusal(target.kind, target.tokenizer, meta["cache"], heads) or not_a_directory
    if why is None:
        files |= genai_files(meta, heads[0])
        meta["genai"] = GENAI_CONFIG
    else:
        log(f"no {GENAI_CONFIG} (onnxruntime-genai): {why}")
    why = optimum_refusal(target.kind, target.tokenizer, meta["cache"], heads) or not_a_directory
    if why is None:
        optimum, why = optimum_files(meta, target.checkpoint, target.graph)
        files |= optimum
    if why is None:
        meta["optimum"] = OPTIMUM_CONFIG
    else:
        log(f"no {OPTIMUM_CONFIG} (Optimum): {why}")
    if not files:
        return
    files |= tokenizer_files(target.tokenizer, meta["context"], meta["eot_id"], meta.get("chat_template"))
    for name, text in files.items():
        write_text_atomically(destination.parent / name, text)
    if meta["genai"]:
        log(f"wrote {GENAI_CONFIG} and the tokenizer files: onnxruntime-genai runs {destination.parent} as it is")
    if meta["optimum"]:
        log(f"wrote {OPTIMUM_CONFIG} and {GENERATION_CONFIG}: Optimum's ORTModelForCausalLM loads "
            f"{destination.parent} as it is")


def _all_quantizations(unquantized: Path, work: Path, quantize: str) -> dict[str, Path]:
    """{"fp32", "int8", "int4": ONNX file}: `unquantized` (optimised if asked), the quantisation asked
    for (already in `work`) and the other one, built beside it to be measured, never installed."""
    from lmspec.runtime.export import optimize as onnx_optimize

    models = {"fp32": unquantized, quantize: work / f"{quantize}.onnx"}
    for other, build in (("int8", onnx_optimize.quantize_int8), ("int4", onnx_optimize.quantize_int4)):
        if other not in models:
            models[other] = work / f"{other}.onnx"
            build(unquantized, models[other])
    return models


def _data_size(path: Path) -> int:
    data = Path(str(path) + ".data")
    return data.stat().st_size if data.exists() else 0


def _vocab(graph, tokenizer) -> int:
    vocab = graph.hyper.get("vocab")
    return vocab if isinstance(vocab, int) else tokenizer.vocab_size


def _heads_and_hidden(model) -> tuple[int, int]:
    from lmspec.compiler.torch_modules import Attention

    attention = next((m for m in model.modules() if isinstance(m, Attention)), None)
    if attention is None:
        return 0, 0  # no attention op to fuse; the other fusions need neither number
    return attention.heads, attention.heads * attention.head_dim
