"""Evaluate a parsed model into a ModelGraph, checking every shape on the way.

Evaluation is a small interpreter over the syntax tree: hyper-parameters are Python numbers,
symbolic dims are `Sym`s, and tensor expressions add op nodes to the graph. A mistake becomes
a diagnostic and the offending value becomes POISON, so evaluation goes on and one run reports
every independent error in a file. A mistake inside a block carries notes naming the calls that
led there (innermost first), as a compiler names the instantiations of a template.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import sys
from dataclasses import dataclass, field

from lmspec.dsl import ast
from lmspec.dsl.diagnostics import Diagnostic, Note
from lmspec.dsl.parser import INT64_MAX

from . import shapes
from .graph import ModelGraph
from .registry import REQUIRED, Arg, Op, OpError, all_ops, get_op
from .scalars import BEYOND_FLOAT64, SCALAR_FUNCS, ScalarError, representable, scalar_binop, too_large
from .shapes import Sym, fmt_shape, is_dim
from .values import POISON, FuncRef, TensorRef, describe

DTYPES = {"f16", "bf16", "f32", "f64", "i32", "i64", "bool"}
MAX_REPEAT = 10_000  # far beyond any real model; stops a typo from building a graph for minutes
MAX_CALL_DEPTH = 100  # blocks calling blocks: real models nest a handful deep
# Python frames the evaluation may need: each block level costs a few, each level of an expression
# (at most dsl.parser.MAX_DEPTH) two, so 100 levels of calls of the deepest expressions fit.
RECURSION_LIMIT = 60_000
SUGGESTION_BUDGET = 250_000  # names compared for "did you mean": bounded, so 50,000 typos stay linear


_UNBOUND = object()  # a name not bound in a frame (None is a value a name can have)


@dataclass
class Frame:
    env: dict
    namespace: dict[str, "BlockDef"]
    scope: list[str]
    kind: str  # model | block
    top_level: bool = True


@dataclass
class BlockDef:
    block: ast.Block
    namespace: dict[str, "BlockDef"] = field(default_factory=dict)


@dataclass
class OpCall:
    """What an op's shape rule sees: its bound arguments and the graph built so far."""
    op: Op
    args: dict
    graph: ModelGraph

    def __getitem__(self, name):
        return self.args[name]

    def shape(self, name) -> tuple:
        return self.args[name].shape

    def dtype(self, name) -> str:
        return self.args[name].dtype

    def bound(self, dim) -> int | None:
        """The largest value a dim can take, when it is known."""
        if isinstance(dim, int):
            return dim
        if isinstance(dim, Sym) and len(dim.factors) == 1 and dim.factors[0] in self.graph.bounds:
            return dim.coef * self.graph.bounds[dim.factors[0]]
        return None

    def node_params(self, ref: TensorRef) -> dict[str, tuple]:
        if self.graph.g.nodes[ref.node]["module"] is None:
            return {}
        return self.graph.node_params(ref.node)

    def node_module(self, ref: TensorRef) -> str | None:
        return self.graph.g.nodes[ref.node]["module"]


