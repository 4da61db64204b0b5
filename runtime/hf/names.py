"""The name plan: which Hugging Face tensors, cut or transposed how, make each parameter of a spec."""
from __future__ import annotations

import re
from dataclasses import dataclass

from lmspec.runtime.errors import HFError
from lmspec.runtime.hf.expressions import evaluate
from lmspec.runtime.hf.families import Cat, Family, Stack, T
from lmspec.runtime.hf.shipped import shipped_families


@dataclass(frozen=True)
class Piece:
    """One HF tensor: its name, its shape in the HF file, where it sits in the lmspec tensor."""
    hf: str
    shape: tuple[int, ...]
    index: tuple = ()
    transpose: bool = False


@dataclass
class Planned:
    """One lmspec parameter and the HF pieces it is made of."""
    name: str
    shape: tuple[int, ...]
    source: object
    layer: str | None
    pieces: list[Piece]


def _fmt(template: str, i: str | None, j: int | None = None) -> str:
    if i is not None:
        template = template.replace("{i}", i)
    if j is not None:
        template = template.replace("{j}", str(j))
    return template


def _sizes(cat: Cat, total: int, names: dict, param: str) -> list[int]:
    if cat.parts is None:
        weights = [1] * len(cat.names)
    else:
        try:
            weights = [evaluate(p, names) for p in cat.parts]
        except KeyError as err:
            raise HFError(f"cannot split {param}: the spec has no hyper-parameter {err.args[0]}") from None
    whole = sum(weights)
    if whole <= 0 or any(total * w % whole for w in weights):
        raise HFError(f"cannot split {param} of {total} rows in the proportions {cat.parts or weights}")
    return [total * w // whole for w in weights]


def pieces_of(source, shape: tuple[int, ...], layer: str | None, names: dict, param: str,
              fused: bool = False) -> list[Piece]:
    if isinstance(source, str):
        return [Piece(_fmt(source, layer), shape)]
    if isinstance(source, T):
        if len(shape) != 2:
            raise HFError(f"{param}: a transposed parameter must be a matrix, the spec's is {list(shape)}")
        return [Piece(_fmt(source.name, layer), (shape[1], shape[0]), (), True)]
    if isinstance(source, Cat):
        out, start = [], 0
        for name, size in zip(source.names, _sizes(source, shape[0], names, param)):
            out.append(Piece(_fmt(name, layer), (size, *shape[1:]), (slice(start, start + size),)))
            start += size
        return out
    if isinstance(source, Stack):
        if fused:
            return [Piece(_fmt(source.fused, layer), shape)]
        out = []
        for j in range(shape[0]):
            for p in pieces_of(source.inner, shape[1:], layer, names, param):
                out.append(Piece(_fmt(p.hf, None, j), p.shape, (j, *p.index), p.transpose))
        return out
    raise TypeError(f"unknown table entry {source!r}")


def _row_patterns(family: Family):
    return [(re.compile("^" + re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), source)
            for name, source in family.params]


def match_params(family: Family, graph) -> list[tuple[str, object, object, str | None]]:
    """(name, param, table source, layer) for every parameter of the spec that the table holds;
    HFError for an owned parameter the table does not know (the spec is of another family)."""
    rows = _row_patterns(family)
    found = []
    for name, param in graph.params.items():
        match = next(((m, src) for pattern, src in rows if (m := pattern.match(name))), None)
        if match is None:
            if param.tied_to is not None:
                continue
            raise HFError(f"the spec's parameter {name} has no Hugging Face counterpart in the "
                          f"{family.name} map: is {graph.file} a {family.name} model?")
        found.append((name, param, match[1], match[0].groupdict().get("i")))
    return found


def tensor_map(family: Family, graph) -> tuple[list[Planned], list[Planned]]:
    """(the owned parameters, the tied ones) of the spec, each matched to its table row."""
    names = {k: v for k, v in graph.hyper.items() if isinstance(v, (int, float))}
    if "heads" in names:
        names.setdefault("kv_heads", names["heads"])
    owned, tied = [], []
    for name, param, source, layer in match_params(family, graph):
        shape = tuple(param.shape)
        if not all(isinstance(d, int) for d in shape):
            raise HFError(f"the spec's parameter {name} has a symbolic shape {list(shape)}")
        entry = Planned(name, shape, source, layer, pieces_of(source, shape, layer, names, name))
        (tied if param.tied_to is not None else owned).append(entry)
    return owned, tied


def infer_family(graph) -> tuple[Family, str]:
    """The family, and the model_type, of a spec that was not imported. Of the families whose map
    holds every parameter the spec owns, the one with a template that builds the same graph from the
    spec's hyper-parameters (so a Gemma or OLMo spec, whose parameters a Llama map also holds, is
    written as what it is); else the first whose map reads every hyper-parameter of the spec; else
    the first that holds the parameters."""
    fitting = []
    for family in shipped_families().values():
        try:
            owned, _ = tensor_map(family, graph)
        except HFError:
            continue
        if owned:
            fitting.append(family)
    for family in fitting:
        model_type = _template_model_type(graph, family)
        if model_type is not None:
            return family, model_type
    for family in fitting:
        if set(graph.hyper) <= {h.name for h in family.hyper}:
            return family, family.model_types[0]
    if fitting:
        return fitting[0], fitting[0].model_types[0]
    raise HFError(f"the parameters of model {graph.name} match no Hugging Face family's table "
                  f"({', '.join(shipped_families())}); name one with --model-type")


def _template_model_type(graph, family: Family) -> str | None:
    """The model_type of the family's first template that, filled with the spec's hyper-parameters,
    builds the spec's graph op for op; None when none does."""
    from lmspec.compiler import load_spec
    from lmspec.dsl.diagnostics import SpecError
    from lmspec.runtime.hf.config import op_args_of_graph
    from lmspec.runtime.hf.families import fill_template

    # a hyper-parameter the spec does not name takes the map's constant default (Mistral's spec has no `tied`)
    defaults = {h.name: h.default for h in family.hyper if h.default is not None and not isinstance(h.default, str)}
    values = {**defaults, **graph.hyper, **op_args_of_graph(family, graph), "name": "template", "source": "template"}
    for key, template in family.templates.items():
        text, missing = fill_template(template, values)
        if missing:
            continue
        try:
            built = load_spec("template.arch", sources={"template.arch": text})
        except SpecError:
            continue
        if _ops(built) == _ops(graph):
            first = key.split("/")[0]
            return first if first in family.model_types else family.model_types[0]
    return None


def _ops(graph) -> list[tuple]:
    """Every op of the graph in order with its arguments, tensors as their shapes: what a model computes."""
    return [(data["op"], tuple(sorted((k, getattr(v, "shape", v)) for k, v in data["args"].items() if k != "name")))
            for _, data in graph.nodes()]
