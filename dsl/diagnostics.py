"""Compiler-style diagnostics: `file:line:col: error: message [E101 unknown-op]`, the source line
and a caret. Machine-readable forms (JSON, GitHub annotations, SARIF) are in diagnostic_formats.py."""
from __future__ import annotations

from dataclasses import dataclass

from .ast import Span
from .codes import code_name
from .errors import UserError

# ANSI styles for a terminal; `colour=False` output has none of them.
_STYLE = {"error": "\033[1;31m", "warning": "\033[1;33m", "bold": "\033[1m", "caret": "\033[1;32m",
          "reset": "\033[0m"}


@dataclass
class Diagnostic:
    message: str
    span: Span | None
    code: str
    severity: str = "error"
    file: str | None = None  # where a diagnostic without a span (e.g. "defines no model") belongs

    @property
    def name(self) -> str:
        return code_name(self.code)

    @property
    def path(self) -> str | None:
        return self.span.file if self.span else self.file

    def to_dict(self) -> dict:
        s = self.span
        return {
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

    def render(self, sources: dict[str, str] | None = None, colour: bool = False) -> str:
        """The human form; `sources` maps file names to their text so the line can be quoted."""
        style = _STYLE if colour else dict.fromkeys(_STYLE, "")
        label = f"{style[self.severity]}{self.severity}{style['reset']}"
        tail = f" [{self.code} {self.name}]"
        s = self.span
        if s is None:
            where = f"{style['bold']}{self.file}:{style['reset']} " if self.file else ""
            return f"{where}{label}: {self.message}{tail}"
        head = f"{style['bold']}{s.file}:{s.line}:{s.column}:{style['reset']} {label}: {self.message}{tail}"
        text = (sources or {}).get(s.file)
        if text is None:
            return head
        lines = text.splitlines()
        if not 1 <= s.line <= len(lines):
            return head
        line = lines[s.line - 1]
        width = (s.end_column - s.column) if s.end_line == s.line else len(line) - s.column + 1
        width = max(1, width)
        gutter = f"{s.line:>5} | "
        caret = (" " * (len(gutter) - 2) + "| " + " " * (s.column - 1)
                 + style["caret"] + "^" + "~" * (width - 1) + style["reset"])
        return f"{head}\n{gutter}{line}\n{caret}"


class SpecError(UserError):
    """One or more diagnostics that stop a spec from being built."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str] | None = None):
        self.diagnostics = diagnostics
        self.sources = sources or {}
        super().__init__("\n".join(d.render(self.sources) for d in diagnostics))

    def render(self) -> str:
        return "\n".join(d.render(self.sources) for d in self.diagnostics)

    def report(self, verb: str) -> str:
        """Located like a compiler's messages: `file:line:col: error: ...`, the line, a caret."""
        return self.render()
