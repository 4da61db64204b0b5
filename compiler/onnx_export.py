"""Export a lowered model to ONNX, with the KV cache as explicit inputs and outputs.

The ONNX model follows Hugging Face Optimum's decoder layout, so it looks familiar to ONNX users:

    inputs   input_ids            int64 [batch, seq]
             attention_mask       int64 [batch, past + seq]   1 = a real token, 0 = padding
             position_ids         int64 [batch, seq]
             past_key_values.{i}.key / .value   float [batch, kv_heads, past, head_dim]
             logits_to_keep       int64 scalar, optional: the last positions to compute logits for (0: all)
    outputs  logits               float [batch, seq (or logits_to_keep), vocab]
             present.{i}.key / .value           float [batch, kv_heads, past + seq, head_dim]

A layer with a sliding window of W keys keeps only the last W - 1 positions (the keys the next
query can see): its past and present are [batch, kv_heads, <= W - 1, head_dim], and the last columns
of attention_mask are its keys'. The sidecar's cache "kept" lists that bound per layer (null: all).

The first call passes a past of length 0. A model whose attention is written by hand (matmul,
softmax, causal_mask) cannot use a cache: it exports with `input_ids` (and `logits_to_keep`) and
`logits` only. compiler/onnx_last_logits.py adds `logits_to_keep` where the head allows it.

A classifier (compiler/classify_head.py's rewrite) exports without a cache, since it reads each text
once (`export_classifier_onnx`):

    inputs   input_ids            int64 [batch, seq]          right-padded texts
             lengths              int64 [batch]               each row's number of real tokens
    outputs  logits               float [batch, classes]
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmspec.dsl.diagnostics import Diagnostic, SpecError

from .classify_head import LENGTHS_INPUT
from .graph import ModelGraph
from .kv_cache import past_keys_seen
from .onnx_last_logits import add_logits_to_keep
from .registry import get_op
from .torch_modules import Attention, plain_attention, visible_keys
from lmspec.dsl.errors import UserError

DEFAULT_OPSET = 20  # Gelu and LayerNormalization are single ops; onnxruntime >= 1.17 runs it
MIN_OPSET = 18  # the oldest opset torch's exporter (torch.export + onnxscript) writes
MAX_OPSET = 23  # the newest
PARITY_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| logit allowed for an fp32 export

# Dimension names of the exported graph, as Hugging Face Optimum names them.
BATCH, SEQUENCE, PAST = "batch_size", "sequence_length", "past_sequence_length"
MAX_LENGTH = "max_sequence_length"  # a shared buffer's length (onnxruntime-genai's max_length)
SHARED_BUFFER = "shared"  # the sidecar's cache "buffer" value for a fused-attention export
TOTAL = f"{PAST} + {SEQUENCE}"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(UserError):
    """The model could not be exported, or its export does not compute what the model does."""


@dataclass(frozen=True)
class CacheLayout:
    """What a KV cache of this model holds: per attention layer, kv_heads x head_dim; and whether it
    is one preallocated buffer per layer that fused attention updates in place (shared_buffer), or
    grows by concatenation at every call."""

    layers: int
    kv_heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    shared_buffer: bool = False
    # Per layer, the most positions its cache keeps (a sliding window's layer needs only the last
    # window - 1 keys for the next query), or None: all of them.
    kept: tuple[int | None, ...] | None = None

    def keeps(self, layer: int) -> int | None:
        return self.kept[layer] if self.kept else None

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def as_dict(self) -> dict:
        shape = {"layers": self.layers, "kv_heads": list(self.kv_heads), "head_dim": list(self.head_dim)}
        if self.kept:
            shape["kept"] = list(self.kept)
        return {**shape, "buffer": SHARED_BUFFER} if self.shared_buffer else shape


def _fused_layout(model: nn.Module, layout: CacheLayout | None, graph: ModelGraph) -> CacheLayout:
    """The shared-buffer layout of `model`, or ExportError saying why its attention cannot be fused."""
    from .onnx_fused_attention import why_not_fused

    reason = "its attention cannot use a KV cache" if layout is None else why_not_fused(model)
    if reason:
        raise ExportError(f"{graph.name}: fused attention needs causal attention over a KV cache, but {reason}")
    # The kernel writes into a buffer of the whole context; a window bounds what it reads, not what it keeps.
    return dataclasses.replace(layout, shared_buffer=True, kept=None)


def cache_layout(model: nn.Module) -> CacheLayout | None:
    """The cache layout of a lowered model, or None when its attention cannot use a cache."""
    if not getattr(model, "supports_kv_cache", False):
        return None
    layers = sorted((m for m in model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_index)
    context = getattr(model, "context", None)
    kept = tuple(_kept_by_window(m.cfg.window, context) for m in layers)
    return CacheLayout(len(layers), tuple(m.kv_heads for m in layers), tuple(m.head_dim for m in layers),
                       kept=kept if any(k is not None for k in kept) else None)


def _kept_by_window(window: int | None, context: int | None) -> int | None:
    """How many past positions a layer with this window needs: window - 1 (at least two, so that the
    traced length stays symbolic), or None when that is the whole context anyway."""
    seen = past_keys_seen(window, context)
    return None if seen is None else max(seen, 2)


class TensorCache:
    """The cache protocol of lowered attention (`offset`, `update`) over tensors that come in as
    graph inputs, plus a padding mask and explicit positions: what a traced graph needs."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, kept: tuple[int | None, ...] | None = None):
        self.past = past
        self.kept = kept
        # A bounded layer's past is shorter than the sequence so far; the mask is as long as all of it.
        self.offset = attention_mask.shape[1] - position_ids.shape[1]
        self.attention_mask = attention_mask
        self.position_ids = position_ids
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._masks: dict[tuple, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer]
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        keep = self.kept[layer] if self.kept else None
        self.present.append((k, v) if keep is None else (_last(k, keep), _last(v, keep)))
        return k, v

    def mask(self, t, s, causal: bool, window: int | None = None) -> torch.Tensor:
        """Which keys each query sees, [batch, 1, t, s]: not padding, and (causal) not in the future,
        nor (window) too far in the past. A query always sees itself, so that a padding row is never
        all-masked: softmax over nothing is NaN, and a NaN in a padded position would spread through
        0 * NaN."""
        key = (causal, window, str(s))  # s is symbolic while tracing, and a SymInt does not hash
        if key not in self._masks:
            device = self.attention_mask.device
            # the mask's last s columns are this layer's keys: a bounded layer holds only the latest
            padding = self.attention_mask if self.kept is None else _last_columns(self.attention_mask, s)
            keep = padding[:, None, :].bool() & visible_keys(t, s, causal, window, device)[None]
            query = torch.arange(t, device=device) + (s - t)
            keep = keep | (torch.arange(s, device=device)[None, :] == query[:, None])[None]
            self._masks[key] = keep[:, None]
        return self._masks[key]