class Builder:
    def __init__(self, graph: ModelGraph, overrides: dict[str, object]):
        self.graph = graph
        self.overrides = dict(overrides)
        self.used_overrides: set[str] = set()
        self.diagnostics: list[Diagnostic] = []
        self._seen: set[tuple] = set()
        self._names_in_scope: dict[tuple, set[str]] = {}
        self._node_ids: dict[str, int] = {}
        self._calls: list[tuple[ast.Block, ast.Call]] = []  # the block calls being evaluated, outermost first
        self._module_counts: dict[tuple, int] = {}  # next suffix to try for a default module name
        self._outputs: dict[str, ast.Span] = {}
        self._suggestions_left = SUGGESTION_BUDGET
        self._repeat_scope: str | None = None
        self._layers_built = 0  # repeat iterations so far, nested ones included: bounded by MAX_REPEAT

    # ---- diagnostics ------------------------------------------------------------------------
    def error(self, message: str, span, code: str) -> None:
        """Report once per message and place; inside a block, with a note for each call that led there."""
        key = (message, span)
        if key not in self._seen:
            self._seen.add(key)
            notes = [Note(f"in block '{block.name}', called from here", call.span)
                     for block, call in reversed(self._calls)]
            self.diagnostics.append(Diagnostic(message, span, code=code, notes=notes))

    def suggest(self, name: str, candidates) -> str:
        """"; did you mean 'x'?" for the closest of `candidates` (a callable giving them, built only
        when needed), until SUGGESTION_BUDGET names have been compared in this build."""
        if self._suggestions_left <= 0:
            return ""
        candidates = list(candidates())
        self._suggestions_left -= len(candidates)
        return _suggest(name, candidates)

    # ---- model ------------------------------------------------------------------------------
    def build_model(self, model: ast.Model, namespace: dict[str, BlockDef]) -> None:
        frame = Frame(env={}, namespace=namespace, scope=[], kind="model")
        with _recursion_limit(RECURSION_LIMIT):
            self.exec_body(model.body, frame)
        for name in sorted(set(self.overrides) - self.used_overrides):
            known = ", ".join(k for k, v in self.graph.hyper.items()) or "none"
            self.error(f"--set {name}: the model has no hyper-parameter '{name}' (known: {known})", model.span, "E106")
        if not self.graph.outputs and not self.diagnostics:
            self.error(f"model '{model.name}' declares no output", model.span, "E110")

    # ---- statements -------------------------------------------------------------------------
    def exec_body(self, stmts: list, frame: Frame):
        for stmt in stmts:
            if isinstance(stmt, ast.Assign):
                self.exec_assign(stmt, frame)
            elif isinstance(stmt, ast.Input):
                self.exec_input(stmt, frame)
            elif isinstance(stmt, ast.Output):
                self.exec_output(stmt, frame)
            elif isinstance(stmt, ast.Repeat):
                self.exec_repeat(stmt, frame)
            elif isinstance(stmt, ast.Return):
                if frame.kind != "block":
                    self.error("'return' outside a block", stmt.span, "E111")
                    continue
                return self.eval(stmt.value, frame)
        return None

    def exec_assign(self, stmt: ast.Assign, frame: Frame) -> None:
        name_hint = stmt.targets[0].id if len(stmt.targets) == 1 else None
        value = self.eval(stmt.value, frame, label=name_hint)
        if len(stmt.targets) == 1:
            target = stmt.targets[0].id
            if frame.kind == "model" and frame.top_level and (_is_scalar(value) or _is_per_layer(value)):
                if target in self.overrides and target not in self.graph.hyper:
                    value = self._override(target, value, stmt.targets[0].span)
                self.graph.hyper.setdefault(target, value)
            frame.env[target] = value
            return
        if value is POISON:
            for t in stmt.targets:
                frame.env[t.id] = POISON
            return
        if not isinstance(value, tuple) or len(value) != len(stmt.targets):
            got = f"{len(value)} values" if isinstance(value, tuple) else describe(value)
            self.error(f"cannot unpack {got} into {len(stmt.targets)} names", stmt.span, "E201")
            for t in stmt.targets:
                frame.env[t.id] = POISON
            return
        for t, v in zip(stmt.targets, value):
            frame.env[t.id] = v

    def _override(self, name: str, default, span):
        self.used_overrides.add(name)
        value = self.overrides[name]
        if isinstance(default, list) or isinstance(value, list):
            if not (isinstance(default, list) and _is_per_layer(value)):
                self.error(f"--set {name}={value}: expected {'a list' if isinstance(default, list) else 'no list'} "
                           f"like the spec's {describe(default)}", span, "E106")
                return default
            return value
        if isinstance(default, bool) != isinstance(value, bool) or (
                isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float)):
            self.error(f"--set {name}={value}: expected {type(default).__name__} like the spec's "
                       f"{describe(default)}", span, "E106")
            return default
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        if not representable(value):
            self.error(f"--set {name}={value}: {too_large(value)}", span, "E204")
            return default
        return value

    def exec_input(self, stmt: ast.Input, frame: Frame) -> None:
        if frame.kind != "model" or not frame.top_level:
            self.error("'input' is only allowed at the top level of a model", stmt.span, "E111")
            return
        ref = self._input(stmt, frame)
        frame.env[stmt.name] = POISON if ref is None else ref  # a bad input: its users stay quiet

    def _input(self, stmt: ast.Input, frame: Frame) -> TensorRef | None:
        t = stmt.type
        dtype = t.dtype or "f32"
        dims = []
        for d in t.dims:
            if isinstance(d, ast.StarDim):
                self.error("'*' is not allowed in an input shape", d.span, "E202")
                return None
            bound = None
            if isinstance(d, ast.BoundedDim):
                bound = self.eval(d.bound, frame)
                if bound is POISON:
                    return None
                if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
                    self.error(f"a dim bound must be a positive int, got {describe(bound)}", d.bound.span, "E202")
                    return None
                d = d.dim
            if isinstance(d, ast.Name) and d.id not in frame.env:
                sym = Sym(d.id)
                frame.env[d.id] = sym
                if bound is not None:
                    self.graph.bounds[d.id] = bound
                dims.append(sym)
                continue
            value = self.eval(d, frame)
            if value is POISON:
                return None
            if isinstance(value, Sym) and bound is not None and len(value.factors) == 1:
                self.graph.bounds.setdefault(value.factors[0], bound)
            if not is_dim(value):
                self.error(f"a dim must be an int or a symbol, got {describe(value)}", d.span, "E202")
                return None
            if isinstance(value, int) and bound is not None and value > bound:
                self.error(f"dim {value} exceeds its bound {bound}", d.span, "E203")
                return None
            dims.append(value)
        if not self.check_size(f"input '{stmt.name}'", tuple(dims), t.span):
            return None
        ref = self.add_node("input", {"name": stmt.name}, [(tuple(dims), dtype)], stmt.span, frame,
                            label=stmt.name)[0]
        self.graph.inputs.append(ref.node)
        return ref

    def exec_output(self, stmt: ast.Output, frame: Frame) -> None:
        if frame.kind != "model" or not frame.top_level:
            self.error("'output' is only allowed at the top level of a model", stmt.span, "E111")
            return
        if stmt.name in self._outputs:
            first = self._outputs[stmt.name]
            self.error(f"output '{stmt.name}' is declared twice (first at line {first.line})", stmt.span, "E107")
            return
        self._outputs[stmt.name] = stmt.span
        if stmt.name not in frame.env:
            self.error(f"output '{stmt.name}' is not defined", stmt.span, "E102")
            return
        value = frame.env[stmt.name]
        if value is POISON:
            return
        if not isinstance(value, TensorRef):
            self.error(f"output '{stmt.name}' must be a tensor, got {describe(value)}", stmt.span, "E201")
            return
        if stmt.type is not None:
            self.check_type(value, stmt.type, dict(frame.env), frame, f"output '{stmt.name}'", bind=False)
        self.graph.outputs.append((stmt.name, value))

    def exec_repeat(self, stmt: ast.Repeat, frame: Frame) -> None:
        count = self.eval(stmt.count, frame)
        if count is POISON:
            return
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            self.error(f"repeat count must be a non-negative int, got {describe(count)}", stmt.count.span, "E201")
            return
        if count > MAX_REPEAT:
            self.error(f"repeat count {count} is more than {MAX_REPEAT}", stmt.count.span, "E201")
            return
        if self._layers_built + count > MAX_REPEAT:  # nested or many repeats add up
            self.error(f"repeat count {count} makes more than {MAX_REPEAT:,} repeated layers in the model",
                       stmt.count.span, "E201")
            return
        self._layers_built += count
        outer_repeat, outer_top = self._repeat_scope, frame.top_level
        shadowed = frame.env.get(stmt.index, _UNBOUND) if stmt.index else _UNBOUND
        frame.top_level = False
        try:
            for i in range(count):
                frame.scope.extend([stmt.name, str(i)])
                if outer_repeat is None:
                    self._repeat_scope = ".".join(frame.scope)
                if stmt.index:
                    frame.env[stmt.index] = i
                before = len(self.diagnostics)
                try:
                    self.exec_body(stmt.body, frame)
                finally:
                    del frame.scope[-2:]
                if len(self.diagnostics) > before:
                    break  # the same mistake would repeat in every layer
        finally:
            self._repeat_scope, frame.top_level = outer_repeat, outer_top
            if stmt.index:  # the index is the body's: after the repeat, the name means what it meant before
                if shadowed is _UNBOUND:
                    frame.env.pop(stmt.index, None)
                else:
                    frame.env[stmt.index] = shadowed

    # ---- expressions ------------------------------------------------------------------------
    def eval(self, e, frame: Frame, label: str | None = None, explicit: bool = False):
        """`label` names the resulting node; when `explicit` (from `as`) it also names its module."""
        if isinstance(e, ast.Number):
            return e.value
        if isinstance(e, ast.Bool):
            return e.value
        if isinstance(e, ast.String):
            return e.value
        if isinstance(e, ast.NoneLit):
            return None
        if isinstance(e, ast.Name):
            return self.lookup(e, frame)
        if isinstance(e, ast.ListLit):
            items = [self.eval(i, frame) for i in e.items]
            return POISON if any(i is POISON for i in items) else items
        if isinstance(e, ast.Index):
            return self.eval_index(e, frame)
        if isinstance(e, ast.Named):
            value = self.eval(e.value, frame, label=e.name, explicit=True)
            frame.env[e.name] = value
            return value
        if isinstance(e, ast.Neg):
            v = self.eval(e.operand, frame)
            if v is POISON:
                return POISON
            if isinstance(v, TensorRef):
                return self.apply_op(get_op("mul"), [(v, e.span), (-1, e.span)], [], e.span, frame, label)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if not representable(-v):
                    self.error(f"-{describe(v)}: {too_large(-v)}", e.span, "E204")
                    return POISON
                return -v
            self.error(f"cannot negate {describe(v)}", e.span, "E201")
            return POISON
        if isinstance(e, ast.BinOp):
            return self.eval_binop(e, frame, label)
        if isinstance(e, ast.Not):
            v = self.eval(e.operand, frame)
            if v is POISON:
                return POISON
            if not isinstance(v, bool):
                self.error(f"'not' needs true or false, got {describe(v)}", e.span, "E201")
                return POISON
            return not v
        if isinstance(e, ast.IfElse):
            cond = self.eval(e.condition, frame)
            if cond is POISON:
                return POISON
            if not isinstance(cond, bool):
                self.error(f"a condition must be true or false, got {describe(cond)}", e.condition.span, "E201")
                return POISON
            return self.eval(e.then if cond else e.otherwise, frame, label, explicit)
        if isinstance(e, ast.Call):
            return self.eval_call(e, frame, label, explicit)
        raise TypeError(f"unknown expression {e!r}")

    def eval_index(self, e: ast.Index, frame: Frame):
        """`items[i]`: an item of a list, counted from 0 (from the end when negative, as in Python)."""
        items, index = self.eval(e.value, frame), self.eval(e.index, frame)
        if items is POISON or index is POISON:
            return POISON
        if not isinstance(items, list):
            self.error(f"only a list can be indexed, not {describe(items)}", e.value.span, "E201")
            return POISON
        if not isinstance(index, int) or isinstance(index, bool):
            self.error(f"a list index must be an int, got {describe(index)}", e.index.span, "E201")
            return POISON
        if not -len(items) <= index < len(items):
            self.error(f"index {index} is out of range for a list of {len(items)}", e.index.span, "E201")
            return POISON
        return items[index]

    def lookup(self, e: ast.Name, frame: Frame):
        if e.id in frame.env:
            return frame.env[e.id]
        if get_op(e.id) is not None or e.id in frame.namespace:
            return FuncRef(e.id)
        hint = self.suggest(e.id, lambda: frame.env)
        self.error(f"unknown name '{e.id}'{hint}", e.span, "E102")
        return POISON

    _TENSOR_BINOPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "@": "matmul"}

    def eval_binop(self, e: ast.BinOp, frame: Frame, label):
        left = self.eval(e.left, frame)
        right = self.eval(e.right, frame)
        if left is POISON or right is POISON:
            return POISON
        if isinstance(left, TensorRef) or isinstance(right, TensorRef):
            opname = self._TENSOR_BINOPS.get(e.op)
            if opname is None:
                self.error(f"operator '{e.op}' is not defined for tensors", e.span, "E201")
                return POISON
            return self.apply_op(get_op(opname), [(left, e.left.span), (right, e.right.span)], [], e.span,
                                 frame, label)
        try:
            return scalar_binop(e.op, left, right)
        except ScalarError as err:
            self.error(str(err), e.span, err.code)
            return POISON

    def eval_call(self, e: ast.Call, frame: Frame, label, explicit=False):
        op = get_op(e.func) if e.func not in frame.namespace else None
        option = {a.name: a for a in op.args if a.kind == "func"} if op is not None else {}
        positional = [a.name for a in op.args] if op is not None else []
        args = [(self.eval_arg(a, frame, option.get(positional[i]) if i < len(positional) else None), a.span)
                for i, a in enumerate(e.args)]
        kwargs = [(k.name, self.eval_arg(k.value, frame, option.get(k.name)), k.span) for k in e.kwargs]
        poisoned = any(v is POISON for v, _ in args) or any(v is POISON for _, v, _ in kwargs)
        if e.func in frame.namespace:
            if poisoned:
                return POISON
            return self.call_block(frame.namespace[e.func], args, kwargs, e, frame, label if explicit else None)
        if op is not None and op.name != "input":
            if poisoned:
                return POISON
            return self.apply_op(op, args, kwargs, e.span, frame, label, explicit)
        if e.func in SCALAR_FUNCS:
            if poisoned:
                return POISON
            if kwargs or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v, _ in args):
                self.error(f"{e.func}() takes numbers only", e.span, "E104")
                return POISON
            try:
                value = SCALAR_FUNCS[e.func](*(v for v, _ in args))
            except OverflowError:
                self.error(f"{e.func}(): {BEYOND_FLOAT64}", e.span, "E204")
                return POISON
            except (TypeError, ValueError) as err:
                self.error(f"{e.func}(): {err}", e.span, "E104")
                return POISON
            if not representable(value):
                self.error(f"{e.func}(): {too_large(value)}", e.span, "E204")
                return POISON
            return value
        hint = self.suggest(e.func, lambda: [n for n in all_ops() if n != "input"] + list(frame.namespace)
                            + list(SCALAR_FUNCS))
        self.error(f"unknown op or block '{e.func}'{hint}", e.func_span, "E101")
        return POISON

    def eval_arg(self, e, frame: Frame, option: Arg | None):
        """An argument's value. For an op's function option (`act=gelu`) a bare word that names
        nothing is taken as a name to check against the option's choices, which can suggest one."""
        if (option is not None and option.choices and isinstance(e, ast.Name) and e.id not in frame.env
                and e.id not in frame.namespace and get_op(e.id) is None):
            return FuncRef(e.id)
        return self.eval(e, frame)

    # ---- ops --------------------------------------------------------------------------------
    def bind(self, what: str, params: list[Arg], args, kwargs, call_span) -> tuple[dict, dict] | None:
        """Match positional and keyword arguments to a signature; report every mismatch."""
        bound, spans, ok = {}, {}, True
        if len(args) > len(params):
            extra_span = args[len(params)][1]
            self.error(f"{what} takes at most {len(params)} positional arguments, got {len(args)}", extra_span, "E104")
            ok = False
        for p, (value, span) in zip(params, args):
            bound[p.name], spans[p.name] = value, span
        names = {p.name for p in params}
        for name, value, span in kwargs:
            if name not in names:
                self.error(f"{what} has no argument '{name}'{self.suggest(name, lambda: names)}", span, "E104")
                ok = False
            elif name in bound:
                self.error(f"{what}: argument '{name}' given twice", span, "E104")
                ok = False
            else:
                bound[name], spans[name] = value, span
        for p in params:
            if p.name not in bound:
                if p.default is REQUIRED:
                    self.error(f"{what}: missing argument '{p.name}'", call_span, "E104")
                    ok = False
                else:
                    bound[p.name], spans[p.name] = p.default, call_span
        return (bound, spans) if ok else None

    def apply_op(self, op: Op, args, kwargs, span, frame: Frame, label=None, explicit=False):
        binding = self.bind(op.name, list(op.args), args, kwargs, span)
        if binding is None:
            return POISON
        bound, spans = binding
        for a in op.args:
            value, problem = _convert(a, bound[a.name])
            if problem:
                self.error(f"{op.name}: argument '{a.name}' must be {problem}, got {describe(bound[a.name])}",
                           spans[a.name], "E104")
                return POISON
            if a.choices and value is not None and value not in a.choices:
                self.error(f"{op.name}: {a.name} must be one of {', '.join(map(repr, a.choices))}, got "
                           f"{value!r}{self.suggest(value, lambda: a.choices)}", spans[a.name], "E104")
                return POISON
            bound[a.name] = value
        call = OpCall(op, bound, self.graph)
        try:
            outs = op.infer(call)
            params = op.params(call)
            ties = op.ties(call)
        except OpError as err:
            where = spans.get(err.arg, span) if err.arg else span
            code = "E105" if err.arg == "tie" else "E103"
            self.error(f"{op.name}: {err}", where, code)
            return POISON
        if isinstance(outs, tuple):
            outs = [outs]
        sizes = [(f"{op.name}: parameter '{local}'", shape) for local, shape in params.items()]
        sizes += [(f"{op.name}: its output", shape) for shape, _ in outs]
        if not all(self.check_size(what, shape, span) for what, shape in sizes):
            return POISON
        module = None
        if op.short is not None:
            module = self.module_name(frame, label if explicit else None, op.short, span)
            if module is None:
                return POISON
        refs = self.add_node(op.name, bound, outs, span, frame, label=label or op.name, module=module)
        for local, shape in params.items():
            full = f"{module}.{local}"
            self.graph.params[full] = _param(full, shape, refs[0].node, ties.get(local))
        return refs[0] if len(refs) == 1 else tuple(refs)

    def module_name(self, frame: Frame, label, default: str, span) -> str | None:
        used = self._names_in_scope.setdefault(tuple(frame.scope), set())
        if label is not None and label not in used:
            name = label
        elif label is not None:
            self.error(f"'{label}' already names a module in this scope", span, "E107")
            return None
        else:
            # the next free suffix, remembered: probing from _1 each time made 10,000 linears quadratic
            key = (tuple(frame.scope), default)
            k = self._module_counts.get(key, 0)
            name = default if k == 0 else f"{default}_{k}"
            while name in used:
                k += 1
                name = f"{default}_{k}"
            self._module_counts[key] = k + 1
        used.add(name)
        return ".".join([*frame.scope, name])

    def add_node(self, op: str, args: dict, outs: list, span, frame: Frame, label: str,
                 module: str | None = None) -> list[TensorRef]:
        base = _identifier(label)
        n = self._node_ids.get(base, 0)
        self._node_ids[base] = n + 1
        node_id = base if n == 0 else f"{base}_{n}"
        self.graph.add_node(node_id, op, args, outs, span, module, label, self._repeat_scope)
        return [TensorRef(node_id, i, shape, dtype) for i, (shape, dtype) in enumerate(outs)]

    def check_size(self, what: str, shape: tuple, span) -> bool:
        """A tensor torch can hold: its known dims (symbols count as 1) multiply to at most 2^63 - 1."""
        known = math.prod(abs(d.coef if isinstance(d, Sym) else d) for d in shape if is_dim(d))
        if known > INT64_MAX:
            self.error(f"{what} {fmt_shape(shape)} has more than 2^63 - 1 elements: no tensor can hold it",
                       span, "E204")
            return False
        return True

    # ---- blocks -----------------------------------------------------------------------------
    def call_block(self, bdef: BlockDef, args, kwargs, call: ast.Call, frame: Frame, label):
        block = bdef.block
        active = [b for b, _ in self._calls]
        again = next((i for i, b in enumerate(active) if b is block), None)  # `is`: blocks compare by value
        if again is not None:
            cycle = [b.name for b in active[again:]] + [block.name]
            if len(cycle) == 2:
                message = f"block '{block.name}' calls itself (recursion is not allowed)"
            else:
                names = [f"'{n}'" for n in cycle[:-1]]
                both = ", ".join(names[:-1]) + " and " + names[-1]
                message = f"blocks {both} call each other: {' -> '.join(cycle)} (recursion is not allowed)"
            self.error(message, call.func_span, "E108")
            return POISON
        if len(self._calls) >= MAX_CALL_DEPTH:
            chain = [b.name for b in active]
            shown = chain if len(chain) <= 6 else chain[:3] + ["…"] + chain[-2:]
            self.error(f"block calls nested more than {MAX_CALL_DEPTH} deep: {' -> '.join([*shown, block.name])}",
                       call.func_span, "E112")
            return POISON
        params = [Arg(p.name, "any", REQUIRED if p.default is None else p.default) for p in block.params]
        binding = self.bind(block.name, params, args, kwargs, call.span)
        if binding is None:
            return POISON
        bound, spans = binding
        env: dict = {}
        inner = Frame(env=env, namespace=bdef.namespace, scope=[], kind="block", top_level=False)
        for p in block.params:
            value = bound[p.name]
            if _is_expr(value):
                with self._in_call(block, call):  # a default is the block's text: a mistake in it has a call
                    value = self.eval(value, inner)  # evaluated against earlier parameters
                if value is POISON:
                    return POISON
            if p.type is not None:
                if not isinstance(value, TensorRef):
                    self.error(f"{block.name}: argument '{p.name}' must be a tensor, got {describe(value)}",
                               spans[p.name], "E104")
                    return POISON
                if not self.check_type(value, p.type, env, inner, f"{block.name}: argument '{p.name}'",
                                       bind=True, at=spans[p.name]):
                    return POISON
            env[p.name] = value
        scope_name = self.module_name(frame, label, block.name, call.span)
        if scope_name is None:
            return POISON
        inner.scope = scope_name.split(".")
        with self._in_call(block, call):
            result = self.exec_body(block.body, inner)
            if result is None:
                if not any(isinstance(s, ast.Return) for s in block.body):
                    self.error(f"block '{block.name}' has no 'return'", block.span, "E111")
                return POISON
            if result is POISON:
                return POISON
            if block.returns is not None:
                if not isinstance(result, TensorRef):
                    self.error(f"block '{block.name}' must return a tensor, got {describe(result)}", block.span,
                               "E201")
                    return POISON
                if not self.check_type(result, block.returns, env, inner, f"block '{block.name}' return value",
                                       bind=False, at=block.returns.span):
                    return POISON
        return result

    @contextlib.contextmanager
    def _in_call(self, block: ast.Block, call: ast.Call):
        self._calls.append((block, call))
        try:
            yield
        finally:
            self._calls.pop()

    def check_type(self, ref: TensorRef, t: ast.TensorType, env: dict, frame: Frame, what: str,
                   bind: bool, at=None) -> bool:
        """Match a tensor against `f32[*, d]`: names not yet in `env` are bound when `bind` is set."""
        at = at or t.span
        if t.dtype is not None and t.dtype != ref.dtype:
            self.error(f"{what}: expected dtype {t.dtype}, got {ref.dtype}", at, "E103")
            return False
        stars = [i for i, d in enumerate(t.dims) if isinstance(d, ast.StarDim)]
        shape = ref.shape
        fixed = len(t.dims) - len(stars)
        if len(stars) > 1:
            self.error("at most one '*' in a shape", t.span, "E202")
            return False
        if (stars and len(shape) < fixed) or (not stars and len(shape) != fixed):
            self.error(f"{what}: expected rank {'>= ' if stars else ''}{fixed} {_fmt_type(t)}, "
                       f"got {fmt_shape(shape)}", at, "E103")
            return False
        if stars:
            s = stars[0]
            tail = len(t.dims) - s - 1
            pairs = list(zip(t.dims[:s], shape[:s])) + list(zip(t.dims[s + 1:], shape[len(shape) - tail:]))
        else:
            pairs = list(zip(t.dims, shape))
        sub = Frame(env=env, namespace=frame.namespace, scope=frame.scope, kind=frame.kind, top_level=False)
        for d, actual in pairs:
            if isinstance(d, ast.BoundedDim):
                d = d.dim
            if bind and isinstance(d, ast.Name) and d.id not in env:
                env[d.id] = actual
                continue
            expected = self.eval(d, sub)
            if expected is POISON:
                return False
            if expected != actual:
                self.error(f"{what}: expected shape {_fmt_type(t)} = {_fmt_expected(t, env)}, "
                           f"got {fmt_shape(shape)}", at, "E103")
                return False
        return True


