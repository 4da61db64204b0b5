"""Warnings: a spec that builds but says something its author probably did not mean.

Name checks read the syntax tree of the checked file (so they hold whatever a build reached);
dead nodes come from the built graph. Codes are in dsl/codes.py (W1xx).
"""
from __future__ import annotations

import dataclasses
import math
import os

from lmspec.dsl import ast
from lmspec.dsl.diagnostics import Diagnostic

from .build import BlockDef
from .graph import ModelGraph
from .shapes import fmt_shape

HUGE_MODEL_BYTES = 100e12  # fp32 weights alone beyond this: a typo in a size, not a model anyone trains


def lint(program, built: list[tuple[ast.Model, ModelGraph, bool]]) -> list[Diagnostic]:
    """Warnings for the main file of `program`; `built` holds each model, its graph, and whether
    it built without errors (dead nodes are only meaningful in a complete graph)."""
    module = program.main
    found: list[Diagnostic] = []
    for model, graph, complete in built:
        found += _unused_hyper_parameters(model, graph)
        found += _rebound_hyper_parameters(model, graph)
        if complete:
            found += _dead_nodes(graph)
            found += _huge_model(model, graph)
    found += _shadowing(module)
    if module.models:
        found += _unused_blocks_and_uses(module, program.namespace)
    unique, seen = [], set()
    for d in found:
        if (d.code, d.span, d.message) not in seen:
            seen.add((d.code, d.span, d.message))
            unique.append(d)
    return unique


def _warning(code: str, message: str, span) -> Diagnostic:
    return Diagnostic(message, span, code=code, severity="warning")


def _head(span: ast.Span, width: int) -> ast.Span:
    """The first `width` characters of a span: a whole block would underline many lines."""
    return ast.Span(span.file, span.line, span.column, span.line, span.column + width)


# ---- walking the syntax tree ------------------------------------------------------------------

_NODE_FIELDS: dict[type, tuple[str, ...]] = {}  # per syntax-tree class, the fields that may hold nodes


def _children(node):
    names = _NODE_FIELDS.get(type(node))
    if names is None:
        names = _NODE_FIELDS[type(node)] = tuple(f.name for f in dataclasses.fields(node)
                                                 if not f.name.endswith("span"))
    for name in names:
        value = getattr(node, name)
        for item in value if type(value) is list else (value,):
            if hasattr(item, "__dataclass_fields__"):
                yield item


def _walk(node):
    """Every node under `node`, itself first; with a stack, not nested generators, whose cost
    grows with the depth of each node."""
    todo = [node]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(reversed(list(_children(node))))


def _reads(nodes) -> set[str]:
    """Every name read anywhere under `nodes`: assignment targets are writes, outputs read their name."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, ast.Assign):
            visit(node.value)
            return
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Output):
            names.add(node.name)
        for child in _children(node):
            visit(child)

    for n in nodes:
        visit(n)
    return names


def _calls(nodes) -> set[str]:
    return {n.func for top in nodes for n in _walk(top) if isinstance(n, ast.Call)}


def _statements(body):
    """Every statement of a body, those in repeat bodies included."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.Repeat):
            yield from _statements(stmt.body)


def _model_assignments(body, top_level=True):
    """(target, top_level) for every assignment in a model body, repeat bodies included, in order."""
    for stmt in body:
        if isinstance(stmt, ast.Assign):
            for t in stmt.targets:
                yield t, top_level
        elif isinstance(stmt, ast.Repeat):
            yield from _model_assignments(stmt.body, False)


# ---- the checks -------------------------------------------------------------------------------

def _hyper_definitions(model: ast.Model, graph: ModelGraph) -> dict[str, ast.Name]:
    first: dict[str, ast.Name] = {}
    for target, top in _model_assignments(model.body):
        if top and target.id in graph.hyper:
            first.setdefault(target.id, target)
    return first


def _unused_hyper_parameters(model: ast.Model, graph: ModelGraph) -> list[Diagnostic]:
    read = _reads(model.body)
    return [_warning("W101", f"hyper-parameter '{name}' is never used", target.span)
            for name, target in _hyper_definitions(model, graph).items() if name not in read]


def _rebound_hyper_parameters(model: ast.Model, graph: ModelGraph) -> list[Diagnostic]:
    first = _hyper_definitions(model, graph)
    found = []
    for target, _ in _model_assignments(model.body):
        if target.id in first and target is not first[target.id]:
            line = first[target.id].span.line
            found.append(_warning(
                "W103", f"hyper-parameter '{target.id}' (line {line}) is assigned again; "
                        f"`lmspec info` and `--set` see only the first value", target.span))
    return found