def _last(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last n positions of a cache tensor [batch, kv_heads, positions, head_dim], or all of them
    when it holds fewer. Gathered by index: a slice would have the exporter guess which is longer."""
    size = x.shape[2]
    start = torch.sym_max(size - n, 0)
    return x.index_select(2, torch.arange(size - start, device=x.device) + start)


def _last_columns(mask: torch.Tensor, n) -> torch.Tensor:
    """The last n columns of the padding mask: those of a bounded layer's keys. Gathered by index, as
    a slice would tie the mask's traced length to the bounded cache's."""
    index = torch.arange(n, device=mask.device) + (mask.shape[1] - n)
    return mask.index_select(1, index)


class CachedDecoder(nn.Module):
    """A lowered model with the cache as tensors: the module that is exported."""

    def __init__(self, model: nn.Module, layout: CacheLayout):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.layout.layers)]
        if self.layout.shared_buffer:
            from .onnx_fused_attention import SharedBufferCache
            cache = SharedBufferCache(past, attention_mask, position_ids)
        else:
            cache = TensorCache(past, attention_mask, position_ids, self.layout.kept)
        logits = _logits(self.model(input_ids, cache))
        return (logits, *[t for pair in cache.present for t in pair])


class PlainDecoder(nn.Module):
    """A lowered model without a cache: tokens in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return _logits(self.model(input_ids))


class TextClassifier(nn.Module):
    """A lowered classifier: right-padded tokens and each row's length in, class logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, lengths):
        return _logits(self.model(input_ids, lengths))


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def check_exportable(graph: ModelGraph) -> None:
    """Refuse, before any tracing, the ops the registry marks as not exportable, each at its source line."""
    diagnostics = []
    for _, data in graph.nodes():
        op = get_op(data["op"])
        if op is not None and not op.exportable:
            why = f": {op.onnx}" if op.onnx else ""
            diagnostics.append(Diagnostic(f"op '{data['op']}' cannot be exported to ONNX{why}", data["span"], "E500"))
    if diagnostics:
        raise SpecError(diagnostics, graph.sources)


def example_lengths(context: int | None) -> tuple[int, int]:
    """(sequence, past) lengths to trace with: at least 2 each, so that torch.export keeps them
    symbolic (it specialises sizes 0 and 1), and together within the context."""
    context = context or 64
    seq = max(2, min(8, context // 2))
    return seq, max(2, min(4, context - seq))


def spec_inputs(graph: ModelGraph) -> list[str]:
    """The names the spec gives the model's inputs, in order (`tokens`, and a classifier's `lengths`)."""
    return [graph.g.nodes[node]["args"]["name"] for node in graph.inputs]


def is_classifier(graph: ModelGraph) -> bool:
    """Whether `graph` is a classifier: (tokens, lengths) -> [batch, classes] logits."""
    inputs = spec_inputs(graph)
    return len(inputs) == 2 and inputs[1] == LENGTHS_INPUT and len(graph.outputs) == 1 \
        and len(graph.outputs[0][1].shape) == 2


def export_onnx(model: nn.Module, graph: ModelGraph, path: str | Path, opset: int = DEFAULT_OPSET,
                fused_attention: bool = False) -> CacheLayout | None:
    """Write `model` (lowered from `graph`, in eval mode) to `path` as ONNX; return its cache layout,
    None when it exports without a cache. With `fused_attention`, attention is onnxruntime's
    GroupQueryAttention over a shared KV buffer (compiler/onnx_fused_attention.py). Raises SpecError
    for an op that cannot be exported and ExportError when the exporter fails, naming the op where it can."""
    check_before_tracing(graph, opset)
    if len(graph.inputs) != 1:  # the decoders below feed the token ids alone
        kind = "a classifier: export it with export_classifier_onnx" if is_classifier(graph) else \
            "only models of one input, the token ids, export as language models"
        raise ExportError(f"{graph.name} takes {len(graph.inputs)} inputs ({', '.join(spec_inputs(graph))}); {kind}")
    model = model.eval()
    layout = cache_layout(model)
    if fused_attention:
        layout = _fused_layout(model, layout, graph)
    batch, (seq, past) = 2, example_lengths(graph.context)
    ids = example_ids(graph, batch, seq)
    translation = {}
    if layout is None:
        wrapper, args = PlainDecoder(model), (ids,)
        input_names, output_names = ["input_ids"], ["logits"]
        dims = {"input_ids": {0: torch.export.Dim(BATCH), 1: torch.export.Dim(SEQUENCE)}}
    else:
        wrapper = CachedDecoder(model, layout)
        # a shared buffer is longer than what it holds; traced with a third length, it stays symbolic
        buffer = past + seq + 3 if layout.shared_buffer else past
        lengths = [buffer if layout.keeps(i) is None else min(past, layout.keeps(i)) for i in range(layout.layers)]
        past_kv = [torch.zeros(batch, layout.kv_heads[i], lengths[i], layout.head_dim[i])
                   for i in range(layout.layers) for _ in ("key", "value")]
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        args = (ids, mask, positions, *past_kv)
        input_names = ["input_ids", "attention_mask", "position_ids", *layout.input_names()]
        output_names = ["logits", *layout.output_names()]
        b, s, p = (torch.export.Dim(n) for n in (BATCH, SEQUENCE, MAX_LENGTH if layout.shared_buffer else PAST))
        # a bounded layer's past has a length of its own, at most what it keeps
        bounded = {keep: torch.export.Dim(bounded_past(keep), max=keep) for keep in set(layout.kept or ()) if keep}
        past_dims = [p if layout.keeps(i) is None else bounded[layout.keeps(i)] for i in range(layout.layers)]
        dims = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: torch.export.Dim.AUTO},
                "position_ids": {0: b, 1: s},
                "past_flat": tuple({0: b, 2: past_dims[i]} for i in range(layout.layers) for _ in ("key", "value"))}
        if layout.shared_buffer:
            from .onnx_fused_attention import onnx_translation
            translation = onnx_translation()
    _write(wrapper, args, input_names, output_names, dims, graph, path, opset, translation)
    _finish(Path(path), layout)
    return layout


def bounded_past(kept: int) -> str:
    """The dim name of a bounded layer's past: it never holds more than `kept` positions."""
    return f"{PAST}_up_to_{kept}"