# ---- helpers --------------------------------------------------------------------------------

@contextlib.contextmanager
def _recursion_limit(limit: int):
    """Evaluation recurses once per level of an expression and a few times per block call; both
    are bounded (dsl.parser.MAX_DEPTH, MAX_CALL_DEPTH), and this makes room for the bound."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float, bool, str))


def _is_per_layer(v) -> bool:
    """A list hyper-parameter (one value per layer, read with a repeat's index): scalars and none."""
    return isinstance(v, list) and all(item is None or _is_scalar(item) for item in v)


def _is_expr(v) -> bool:
    return isinstance(v, (ast.Name, ast.Number, ast.Bool, ast.NoneLit, ast.String, ast.BinOp, ast.Neg, ast.Not,
                          ast.IfElse, ast.Call, ast.ListLit, ast.Named))


def _convert(a: Arg, v):
    """(converted value, None) or (v, 'what was expected')."""
    k = a.kind
    if k == "any" or (v is None and a.default is None):
        return v, None
    if k == "tensor":
        return (v, None) if isinstance(v, TensorRef) else (v, "a tensor")
    if k == "node":
        return (v, None) if (v is None or isinstance(v, TensorRef)) else (v, "a named node")
    if k == "int":
        ok = isinstance(v, int) and not isinstance(v, bool)
        return (v, None) if ok or (v is None and a.default is None) else (v, "an int")
    if k == "float":
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v), None
        return (v, None) if v is None and a.default is None else (v, "a number")
    if k == "bool":
        return (v, None) if isinstance(v, bool) else (v, "true or false")
    if k == "dim":
        return (v, None) if is_dim(v) else (v, "an int or a dim")
    if k == "dims":
        ok = isinstance(v, list) and all(is_dim(d) for d in v)
        return (tuple(v), None) if ok else (v, "a list of dims like [batch, seq, -1]")
    if k == "ints":
        ok = isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v)
        return (tuple(v), None) if ok else (v, "a list of ints")
    if k == "scalar":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return (v, None) if ok else (v, "a number")
    if k == "tensor_or_scalar":
        ok = isinstance(v, TensorRef) or (isinstance(v, (int, float)) and not isinstance(v, bool))
        return (v, None) if ok else (v, "a tensor or a number")
    if k == "func":
        if isinstance(v, FuncRef):
            return v.name, None
        return (v, None) if isinstance(v, str) else (v, "an op name such as gelu")
    if k == "str":
        return (v, None) if isinstance(v, str) else (v, "a string")
    raise ValueError(f"unknown argument kind {k}")


