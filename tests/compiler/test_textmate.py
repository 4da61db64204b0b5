"""The editor grammar (dsl/lmspec.tmLanguage.json) against the lark grammar it is generated from.

A small TextMate engine (match and begin/end rules, captures, includes; the earliest match wins,
ties go to the rule listed first, an end pattern before the rules inside it) runs the JSON's
regexes with Python's `re` over every spec, and every keyword, number, string, comment, dtype and
operator token that the project's own lark parser reads must come out with that kind of scope at
exactly that place, and nothing else may.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lark import Lark, Token
from lark.lexer import PatternStr

from lmspec.compiler.registry import all_ops
from lmspec.compiler import textmate
from lmspec.dsl.parser import _DropNewlinesInBrackets

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "dsl" / "lmspec.tmLanguage.json"
GRAMMAR_TEXT = (ROOT / "dsl" / "grammar.lark").read_text()
SPECS = sorted((ROOT / "specs").rglob("*.arch"))

# Syntax the shipped specs do not use, so that every keyword and operator is seen at least once.
SAMPLE = """\
use "blocks/attention.arch"  # a comment with "quotes", 12 and model in it
block f(x: [*, d], hidden = 4 * d, flag = none) -> [*, d] {
  y = x if hidden // 2 % 3 == 0 and not false or hidden != 1 else x ** 2
  return y @ x - .5e-3 / 1_000
}
model m {
  a = 2; b2 = 1.5e+2; b = b2 * x_1; c = sqrt(float(a)) >= 1 or a < b or a > 3 or a <= b
  input tokens: bf16[batch, seq <= 8]
  z = mlp(f(tokens, hidden=a) as blk, 4, act=silu, gated=true)
  repeat (a) as layer {
    z = z + 1
  }
  output z: f32[batch, seq, d]
}
"""


@pytest.fixture(scope="module")
def grammar():
    return textmate.build()


@pytest.fixture(scope="module")
def terms():
    return textmate.Terminals(textmate.load_lark())


# ---- the committed file ----------------------------------------------------------------------

def test_committed_grammar_is_what_the_generator_writes():
    assert COMMITTED.read_text() == textmate.render(), (
        "dsl/lmspec.tmLanguage.json is stale (the grammar or the op registry changed); regenerate it:\n"
        "    python -m lmspec.compiler.textmate dsl/lmspec.tmLanguage.json")


def test_header(grammar):
    assert grammar["scopeName"] == "source.lmspec"
    assert grammar["fileTypes"] == ["arch"] and grammar["name"] == "lmspec"


def test_generator_writes_a_file_and_imports_no_torch(tmp_path):
    out = tmp_path / "g.json"
    code = ("import sys; from lmspec.compiler.textmate import main; main([sys.argv[1]]); "
            "print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
    assert out.read_text() == COMMITTED.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]  # no temporary file left behind


# ---- derived from the lark grammar ---------------------------------------------------------------

def test_keywords_are_derived_from_the_grammar(terms):
    expected = {"use", "model", "block", "input", "output", "repeat", "as", "return", "if", "else",
                "and", "or", "not", "true", "false", "none"}
    assert expected <= set(terms.keywords)
    lark_words = {t.pattern.value for t in textmate.load_lark().terminals
                  if isinstance(t.pattern, PatternStr) and t.pattern.value.isidentifier()}
    assert set(terms.keywords) == lark_words


def test_every_regex_compiles_with_python_re(grammar):
    regexes = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("match", "begin", "end"):
                if key in node:
                    regexes.append(node[key])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(grammar)
    assert len(regexes) > 20
    for rx in regexes:
        re.compile(rx)
        assert "(?P" not in rx  # Python-only syntax


# ---- a tiny TextMate engine ----------------------------------------------------------------------

class Engine:
    def __init__(self, grammar: dict):
        self.g = grammar
        self.repo = grammar["repository"]
        self._rx: dict[str, re.Pattern] = {}

    def rx(self, pattern: str) -> re.Pattern:
        if pattern not in self._rx:
            self._rx[pattern] = re.compile(pattern)
        return self._rx[pattern]

    def expand(self, patterns: list) -> list:
        out = []
        for p in patterns:
            if "include" in p:
                ref = p["include"]
                out += self.expand(self.g["patterns"] if ref == "$self" else [self.repo[ref[1:]]])
            elif "match" in p or "begin" in p:
                out.append(p)
            else:
                out += self.expand(p["patterns"])
        return out

    def first_match(self, patterns, line, pos):
        best = None
        for p in patterns:
            m = self.rx(p.get("match") or p["begin"]).search(line, pos)
            if m and (best is None or m.start() < best[0].start()):
                best = (m, p)
        return best

    def emit(self, out, ln, line, m, name, captures):
        if name:
            out.append((ln, m.start(), m.end(), name))
        for group, spec in sorted(captures.items(), key=lambda kv: int(kv[0])):
            g = int(group)
            if m.group(g) is None:
                continue
            if "name" in spec:
                out.append((ln, m.start(g), m.end(g), spec["name"]))
            if "patterns" in spec:  # re-scan the captured text with these rules
                patterns, pos, text = self.expand(spec["patterns"]), m.start(g), line[:m.end(g)]
                while (hit := self.first_match(patterns, text, pos)) is not None:
                    sub, p = hit
                    self.emit(out, ln, text, sub, p.get("name"), p.get("captures", {}))
                    pos = max(sub.end(), pos + 1)

    def tokenize(self, text: str) -> list[tuple[int, int, int, str]]:
        """(line, start column, end column, scope) for every scope any rule gives, in order."""
        out = []
        stack = [(self.expand(self.g["patterns"]), None)]
        for ln, line in enumerate(text.split("\n")):
            pos = 0
            while pos <= len(line):
                patterns, rule = stack[-1]
                hit = self.first_match(patterns, line, pos)
                if rule is not None:
                    end = self.rx(rule["end"]).search(line, pos)
                    if end and (hit is None or end.start() <= hit[0].start()):
                        self.emit(out, ln, line, end, None, rule.get("endCaptures", {}))
                        stack.pop()
                        pos = end.end()
                        continue
                if hit is None:
                    break
                m, p = hit
                if "begin" in p:
                    self.emit(out, ln, line, m, None, p.get("beginCaptures", {}))
                    stack.append((self.expand(p["patterns"]), p))
                else:
                    self.emit(out, ln, line, m, p.get("name"), p.get("captures", {}))
                pos = max(m.end(), pos + (m.end() == m.start()))
        return out


# ---- against lark's lexer --------------------------------------------------------------------------

def lark_tokens(text: str) -> list:
    """Every token the project's parser reads (contextual lexer, as `lmspec` reads specs), comments too."""
    comments = []
    tree = Lark(GRAMMAR_TEXT, parser="lalr", postlex=_DropNewlinesInBrackets(), keep_all_tokens=True,
                lexer_callbacks={"COMMENT": comments.append}).parse(text)
    return comments + list(tree.scan_values(lambda v: isinstance(v, Token)))