def export_classifier_onnx(model: nn.Module, graph: ModelGraph, path: str | Path, opset: int = DEFAULT_OPSET) -> None:
    """Write classifier `model` (lowered from `graph`, in eval mode) to `path` as ONNX: input_ids and
    lengths in, logits [batch, classes] out, batch and sequence dynamic. Raises as export_onnx does."""
    check_before_tracing(graph, opset)
    if not is_classifier(graph):
        raise ExportError(f"{graph.name} is not a classifier: it takes ({', '.join(spec_inputs(graph))}), "
                          f"not (tokens, {LENGTHS_INPUT}), or its output is not [batch, classes]")
    batch, (seq, _) = 2, example_lengths(graph.context)
    ids = example_ids(graph, batch, seq)
    lengths = torch.tensor([seq, seq - 1])  # rows of different lengths, so no length is baked in
    b, s = torch.export.Dim(BATCH), torch.export.Dim(SEQUENCE)
    dims = {"input_ids": {0: b, 1: s}, "lengths": {0: b}}
    _write(TextClassifier(model.eval()), (ids, lengths), ["input_ids", "lengths"], ["logits"], dims, graph, path,
           opset)


def check_before_tracing(graph: ModelGraph, opset: int) -> None:
    """What can be refused before the (slow) exporter runs: ops it cannot export, an opset it does not write."""
    check_exportable(graph)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset}: torch's exporter writes opsets {MIN_OPSET} to {MAX_OPSET}")


