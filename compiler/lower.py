"""Lower a ModelGraph to a torch.fx GraphModule.

Each op contributes fx nodes through `Op.lower`; ops that own weights become submodules at
their hierarchical path (`block.3.attn`), so parameter names in the module are the graph's.
The result is an ordinary nn.Module with readable generated code (`print(model.code)`).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.fx as fx
from torch import nn

from .analysis import residual_params
from .build import OpCall
from .checkpointing import BLOCK_META
from .graph import ModelGraph
from .lora import NODE_ATTR as LORA_ATTR, adapter_fills, lora_parameter_names
from .registry import get_op
from .shapes import Sym
from .values import TensorRef


class _Lowering:
    def __init__(self, graph: ModelGraph):
        self.graph = graph
        self.root = nn.Module()
        self.fx = fx.Graph()
        self.values: dict[tuple[str, int], fx.Node] = {}
        self.placeholders: dict[str, fx.Node] = {}
        self.sym_sources: dict[str, tuple[str, int]] = {}  # symbol -> (input name, axis)
        self.sym_nodes: dict[str, fx.Node] = {}
        self.attention_count = 0
        self.cache: fx.Node | None = None

    def set_submodule(self, path: str, module: nn.Module) -> None:
        parent = self.root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)

    def symbol(self, name: str) -> fx.Node:
        if name not in self.sym_nodes:
            source, axis = self.sym_sources[name]
            self.sym_nodes[name] = self.fx.create_node("call_method", "size", (self.placeholders[source], axis),
                                                       name=name)
        return self.sym_nodes[name]

    def run(self) -> fx.GraphModule:
        g = self.graph
        for node_id in g.inputs:
            data = g.g.nodes[node_id]
            name = data["args"]["name"]
            self.placeholders[name] = self.values[(node_id, 0)] = self.fx.placeholder(name)
            shape = data["outputs"][0][0]
            for axis, d in enumerate(shape):
                if isinstance(d, Sym) and d.coef == 1 and len(d.factors) == 1:
                    self.sym_sources.setdefault(d.factors[0], (name, axis))
        self.cache = self.fx.placeholder("cache", default_value=None)
        for node_id, data in g.nodes():
            if data["op"] == "input":
                continue
            op = get_op(data["op"])
            last = self.fx._root.prev  # the newest fx node so far
            out = op.lower(LowerCall(self, node_id, data, OpCall(op, data["args"], g)))
            node = last.next
            while node is not self.fx._root:  # tag what this op emitted with its repeat iteration
                node.meta[BLOCK_META] = data["block"]
                node = node.next
            outs = out if isinstance(out, list) else [out]
            for i, o in enumerate(outs):
                self.values[(node_id, i)] = o
        results = [self.values[(ref.node, ref.index)] for _, ref in g.outputs]
        self.fx.output(results[0] if len(results) == 1 else tuple(results))
        return fx.GraphModule(self.root, self.fx, class_name=_class_name(g.name))


class LowerCall:
    """What an op's `lower` sees: its arguments as fx values and ways to emit nodes."""

    def __init__(self, lowering: _Lowering, node_id: str, data: dict, spec: OpCall):
        self._l = lowering
        self.node_id = node_id
        self.data = data
        self.spec = spec
        self._named = False

    def _value(self, v):
        if isinstance(v, TensorRef):
            return self._l.values[(v.node, v.index)]
        if isinstance(v, (list, tuple)):
            return type(v)(self._value(x) for x in v)
        return v

    def __getitem__(self, name):
        return self._value(self.data["args"][name])

    def _name(self) -> str | None:
        if self._named:
            return None
        self._named = True
        return self.node_id

    def module(self, module: nn.Module, *args, **kwargs) -> fx.Node:
        path = self.data["module"]
        if self.data.get(LORA_ATTR):  # LoRA adapters beside some of the op's matrices (compiler/lora.py)
            from .torch_modules import with_adapters
            module = with_adapters(module, self.data[LORA_ATTR])
        self._l.set_submodule(path, module)
        return self._l.fx.create_node("call_module", path, args, kwargs, name=self._name())

    def function(self, fn, *args, **kwargs) -> fx.Node:
        return self._l.fx.create_node("call_function", fn, args, kwargs, name=self._name())

    def method(self, method: str, *args, **kwargs) -> fx.Node:
        return self._l.fx.create_node("call_method", method, args, kwargs, name=self._name())

    def placeholder(self, name: str) -> fx.Node:
        return self._l.placeholders[name]

    @property
    def cache(self) -> fx.Node:
        return self._l.cache

    def dim(self, d):
        """A dim as the model computes it at run time: an int, or a product of input sizes."""
        if not isinstance(d, Sym):
            return d
        value = None
        for f in d.factors:
            node = self._l.symbol(f)
            value = node if value is None else self._l.fx.create_node("call_function", _mul, (value, node))
        if d.coef != 1:
            value = self._l.fx.create_node("call_function", _mul, (value, d.coef))
        return value

    def tied(self, local: str) -> nn.Parameter | None:
        param = self._l.graph.params.get(f"{self.data['module']}.{local}")
        if param is None or param.tied_to is None:
            return None
        return self._l.root.get_parameter(param.tied_to)

    def attention_index(self) -> int:
        self._l.attention_count += 1
        return self._l.attention_count - 1


