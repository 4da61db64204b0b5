"""Read a spec file and what it `use`s, then build the model graph.

`load_spec` is the front door of the compiler: it either returns a checked ModelGraph or
raises SpecError carrying every diagnostic found.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from lmspec.dsl import ast
from lmspec.dsl.diagnostics import Diagnostic, SpecError
from lmspec.dsl.parser import BOM, INT64_MAX, gc_paused, parse

from .build import BlockDef, Builder
from .graph import ModelGraph
from .registry import get_op

MAX_USE_DEPTH = 100  # files `use`ing files: real projects have two or three levels


@dataclass
class Program:
    """A parsed file with the blocks it can call, and every source read to get there."""
    main: ast.Module | None
    namespace: dict[str, BlockDef]
    sources: dict[str, str]
    diagnostics: list[Diagnostic] = field(default_factory=list)


class _Loader:
    def __init__(self, sources: dict[str, str] | None):
        self.given = sources or {}
        self.sources: dict[str, str] = {}
        self.modules: dict[str, ast.Module] = {}
        self.namespaces: dict[str, dict[str, BlockDef]] = {}
        self.diagnostics: list[Diagnostic] = []

    def read(self, path: str, span) -> str | None:
        """The text of `path` without a byte-order mark (spans count columns after it)."""
        text = self.given[path] if path in self.given else self._read(path, span)
        return text.removeprefix(BOM) if text is not None else None

    def _read(self, path: str, span) -> str | None:
        try:
            if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
                # a FIFO or a device (`use "/dev/zero"`) would block or never end
                self.diagnostics.append(Diagnostic(f"not a regular file: {path}", span, code="E002"))
                return None
            with open(path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            self.diagnostics.append(Diagnostic(f"file not found: {path}", span, code="E002"))
        except IsADirectoryError:
            self.diagnostics.append(Diagnostic(f"is a directory, not a spec file: {path}", span, code="E002"))
        except UnicodeDecodeError as err:
            self.diagnostics.append(Diagnostic(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})",
                                               span, code="E002"))
        except OSError as err:
            self.diagnostics.append(Diagnostic(f"cannot read {path}: {err.strerror}", span, code="E002"))
        return None

    def load(self, path: str, span=None, stack: tuple[str, ...] = ()) -> dict[str, BlockDef] | None:
        """Parse `path` and its uses; return the namespace of blocks visible inside it."""
        if path in self.namespaces:
            return self.namespaces[path]
        text = self.read(path, span)
        if text is None:
            return None
        self.sources[path] = text
        try:
            module = parse(text, path)
        except SpecError as err:
            self.diagnostics.extend(err.diagnostics)
            return None
        self.modules[path] = module
        namespace: dict[str, BlockDef] = {}
        origin: dict[str, str] = {}
        for use in module.uses:
            target = os.path.normpath(os.path.join(os.path.dirname(path), use.path))
            if target in stack or target == path:
                earlier = list(stack[stack.index(target):]) if target in stack else []
                chain = " -> ".join([*earlier, path, target])
                self.diagnostics.append(Diagnostic(f"import cycle: {chain}", use.span, code="E109"))
                continue
            if len(stack) >= MAX_USE_DEPTH:
                self.diagnostics.append(Diagnostic(f"`use`d files nested more than {MAX_USE_DEPTH} deep",
                                                   use.span, code="E112"))
                continue
            imported = self.load(target, use.span, (*stack, path))
            if imported is None:
                continue
            for name in self.modules[target].blocks:
                namespace[name.name] = imported[name.name]
                origin[name.name] = target
        for block in module.blocks:
            if get_op(block.name) is not None:
                self.diagnostics.append(Diagnostic(f"block '{block.name}' has the name of a built-in op",
                                                   block.span, code="E107"))
                continue
            if block.name in namespace:
                where = origin.get(block.name, "this file")
                self.diagnostics.append(Diagnostic(f"block '{block.name}' is already defined in {where}",
                                                   block.span, code="E107"))
                continue
            namespace[block.name] = BlockDef(block, namespace)
        self.namespaces[path] = namespace
        return namespace


def load_program(path: str, sources: dict[str, str] | None = None) -> Program:
    path = os.path.normpath(path)
    loader = _Loader(sources)
    with gc_paused():
        namespace = loader.load(path)
    program = Program(loader.modules.get(path), namespace or {}, loader.sources, loader.diagnostics)
    empty = _defines_nothing(program)
    if empty is not None:
        program.diagnostics.append(empty)
    return program


def _defines_nothing(program: Program) -> Diagnostic | None:
    """The error for a file with no model, block or `use` in it: empty, or only comments."""
    main = program.main
    if main is None or main.models or main.blocks or main.uses:
        return None
    what = "only comments" if main.source.strip(" \t\r\n\f;") else "nothing"
    return Diagnostic(f"the file holds {what}: no model or block", ast.Span(main.file, 1, 1, 1, 1), code="E110")


def parse_override(text: str) -> tuple[str, object]:
    """`layers=4` -> ('layers', 4); values are ints, floats, true/false, none, "strings", or a list of
    them (`windows=[1024, none]`, a hyper-parameter read per layer)."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected NAME=VALUE")
    name, raw = (s.strip() for s in text.split("=", 1))
    if not name.isidentifier():
        raise ValueError(f"--set {text!r}: {name!r} is not a name")
    if raw.startswith("[") and raw.endswith("]"):
        return name, [parse_override(f"{name}={item}")[1] for item in raw[1:-1].split(",") if item.strip()]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return name, raw[1:-1]
    low = raw.lower()
    if low == "none":
        return name, None
    if low in ("true", "false"):
        return name, low == "true"
    digits = raw.replace("_", "")
    if digits.lstrip("+-").isdigit() and len(digits.lstrip("+-0")) > len(str(INT64_MAX)):  # int() refuses 4,300
        raise ValueError(f"--set {name}: {raw[:30]}{'…' if len(raw) > 30 else ''} is too large for an int64")
    for conv in (int, float):
        try:
            return name, conv(digits)
        except ValueError:
            pass
    raise ValueError(f"--set {text!r}: value must be an int, a float, true/false, none, a \"string\" or a list")