def _shadowing(module: ast.Module) -> list[Diagnostic]:
    """Names bound again where the new value hides the old one by mistake: a dim symbol of an
    input (`seq = 128` after `input tokens: i64[batch, seq]`: later shapes would mix the two), or
    one name twice in a single unpacking (`q, q = split(…)`: the first value is lost)."""
    found = []
    for model in module.models:
        symbols: dict[str, ast.Span] = {}
        for stmt in model.body:
            if isinstance(stmt, ast.Input):
                for d in stmt.type.dims:
                    d = d.dim if isinstance(d, ast.BoundedDim) else d
                    if isinstance(d, ast.Name):
                        symbols.setdefault(d.id, d.span)
        for target, _ in _model_assignments(model.body):
            if target.id in symbols and (target.span.line, target.span.column) > (symbols[target.id].line,
                                                                                  symbols[target.id].column):
                found.append(_warning("W103", f"'{target.id}' hides the dim '{target.id}' of an input "
                                              f"(line {symbols[target.id].line})", target.span))
    for body in [m.body for m in module.models] + [b.body for b in module.blocks]:
        for node in _statements(body):  # assignments are statements: no need to walk expressions
            if isinstance(node, ast.Assign):
                seen: set[str] = set()
                for target in node.targets:
                    if target.id in seen:
                        found.append(_warning("W103", f"'{target.id}' is bound twice in one assignment; "
                                                      f"the first value is lost", target.span))
                    seen.add(target.id)
    return found


def _unused_blocks_and_uses(module: ast.Module, namespace: dict[str, BlockDef]) -> list[Diagnostic]:
    reached: set[int] = set()  # ids of the ast.Blocks a model can call, through any file

    todo = [(module.models, namespace)]  # a worklist, not recursion: 2,000 blocks may call each other in a chain
    while todo:
        nodes, names = todo.pop()
        for func in _calls(nodes):
            bdef = names.get(func)
            if bdef is not None and id(bdef.block) not in reached:
                reached.add(id(bdef.block))
                todo.append(([bdef.block], bdef.namespace))
    found = []
    for block in module.blocks:
        if id(block) not in reached:
            found.append(_warning("W102", f"block '{block.name}' is never called by a model",
                                  _head(block.span, len("block ") + len(block.name))))
    direct = _calls(module.models) | _calls([b for b in module.blocks if id(b) in reached])
    for use in module.uses:
        from_use = {name for name, bdef in namespace.items() if bdef.block.span.file != module.file
                    and _same_file(bdef.block.span.file, use)}
        if from_use and not from_use & direct:
            found.append(_warning("W105", f"nothing from \"{use.path}\" is used", use.span))
    return found


def _same_file(block_file: str, use: ast.Use) -> bool:
    target = os.path.normpath(os.path.join(os.path.dirname(use.span.file), use.path))
    return os.path.normpath(block_file) == target


def _dead_nodes(graph: ModelGraph) -> list[Diagnostic]:
    g = graph.g
    alive: set[str] = set()
    todo = [ref.node for _, ref in graph.outputs]
    while todo:
        node = todo.pop()
        if node not in alive:
            alive.add(node)
            todo.extend(g.predecessors(node))
    params_of: dict[str, int] = {}
    for p in graph.owned_params():
        if all(isinstance(d, int) for d in p.shape):
            params_of[p.node] = params_of.get(p.node, 0) + math.prod(p.shape)
    # Each dead node's parameters count once, for the first sink it feeds: one walk over the dead
    # part of the graph in all (a walk per sink made 10,000 dead linears quadratic).
    counted: set[str] = set()
    by_span: dict = {}  # the same line in every layer of a repeat is one warning
    for sink in (n for n in g.nodes if n not in alive and g.out_degree(n) == 0):
        data = g.nodes[sink]
        params, todo = 0, [sink]
        while todo:
            node = todo.pop()
            if node not in counted:
                counted.add(node)
                params += params_of.get(node, 0)
                todo.extend(n for n in g.predecessors(node) if n not in alive)
        entry = by_span.setdefault(data["span"], [data, 0])
        entry[1] += params
    found = []
    for span, (data, params) in by_span.items():
        if data["op"] == "input":
            message = f"input '{data['label']}' is never used"
        else:
            label = f" '{data['label']}'" if data["label"] != data["op"] else ""
            message = f"{data['op']}{label} never reaches an output"
            if params:
                message += f"; its {params:,} parameters would never be trained"
        found.append(_warning("W104", message, span))
    return found


def _huge_model(model: ast.Model, graph: ModelGraph) -> list[Diagnostic]:
    """A model whose fp32 weights alone pass HUGE_MODEL_BYTES, located at its largest parameter."""
    sized = [(math.prod(p.shape), p) for p in graph.owned_params() if all(isinstance(d, int) for d in p.shape)]
    total = sum(n for n, _ in sized)
    if 4 * total <= HUGE_MODEL_BYTES:
        return []
    _, largest = max(sized, key=lambda item: item[0])
    return [_warning("W106", f"model '{model.name}' has {total:,} parameters, {4 * total / 1e12:,.0f} TB of fp32 "
                             f"weights alone (more than {HUGE_MODEL_BYTES / 1e12:.0f} TB); the largest is "
                             f"'{largest.name}' {fmt_shape(largest.shape)}", graph.g.nodes[largest.node]["span"])]