def _mul(a, b):
    return a * b


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_")) or "Model"


def initial_fills(graph: ModelGraph, seed: int = 0) -> Iterator[tuple[str, tuple, Callable[[torch.Tensor], None]]]:
    """(name, shape, fill) for each parameter with a value of its own, in the order the seed's random
    stream draws them: `fill(t)` sets a float32 tensor of that shape to its initial value in place,
    and must be called in this order. GPT-2 initialisation as each op declares it, residual
    projections at 0.02/sqrt(#residual), then LoRA adapters (their own stream, so the base weights'
    draws do not depend on them). A tied parameter has no value of its own: it is its owner's."""
    gen = torch.Generator().manual_seed(seed)
    residual = residual_params(graph)
    scale = 1.0 / math.sqrt(len(residual)) if residual else 1.0
    adapters = set(lora_parameter_names(graph))
    for name, p in graph.params.items():
        if p.tied_to is not None or name in adapters:
            continue
        node = graph.g.nodes[p.node]
        kind, std = get_op(node["op"]).init(name[len(node["module"]) + 1:], node["args"])
        if kind == "zeros":
            yield name, p.shape, torch.Tensor.zero_
        elif kind == "fill":
            yield name, p.shape, lambda t, value=float(std): t.fill_(value)
        else:
            std = std * (scale if name in residual else 1.0)
            yield name, p.shape, lambda t, std=std: t.normal_(0.0, std, generator=gen)
    yield from adapter_fills(graph, seed)


def initial_weights(graph: ModelGraph, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter's initial value, whole and on the CPU, one at a time (initial_fills' order).
    Every process that walks the stream gets the same weights whatever part of them it keeps: one
    process, a data-parallel replica, an FSDP or tensor-parallel shard, a pipeline stage."""
    for name, shape, fill in initial_fills(graph, seed):
        value = torch.empty(shape)
        fill(value)
        yield name, value


def initialize(model: nn.Module, graph: ModelGraph, seed: int = 0) -> None:
    """Set every parameter of a model on one device to its initial value: drawn in place on the CPU,
    else drawn on the CPU (where the stream is) and copied over, one parameter at a time."""
    with torch.no_grad():
        for name, shape, fill in initial_fills(graph, seed):
            p = model.get_parameter(name)
            if p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous():
                fill(p)
            else:
                value = torch.empty(shape)
                fill(value)
                p.copy_(value)


@contextlib.contextmanager
def _constructors_not_initialising():
    """Module constructors fill their new weights (kaiming, normal, ones): on `meta` the values are
    never kept, and the first such op on `meta` costs over a second of imports (its kernels are
    written in Python). The weights get their values from initial_fills instead."""
    from torch.nn import init
    names = [n for n in vars(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for name in names:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def build(graph: ModelGraph) -> fx.GraphModule:
    """The model with its parameters on the `meta` device: shapes and names, no storage. Small
    constant buffers (rotary frequencies) are real, on the CPU. Parallel training shards or cuts this
    and materialises only its own part (runtime/distributed/materialise.py); `lower` materialises it whole."""
    with torch.device("meta"), _constructors_not_initialising():
        model = _Lowering(graph).run()
    model.context = graph.context
    model.supports_kv_cache = all(get_op(d["op"]).cache_safe for _, d in graph.nodes())
    model.output_names = [name for name, _ in graph.outputs]
    return model


def to_empty(model: nn.Module, device, buffer_device=None) -> nn.Module:
    """Give a model built on `meta` uninitialised storage on `device` (its buffers on
    `buffer_device`, default the same), keeping the values of the buffers that were built real."""
    buffers = {name: b for name, b in model.named_buffers() if not b.is_meta}
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    if any(type(p) is not nn.Parameter for p in model.parameters()):  # DTensors (FSDP, TP): theirs
        model.to_empty(device=device)
    else:  # torch.empty, not to_empty's empty_like, whose meta kernel is Python that imports sympy
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                            requires_grad=p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None and b.is_meta:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    # moving off `meta` gives each module a new Parameter: tie the aliases to one again
    for first, *others in (names for names in aliases.values() if len(names) > 1):
        for name in others:
            *parents, leaf = name.split(".")
            model.get_submodule(".".join(parents))._parameters[leaf] = model.get_parameter(first)
    buffer_device = torch.device(buffer_device or device)
    with torch.no_grad():
        for name, value in buffers.items():
            *parents, leaf = name.split(".")
            owner = model.get_submodule(".".join(parents))
            owner._buffers[leaf] = value.to(buffer_device)
    return model


def lower(graph: ModelGraph, seed: int | None = 0, device=None) -> fx.GraphModule:
    """The model as an nn.Module: `model(tokens, cache=None) -> logits`, on `device` (default the
    CPU), initialised from `seed`; seed None leaves the weights uninitialised, for a caller that
    loads them. No other copy of the weights is made on the way: it is built on `meta`."""
    model = to_empty(build(graph), device or "cpu")
    if seed is not None:
        initialize(model, graph, seed)
    return model