def parse_overrides(pairs: list[str]) -> dict:
    """Every `--set NAME=VALUE` of a command line, in order (a later one wins)."""
    return dict(parse_override(text) for text in pairs)


def _choose_models(program: Program, model: str | None) -> list[ast.Model]:
    main = program.main
    models = main.models
    if model is not None:
        models = [m for m in models if m.name == model]
        if not models:
            names = ", ".join(m.name for m in main.models) or "none"
            raise SpecError([Diagnostic(f"no model named '{model}' (models: {names})", None, code="E110",
                                        file=main.file)], program.sources)
    if not models:
        raise SpecError([Diagnostic("defines no model (only blocks)", None, code="E110", file=main.file)],
                        program.sources)
    return models


def _build(program: Program, model: ast.Model, overrides: dict | None) -> tuple[ModelGraph, list[Diagnostic]]:
    graph = ModelGraph(model.name, program.main.file, sources=program.sources)
    builder = Builder(graph, overrides or {})
    with gc_paused():
        builder.build_model(model, program.namespace)
    return graph, builder.diagnostics


def build_model(program: Program, overrides: dict | None = None, model: str | None = None) -> ModelGraph:
    """The checked graph of one model of a loaded program; SpecError if anything is wrong."""
    if program.diagnostics or program.main is None:
        raise SpecError(program.diagnostics, program.sources)
    models = _choose_models(program, model)
    if len(models) > 1:
        names = ", ".join(m.name for m in models)
        raise SpecError([Diagnostic(f"defines several models ({names}); choose one with --model", None,
                                    code="E110", file=program.main.file)], program.sources)
    graph, errors = _build(program, models[0], overrides)
    if errors:
        raise SpecError(errors, program.sources)
    return graph


def load_spec(path: str, overrides: dict | None = None, model: str | None = None,
              sources: dict[str, str] | None = None) -> ModelGraph:
    """Parse, resolve `use`s, and build the checked graph of the model in `path`."""
    return build_model(load_program(path, sources), overrides, model)


def check_file(path: str, overrides: dict | None = None,
               sources: dict[str, str] | None = None) -> tuple[list[Diagnostic], dict[str, str]]:
    """Every diagnostic for one file, errors and warnings, in file order. A library of blocks only
    needs to parse and resolve; a file with models builds each of them. `sources` gives the text
    of files by path instead of reading them (an editor's unsaved buffer, a test's input)."""
    from .lint import lint
    program = load_program(path, sources)
    if program.diagnostics or program.main is None:
        return program.diagnostics, program.sources
    diagnostics: list[Diagnostic] = []
    built = []
    for m in program.main.models:
        graph, errors = _build(program, m, overrides)
        diagnostics += errors
        built.append((m, graph, not errors))
    with gc_paused():
        diagnostics += lint(program, built)
    diagnostics.sort(key=lambda d: (d.path or "", d.span.line if d.span else 0, d.span.column if d.span else 0))
    return diagnostics, program.sources
