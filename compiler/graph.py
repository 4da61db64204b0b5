"""The model graph: ops as networkx nodes with symbolic shapes, parameters by stable name."""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from .values import TensorRef


@dataclass
class Param:
    name: str  # full, hierarchical: block.3.attn.qkv.weight
    shape: tuple
    node: str
    tied_to: str | None = None  # full name of the parameter this one shares storage with


@dataclass
class ModelGraph:
    name: str
    file: str
    g: nx.MultiDiGraph = field(default_factory=nx.MultiDiGraph)
    inputs: list[str] = field(default_factory=list)
    outputs: list[tuple[str, TensorRef]] = field(default_factory=list)
    hyper: dict[str, object] = field(default_factory=dict)  # named constants at the model's top level
    bounds: dict[str, int] = field(default_factory=dict)  # symbol -> its upper bound (seq <= context)
    params: dict[str, Param] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # every file the model was built from
    _by_node: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _indexed: int = field(default=-1, init=False, repr=False, compare=False)  # len(params) when indexed

    def add_node(self, node_id: str, op: str, args: dict, outputs: list, span, module: str | None,
                 label: str, block: str | None) -> None:
        self.g.add_node(node_id, op=op, args=args, outputs=outputs, span=span, module=module,
                        label=label, block=block)
        for i, (arg, value) in enumerate(args.items()):
            for ref in _tensor_refs(value):
                self.g.add_edge(ref.node, node_id, key=f"{arg}:{i}", arg=arg, index=ref.index)

    def nodes(self):
        """Nodes in the order they were built, which is a topological order."""
        return self.g.nodes(data=True)

    @property
    def context(self) -> int | None:
        """The longest sequence the model accepts: the bound of the first input's bounded dim."""
        return next(iter(self.bounds.values()), None)

    def node_params(self, node_id: str) -> dict[str, tuple]:
        """The parameters op `node_id` holds, by their names inside its module ("weight"), with their
        shapes; from an index by node, rebuilt when parameters were added, so that a pass over every
        node is linear in the graph, not in nodes x parameters."""
        if self._indexed != len(self.params):
            self._by_node = {}
            for p in self.params.values():
                self._by_node.setdefault(p.node, []).append(p)
            self._indexed = len(self.params)
        module = self.g.nodes[node_id]["module"]
        prefix = module + "." if module else ""
        return {p.name[len(prefix):]: p.shape for p in self._by_node.get(node_id, ())}

    def owned_params(self) -> list[Param]:
        """Parameters with their own storage (tied ones counted once)."""
        return [p for p in self.params.values() if p.tied_to is None]


def _tensor_refs(value):
    if isinstance(value, TensorRef):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensor_refs(v)
