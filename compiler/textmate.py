"""A TextMate grammar for `.arch` files (VS Code, Sublime Text, GitHub's linguist, …), generated
from dsl/grammar.lark so that the editor colours what the parser reads.

    python -m lmspec.compiler.textmate                            # print the JSON
    python -m lmspec.compiler.textmate dsl/lmspec.tmLanguage.json # write it (atomically)

From the lark grammar: the keywords (anonymous string terminals that are words), the operators
(string terminals that are symbols, and the COMPARE terminal), dtypes (DTYPE), numbers (FLOAT,
INT), strings (STRING), comments (COMMENT), identifiers (NAME), and which keywords introduce a
name (`model NAME`, `block NAME`, `input NAME`, `as NAME`: from the grammar's rules). From the op
registry: the built-in op names, and the arguments that take a function (`act=silu`). Only the
choice of scope name per kind of token is written here. tests/compiler/test_textmate.py checks the
committed JSON against this generator and the patterns against lark's own lexer on every spec.

The regexes are written in the subset that Oniguruma (TextMate, VS Code) and Python's `re` share.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from lark import Lark
from lark.lexer import PatternStr

DSL = Path(__file__).resolve().parent.parent / "dsl"  # the grammar's package, beside this one (repo or installed)
GRAMMAR = DSL / "grammar.lark"
OUTPUT = DSL / "lmspec.tmLanguage.json"
SCOPE = "lmspec"

# Scope of each keyword; a keyword added to the grammar and not listed here gets keyword.other.
_KEYWORD_SCOPES = {
    "use": "keyword.control.import",
    "model": "storage.type.model", "block": "storage.type.block",
    "input": "storage.modifier.input", "output": "storage.modifier.output",
    "repeat": "keyword.control.repeat", "return": "keyword.control.return",
    "if": "keyword.control.conditional", "else": "keyword.control.conditional",
    "and": "keyword.operator.logical", "or": "keyword.operator.logical", "not": "keyword.operator.logical",
    "true": "constant.language.boolean", "false": "constant.language.boolean",
    "none": "constant.language.none",
    "as": "keyword.other.as",
}
# Scope of the NAME that follows a keyword, by the grammar rule (its alias, else its name) where
# the keyword is directly followed by NAME.
_DEFINED_NAME_SCOPES = {
    "model_def": "entity.name.type.model",
    "block_def": "entity.name.function.block",
    "input_decl": "variable.parameter.input",
    "output_decl": "variable.other.output",
    "repeat": "entity.name.tag",  # repeat N as NAME: the parameters' prefix
    "named": "entity.name.tag",  # expr as NAME: the node's and its parameters' name
}
# Symbols that are punctuation rather than operators; brackets are begin/end rules.
_PUNCTUATION = {",": "punctuation.separator.comma", ";": "punctuation.terminator.statement",
                ":": "punctuation.separator.colon"}
_OPERATOR_SCOPES = {"=": "keyword.operator.assignment", "->": "keyword.operator.arrow"}
_BRACKETS = {"(": ")", "[": "]", "{": "}"}
_BRACKET_NAMES = {"(": "parens", "[": "brackets", "{": "braces"}
# Terminals that are tokens of their own kind, not operators.
_LEXICAL = ("NAME", "INT", "FLOAT", "STRING", "COMMENT", "DTYPE")


def _s(scope: str) -> str:
    return f"{scope}.{SCOPE}"


def keyword_scope(word: str) -> str:
    return _s(_KEYWORD_SCOPES.get(word, f"keyword.other.{word}"))


def onig(regex: str) -> str:
    """A Python regex (as lark holds it) as one Oniguruma reads the same way; raises ValueError on
    constructs outside the common subset."""
    for bad in ("(?P=", "(?#", "\\Z", "(?("):
        if bad in regex:
            raise ValueError(f"regex {regex!r}: {bad!r} has no Oniguruma equivalent here")
    if re.search(r"\(\?[aiLmsux]+[:)]", regex):
        raise ValueError(f"regex {regex!r}: inline flags are not supported here")
    regex = regex.replace("(?P<", "(?<")
    # lark keeps escapes such as \n as the characters themselves: write them back as escapes
    return regex.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t").replace("\f", "\\f")


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))


def load_lark(path: Path = GRAMMAR) -> Lark:
    return Lark(path.read_text(), parser="lalr")


class Terminals:
    """What the lark grammar says about tokens."""

    def __init__(self, lark: Lark):
        self.defs = {t.name: t for t in lark.terminals}
        ignored = set(lark.ignore_tokens)
        strings = [t.pattern.value for t in lark.terminals if isinstance(t.pattern, PatternStr)]
        self.keywords = sorted({s for s in strings if re.fullmatch(r"[A-Za-z_]\w*", s)})
        self.symbols = sorted({s for s in strings if not re.fullmatch(r"[A-Za-z_]\w*", s)})
        # named regex terminals that are none of the lexical kinds: operators (COMPARE)
        self.operator_terminals = sorted(
            t.name for t in lark.terminals
            if not isinstance(t.pattern, PatternStr) and t.name not in _LEXICAL
            and t.name not in ignored and not t.name.startswith("_"))
        # keyword -> scope of the NAME that follows it
        by_name = {t.name: t.pattern.value for t in lark.terminals if isinstance(t.pattern, PatternStr)}
        self.defines: dict[str, str] = {}
        for rule in lark.rules:
            names = [s.name for s in rule.expansion]
            for a, b in zip(names, names[1:]):
                word = by_name.get(a)
                if b != "NAME" or word not in self.keywords:
                    continue
                rule_name = rule.alias or rule.origin.name
                scope = _s(_DEFINED_NAME_SCOPES.get(rule_name, "entity.name"))
                if self.defines.setdefault(word, scope) != scope:
                    raise ValueError(f"'{word} NAME' has two scopes: {self.defines[word]} and {scope}; "
                                     "give its rules one in _DEFINED_NAME_SCOPES")

    def regex(self, name: str) -> str:
        return onig(self.defs[name].pattern.to_regexp())


def op_names() -> tuple[list[str], list[str], list[str]]:
    """(built-in op names, scalar helper names, names of arguments that take a function).

    The op registry is the list of built-ins; it imports
    no torch."""
    from lmspec.compiler.scalars import SCALAR_FUNCS
    from lmspec.compiler.registry import all_ops

    ops = all_ops()
    func_args = {a.name for op in ops.values() for a in op.args if a.kind == "func"}
    return sorted(ops), sorted(SCALAR_FUNCS), sorted(func_args)


def build(lark: Lark | None = None, ops: tuple[list[str], list[str], list[str]] | None = None) -> dict:
    """The TextMate grammar, as a dict ready for json.dump."""
    t = Terminals(lark or load_lark())
    op_list, scalars, func_args = ops or op_names()
    keywords = set(t.keywords)
    builtins = [n for n in op_list if n not in keywords]  # `input` is a keyword; its op is internal
    name = t.regex("NAME")
    word_end = r"(?![A-Za-z_0-9])"

    repo: dict[str, dict] = {}
    repo["comment"] = {"name": _s("comment.line.number-sign"), "match": t.regex("COMMENT")}
    repo["string"] = {"name": _s("string.quoted.double"), "match": t.regex("STRING")}

    by_scope: dict[str, list[str]] = {}
    for word, scope in sorted(t.defines.items()):
        by_scope.setdefault(scope, []).append(word)
    repo["definition"] = {"patterns": [
        {"match": rf"\b({_alternation(words)})[ \t]+({name})",
         "captures": {"1": {"patterns": [{"include": "#keyword"}]}, "2": {"name": scope}}}
        for scope, words in by_scope.items()]}

    kw_groups: dict[str, list[str]] = {}
    for word in t.keywords:
        kw_groups.setdefault(keyword_scope(word), []).append(word)
    repo["keyword"] = {"patterns": [{"name": scope, "match": rf"\b(?:{_alternation(words)})\b"}
                                    for scope, words in kw_groups.items()]}

    repo["dtype"] = {"name": _s("support.type.dtype"), "match": r"\b" + t.regex("DTYPE")}

    arguments = [{"include": "#function-argument"}, {"include": "#keyword-argument"}, {"include": "$self"}]
    repo["function-argument"] = {
        "match": rf"\b({_alternation(func_args)})[ \t]*(=)(?!=)[ \t]*({_alternation(builtins)}){word_end}",
        "captures": {"1": {"name": _s("variable.parameter")}, "2": {"name": _s("keyword.operator.assignment")},
                     "3": {"name": _s("support.function.builtin")}}}
    repo["keyword-argument"] = {
        "match": rf"\b({name})[ \t]*(=)(?!=)",
        "captures": {"1": {"name": _s("variable.parameter")}, "2": {"name": _s("keyword.operator.assignment")}}}

    def call(names_regex: str, scope: str) -> dict:
        return {"begin": rf"\b({names_regex})[ \t]*(\()", "end": r"\)",
                "beginCaptures": {"1": {"name": scope}, "2": {"name": _s("punctuation.section.parens.begin")}},
                "endCaptures": {"0": {"name": _s("punctuation.section.parens.end")}},
                "name": _s("meta.function-call"), "patterns": arguments}

    repo["builtin-call"] = call(_alternation(builtins), _s("support.function.builtin"))
    repo["scalar-call"] = call(_alternation(scalars), _s("support.function.scalar"))
    repo["call"] = call(name, _s("entity.name.function"))
    repo["parens"] = {"begin": r"\(", "end": r"\)",
                      "beginCaptures": {"0": {"name": _s("punctuation.section.parens.begin")}},
                      "endCaptures": {"0": {"name": _s("punctuation.section.parens.end")}},
                      "patterns": arguments}

    repo["number"] = {"name": _s("constant.numeric"),
                      "match": rf"(?<![A-Za-z_0-9.])(?:{t.regex('FLOAT')}|{t.regex('INT')}){word_end}"}

    operators = []
    punctuation = []
    closers = {v: k for k, v in _BRACKETS.items()}
    for sym in t.symbols:
        if sym in _BRACKETS or sym in closers:
            kind = _BRACKET_NAMES[sym if sym in _BRACKETS else closers[sym]]
            edge = "begin" if sym in _BRACKETS else "end"
            if kind != "parens":  # parentheses are the begin/end rules above
                punctuation.append({"name": _s(f"punctuation.section.{kind}.{edge}"), "match": re.escape(sym)})
        elif sym in _PUNCTUATION:
            punctuation.append({"name": _s(_PUNCTUATION[sym]), "match": re.escape(sym)})
        elif not any(re.fullmatch(t.regex(n), sym) for n in t.operator_terminals):
            operators.append(sym)
    # A rule earlier in the list wins at the same position, so longer symbols come first (`**` is one
    # token, not `*` `*`; `<=` is not COMPARE's `<` and then `=`), then the operator terminals (COMPARE's
    # `==` before the assignment's `=`), then single characters.
    def symbol_rule(sym):
        return {"name": _s(_OPERATOR_SCOPES.get(sym, "keyword.operator")), "match": re.escape(sym)}
    by_length = sorted(operators, key=lambda s: (-len(s), s))
    op_patterns = [symbol_rule(sym) for sym in by_length if len(sym) > 1]
    op_patterns += [{"name": _s(f"keyword.operator.{n.lower()}"), "match": t.regex(n)} for n in t.operator_terminals]
    op_patterns += [symbol_rule(sym) for sym in by_length if len(sym) == 1]
    repo["operator"] = {"patterns": op_patterns}
    repo["punctuation"] = {"patterns": punctuation}

    order = ["comment", "string", "definition", "keyword", "dtype", "builtin-call", "scalar-call", "call",
             "parens", "number", "operator", "punctuation"]
    return {
        "comment": "Generated from dsl/grammar.lark and the op registry by `python -m lmspec.compiler.textmate "
                   "dsl/lmspec.tmLanguage.json`; do not edit by hand.",
        "name": "lmspec",
        "scopeName": f"source.{SCOPE}",
        "fileTypes": ["arch"],
        "patterns": [{"include": f"#{k}"} for k in order],
        "repository": {k: repo[k] for k in order + ["function-argument", "keyword-argument"]},
    }


def render(grammar: dict | None = None) -> str:
    return json.dumps(grammar if grammar is not None else build(), indent=2, ensure_ascii=False) + "\n"


def write(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` under a temporary name beside it, then rename. The compiler may not import
    lmspec.runtime (pyproject's layers), where runtime/atomic.py is the one way to write a file; this
    is the least of it, under the same temporary name, for a generated file that git keeps anyway."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8", newline="\n")
        tmp.chmod(0o644)  # the committed file's mode, whatever the umask
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print("usage: python -m lmspec.compiler.textmate [OUT]\n\n" + __doc__.split("\n\n")[0], file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    text = render()
    if argv:
        write(argv[0], text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
