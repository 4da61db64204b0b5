"""Lower a ModelGraph to a torch.fx GraphModule.

Each op contributes fx nodes through `Op.lower`; ops that own weights become submodules at
their hierarchical path (`block.3.attn`), so parameter names in the module are the graph's.
The result is an ordinary nn.Module with readable generated code (`print(model.code)`).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from .analysis import residual_params
from .build import OpCall
from .checkpointing import BLOCK_META
from .graph import ModelGraph
from .lora import NODE_ATTR as LORA_ATTR, init_adapters, lora_parameter_names
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


def initialize(model: nn.Module, graph: ModelGraph, seed: int = 0) -> None:
    """GPT-2 initialisation as each op declares it; residual projections get 0.02/sqrt(#residual)."""
    gen = torch.Generator().manual_seed(seed)
    residual = residual_params(graph)
    scale = 1.0 / math.sqrt(len(residual)) if residual else 1.0
    adapters = set(lora_parameter_names(graph))
    with torch.no_grad():
        for name, p in graph.params.items():
            if p.tied_to is not None or name in adapters:
                continue
            node = graph.g.nodes[p.node]
            kind, std = get_op(node["op"]).init(name[len(node["module"]) + 1:], node["args"])
            tensor = model.get_parameter(name)
            if kind == "zeros":
                tensor.zero_()
            elif kind == "fill":
                tensor.fill_(std)
            else:
                tensor.normal_(0.0, std * (scale if name in residual else 1.0), generator=gen)
    init_adapters(model, graph, seed)


def lower(graph: ModelGraph, seed: int = 0) -> fx.GraphModule:
    """The model as an nn.Module: `model(tokens, cache=None) -> logits`, initialised from `seed`."""
    model = _Lowering(graph).run()
    initialize(model, graph, seed)
    model.context = graph.context
    model.supports_kv_cache = all(get_op(d["op"]).cache_safe for _, d in graph.nodes())
    model.output_names = [name for name, _ in graph.outputs]
    return model