def token_kind(tok, terms) -> str | None:
    if tok.type in ("INT", "FLOAT"):
        return "number"
    if tok.type in ("STRING", "COMMENT", "DTYPE"):
        return tok.type.lower()
    if tok.type in terms.operator_terminals:
        return "operator"
    if tok.type == "NAME" or tok.type == "_NL":
        return None
    word = str(tok)
    if word in terms.keywords:
        return "keyword"
    if word in terms.symbols:
        return "operator"
    return None


def scope_kind(scope: str, keyword_scopes: set) -> str | None:
    if scope in keyword_scopes:
        return "keyword"
    for prefix, kind in (("constant.numeric.", "number"), ("string.", "string"), ("comment.", "comment"),
                         ("support.type.dtype.", "dtype"), ("keyword.operator.", "operator"),
                         ("punctuation.", "operator")):
        if scope.startswith(prefix):
            return kind
    return None


SOURCES = [pytest.param(p.read_text(), id=str(p.relative_to(ROOT))) for p in SPECS] + \
          [pytest.param(SAMPLE, id="sample")]


@pytest.mark.parametrize("text", SOURCES)
def test_tokens_agree_with_lark(text, grammar, terms):
    keyword_scopes = {textmate.keyword_scope(w) for w in terms.keywords}
    records = Engine(grammar).tokenize(text)
    spans: dict[tuple, list[str]] = {}
    for ln, s, e, scope in records:
        spans.setdefault((ln, s, e), []).append(scope)

    lark_kinds = {}
    for tok in lark_tokens(text):
        kind = token_kind(tok, terms)
        if kind is None:
            continue
        span = (tok.line - 1, tok.column - 1, tok.column - 1 + len(tok))
        lark_kinds[span] = kind
        where = f"line {tok.line} col {tok.column} {str(tok)!r} ({tok.type})"
        assert span in spans, f"{where}: no TextMate token there"
        innermost = spans[span][-1]
        assert scope_kind(innermost, keyword_scopes) == kind, f"{where}: scoped {innermost}, lark says {kind}"
        if kind == "keyword":
            assert innermost == textmate.keyword_scope(str(tok)), where

    for ln, s, e, scope in records:
        kind = scope_kind(scope, keyword_scopes)
        if kind is not None:
            assert lark_kinds.get((ln, s, e)) == kind, \
                f"line {ln + 1} col {s + 1} {text.splitlines()[ln][s:e]!r}: scoped {scope}, lark disagrees"