def _param(full, shape, node, tied):
    from .graph import Param
    return Param(full, tuple(shape), node, tied)


def _identifier(label: str) -> str:
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in label)
    return out if out and not out[0].isdigit() else f"n_{out}"


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _fmt_type(t: ast.TensorType) -> str:
    parts = []
    for d in t.dims:
        parts.append("*" if isinstance(d, ast.StarDim) else _src(d))
    return (t.dtype or "") + "[" + ", ".join(parts) + "]"


def _src(e) -> str:
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Number):
        return str(e.value)
    if isinstance(e, ast.BinOp):
        return f"{_src(e.left)} {e.op} {_src(e.right)}"
    if isinstance(e, ast.BoundedDim):
        return _src(e.dim)
    return "?"


def _fmt_expected(t: ast.TensorType, env: dict) -> str:
    """The pattern with the dims it has bound so far filled in: [*, d] -> [*, 768]."""
    dims = []
    for d in t.dims:
        if isinstance(d, ast.StarDim):
            dims.append("*")
            continue
        if isinstance(d, ast.BoundedDim):
            d = d.dim
        if isinstance(d, ast.Name) and d.id in env and is_dim(env[d.id]):
            dims.append(shapes.fmt_dim(env[d.id]))
        elif isinstance(d, ast.Number):
            dims.append(str(d.value))
        else:
            dims.append(_src(d))
    return "[" + ", ".join(dims) + "]"