def example_ids(graph: ModelGraph, batch: int, seq: int) -> torch.Tensor:
    """Token ids to trace with: seeded, within the vocabulary."""
    vocab = graph.hyper.get("vocab", 2)
    high = int(vocab) if isinstance(vocab, int) else 2
    return torch.randint(0, high, (batch, seq), generator=torch.Generator().manual_seed(0))


def _write(wrapper: nn.Module, args: tuple, input_names: list[str], output_names: list[str], dims: dict,
           graph: ModelGraph, path: str | Path, opset: int, translation: dict | None = None) -> None:
    """Trace `wrapper` on `args` with torch's exporter and save the ONNX model to `path`."""
    try:
        with _quiet_exporter(), _plain_attention():
            program = torch.onnx.export(wrapper, args, dynamo=True, verbose=False, opset_version=opset,
                                        input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dims, custom_translation_table=translation or None)
    except Exception as err:  # the exporter raises many kinds; all mean the same to the user
        raise ExportError(_export_failure(err, graph)) from None
    program.save(str(path), external_data=_needs_external_data(wrapper))


@contextlib.contextmanager
def _plain_attention():
    """Trace attention as MatMul/Softmax/MatMul. The exporter's own decomposition of
    scaled_dot_product_attention transposes K through Reshape-Transpose-Reshape, which onnxruntime
    cannot fold into the score MatMul: a copy of the whole K cache per layer and token. Written as
    q @ k^T, the Transpose fuses into the MatMul (FusedMatMul transB) and costs nothing."""
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return plain_attention(q, k, v, attn_mask, is_causal, scale, None, 0.0)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _needs_external_data(model: nn.Module) -> bool:
    # A protobuf file holds at most 2 GB; bigger models keep their weights in a .data file beside it.
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9


def _finish(path: Path, layout: CacheLayout | None) -> None:
    """What the exported file still needs, in one load and save of it (weights kept beside a large
    model's graph are neither read nor written): readable dim names and the logits_to_keep input."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if layout is not None:
        _name_dims(model, layout)
    add_logits_to_keep(model)
    onnx.save(model, str(path))


def _name_dims(model, layout: CacheLayout) -> None:
    """Give the exporter's symbolic dims readable names: the mask's length (the exporter calls it
    s53) everywhere it appears, and a bounded layer's present length its past's (the exporter writes
    it as a Max formula)."""
    old = next(v.type.tensor_type.shape.dim[1].dim_param for v in model.graph.input if v.name == "attention_mask")
    if old and old != TOTAL:
        for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == old:
                    dim.dim_param = TOTAL
    for value in model.graph.output:
        layer = int(value.name.split(".")[1]) if value.name.startswith("present.") else None
        if layer is not None and layout.keeps(layer) is not None:
            value.type.tensor_type.shape.dim[2].dim_param = bounded_past(layout.keeps(layer))


class _quiet_exporter:
    """torch.onnx prints progress lines and warnings about optional packages: keep the CLI's output readable."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                     "onnxscript"):
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.ERROR)
        import contextlib
        import io
        self._stdout = contextlib.redirect_stdout(io.StringIO())
        self._stdout.__enter__()
        return self

    def __exit__(self, *exc):
        self._stdout.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(*exc)
        return False


def _export_failure(err: Exception, graph: ModelGraph) -> str:
    """The exporter's complaint, located at the spec line of the op it names, where it names one."""
    text = _ANSI_ESCAPE.sub("", str(err))  # the exporter colours its messages for a terminal
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    nodes = {node_id: data for node_id, data in graph.nodes()}
    for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text):
        if name in nodes and nodes[name]["span"] is not None:
            data = nodes[name]
            return (f"{data['span']}: error: op '{data['op']}' could not be exported to ONNX: {first}")
    return f"the ONNX exporter failed: {first}"