def test_the_sources_use_every_keyword_and_operator(terms):
    seen = set()
    for p in SOURCES:
        seen |= {str(t) for t in lark_tokens(p.values[0])}
    assert set(terms.keywords) <= seen
    assert {s for s in terms.symbols} <= seen
    assert {"==", "!=", ">=", "<", ">"} <= seen


def test_names_after_keywords_are_definitions(grammar):
    text = "model gpt {\n  repeat n as block {\n  }\n  x = f(y) as lm_head\n}\nblock swiglu(x) {\n}\n"
    got = {(ln, text.split("\n")[ln][s:e]): scope for ln, s, e, scope in Engine(grammar).tokenize(text)}
    assert got[(0, "gpt")] == "entity.name.type.model.lmspec"
    assert got[(1, "block")] == "entity.name.tag.lmspec"  # `as block`: a name, as lark reads it
    assert got[(3, "f")] == "entity.name.function.lmspec"
    assert got[(3, "lm_head")] == "entity.name.tag.lmspec"
    assert got[(5, "swiglu")] == "entity.name.function.block.lmspec"


# ---- against the op registry --------------------------------------------------------------------

def test_every_registered_op_is_a_builtin(grammar, terms):
    engine = Engine(grammar)
    for name in all_ops():
        if name in terms.keywords:  # `input`: the graph's input node, declared with the keyword
            assert engine.tokenize(f"{name} x: [n]")[0][3] == textmate.keyword_scope(name)
            continue
        line = f"y = {name}(x, act={name})"
        got = {line[s:e]: scope for _, s, e, scope in engine.tokenize(line) if scope.startswith("support.")}
        assert got == {name: "support.function.builtin.lmspec"}, name
        assert (0, 4, 4 + len(name), "support.function.builtin.lmspec") in engine.tokenize(line)
        # the op passed as a function value
        assert (0, len(line) - 1 - len(name), len(line) - 1, "support.function.builtin.lmspec") \
            in engine.tokenize(line)


def test_a_hyper_parameter_named_like_an_op_is_not_a_builtin(grammar):
    line = "x = dropout(x, dropout)"
    scopes = [(line[s:e], scope) for _, s, e, scope in Engine(grammar).tokenize(line)]
    assert ("dropout", "support.function.builtin.lmspec") in scopes
    assert scopes.count(("dropout", "support.function.builtin.lmspec")) == 1


def test_json_is_valid():
    assert json.loads(COMMITTED.read_text())["scopeName"] == "source.lmspec"
