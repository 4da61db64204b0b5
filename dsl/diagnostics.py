"""Compiler-style diagnostics: `file:line:col: error: message`, the source line and a caret."""
from __future__ import annotations

from dataclasses import dataclass

from .ast import Span


@dataclass
class Diagnostic:
    message: str
    span: Span | None
    code: str = "E000"
    severity: str = "error"

    def to_dict(self) -> dict:
        s = self.span
        return {
            "file": s.file if s else None,
            "line": s.line if s else None,
            "column": s.column if s else None,
            "end_line": s.end_line if s else None,
            "end_column": s.end_column if s else None,
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
        }

    def render(self, sources: dict[str, str] | None = None) -> str:
        """The human form; `sources` maps file names to their text so the line can be quoted."""
        if self.span is None:
            return f"{self.severity}: {self.message}"
        s = self.span
        head = f"{s.file}:{s.line}:{s.column}: {self.severity}: {self.message}"
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
        caret = " " * (len(gutter) - 2) + "| " + " " * (s.column - 1) + "^" + "~" * (width - 1)
        return f"{head}\n{gutter}{line}\n{caret}"


class SpecError(Exception):
    """One or more diagnostics that stop a spec from being built."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str] | None = None):
        self.diagnostics = diagnostics
        self.sources = sources or {}
        super().__init__("\n".join(d.render(self.sources) for d in diagnostics))

    def render(self) -> str:
        return "\n".join(d.render(self.sources) for d in self.diagnostics)
