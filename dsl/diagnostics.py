"""Compiler-style diagnostics: `file:line:col: error: message [E101 unknown-op]`, the source line
and a caret, then notes (`called from here`) the same way. Machine-readable forms (JSON, GitHub
annotations, SARIF) are in diagnostic_formats.py."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .ast import Span
from .codes import code_name
from .errors import UserError

# ANSI styles for a terminal; `colour=False` output has none of them.
_STYLE = {"error": "\033[1;31m", "warning": "\033[1;33m", "note": "\033[1;36m", "bold": "\033[1m",
          "caret": "\033[1;32m", "reset": "\033[0m"}

LINE_WINDOW = 100  # characters of a long source line quoted around the caret: output stays bounded
MESSAGE_LIMIT = 400  # characters of a message in the human form (a name can be megabytes long)
SHOWN = 100  # diagnostics the human form prints before "... and N more"
NOTES_SHOWN = 10  # notes of one diagnostic the human form prints: the first and last five


@dataclass(frozen=True)
class Note:
    """Where a diagnostic came from, e.g. the call of the block it is in: "in block 'mlp2', called from here"."""
    message: str
    span: Span

    def to_dict(self) -> dict:
        s = self.span
        return {"file": s.file, "line": s.line, "column": s.column, "end_line": s.end_line,
                "end_column": s.end_column, "message": self.message}


@dataclass
class Diagnostic:
    message: str
    span: Span | None
    code: str
    severity: str = "error"
    file: str | None = None  # where a diagnostic without a span (e.g. "defines no model") belongs
    notes: list[Note] = field(default_factory=list)  # innermost first, like a compiler's instantiation notes

    @property
    def name(self) -> str:
        return code_name(self.code)

    @property
    def path(self) -> str | None:
        return self.span.file if self.span else self.file

    def to_dict(self) -> dict:
        s = self.span
        out = {
            "file": self.path,
            "line": s.line if s else None,
            "column": s.column if s else None,
            "end_line": s.end_line if s else None,
            "end_column": s.end_column if s else None,
            "severity": self.severity,
            "code": self.code,
            "name": self.name,
            "message": self.message,
        }
        if self.notes:  # only when there are some: the nine fields above stay the whole of most diagnostics
            out["notes"] = [n.to_dict() for n in self.notes]
        return out

    def render(self, sources: dict[str, str] | None = None, colour: bool = False) -> str:
        """The human form; `sources` maps file names to their text so the line can be quoted."""
        style = _STYLE if colour else dict.fromkeys(_STYLE, "")
        label = f"{style[self.severity]}{self.severity}{style['reset']}"
        text = f"{label}: {_shorten(self.message)} [{self.code} {self.name}]"
        if self.span is None:
            where = f"{style['bold']}{self.file}:{style['reset']} " if self.file else ""
            out = [where + text]
        else:
            out = [_located(self.span, text, sources, style)]
        note = f"{style['note']}note{style['reset']}"
        notes: list[Note | None] = list(self.notes)
        if len(notes) > NOTES_SHOWN:  # the innermost and outermost calls of a deep chain, as gcc does
            half = NOTES_SHOWN // 2
            skipped, notes = len(notes) - 2 * half, notes[:half] + [None] + notes[-half:]
        out += [f"{note}: … {skipped} more calls …" if n is None
                else _located(n.span, f"{note}: {_shorten(n.message)}", sources, style) for n in notes]
        return "\n".join(out)


def _shorten(message: str) -> str:
    if len(message) <= MESSAGE_LIMIT:
        return message
    half = MESSAGE_LIMIT // 2
    return f"{message[:half]} … {message[-half:]}"


@functools.lru_cache(maxsize=8)
def _line_starts(text: str) -> list[int]:
    """Offsets where each line of `text` starts. Lines end at "\\n", as lark counts them; computed once
    per text, so quoting 50,000 diagnostics of one file does not split it 50,000 times."""
    starts = [0]
    find = text.find
    i = find("\n")
    while i != -1:
        starts.append(i + 1)
        i = find("\n", i + 1)
    return starts


def source_line(text: str, number: int) -> str | None:
    """Line `number` (1-based) of `text` without its line break, or None past the end."""
    starts = _line_starts(text)
    if not 1 <= number <= len(starts):
        return None
    end = starts[number] - 1 if number < len(starts) else len(text)
    return text[starts[number - 1]:end].rstrip("\r")


def _window(line: str, column: int, width: int) -> tuple[str, int, int]:
    """At most LINE_WINDOW characters of `line` around `column`: (text, its column, caret width)."""
    if len(line) <= LINE_WINDOW:
        return line, column, width
    start = max(0, min(column - 1 - LINE_WINDOW // 3, len(line) - LINE_WINDOW))
    end = start + LINE_WINDOW
    head = "…" if start > 0 else ""
    tail = "…" if end < len(line) else ""
    column = column - start + len(head)
    width = max(1, min(width, end - start + len(head) - column + 1))
    return head + line[start:end] + tail, column, width


def _located(s: Span, text: str, sources: dict[str, str] | None, style: dict) -> str:
    """`file:line:col: text`, then the source line (a window of a long one) and a caret."""
    head = f"{style['bold']}{s.file}:{s.line}:{s.column}:{style['reset']} {text}"
    source = (sources or {}).get(s.file)
    line = source_line(source, s.line) if source is not None else None
    if line is None:
        return head
    width = (s.end_column - s.column) if s.end_line == s.line else len(line) - s.column + 1
    shown, column, width = _window(line, s.column, max(1, width))
    gutter = f"{s.line:>5} | "
    caret = (" " * (len(gutter) - 2) + "| " + " " * (column - 1)
             + style["caret"] + "^" + "~" * (width - 1) + style["reset"])
    return f"{head}\n{gutter}{shown}\n{caret}"


def render_all(diagnostics: list[Diagnostic], sources: dict[str, str] | None = None, colour: bool = False,
               limit: int | None = SHOWN) -> str:
    """The human form of many diagnostics, at most `limit` of them (None: all): errors are chosen
    before warnings, shown in their own order, then one line counting the rest."""
    picked = range(len(diagnostics))
    if limit is not None and len(diagnostics) > limit:
        picked = sorted(sorted(picked, key=lambda i: diagnostics[i].severity != "error")[:limit])
    out = [diagnostics[i].render(sources, colour) for i in picked]
    rest = len(diagnostics) - len(picked)
    if rest:
        errors = sum(d.severity == "error" for d in diagnostics)
        errors -= sum(diagnostics[i].severity == "error" for i in picked)
        kinds = [f"{n} {word}{'s' * (n != 1)}" for n, word in ((errors, "error"), (rest - errors, "warning")) if n]
        out.append(f"… and {rest} more ({', '.join(kinds)}; `lmspec check --format json` lists them all)")
    return "\n".join(out)


class SpecError(UserError):
    """One or more diagnostics that stop a spec from being built."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str] | None = None):
        self.diagnostics = diagnostics
        self.sources = sources or {}
        super().__init__(diagnostics, self.sources)  # as args, so that a copy (pickle) is the same error

    def __str__(self) -> str:  # rendered when asked: 50,000 diagnostics are not rendered to be dropped
        return self.render()

    def render(self) -> str:
        return render_all(self.diagnostics, self.sources)

    def report(self, verb: str) -> str:
        """Located like a compiler's messages: `file:line:col: error: ...`, the line, a caret."""
        return self.render()
