"""Diagnostics for machines: JSON, GitHub Actions annotations and SARIF 2.1.0 (code scanning).

Each takes the diagnostics of a run and returns the text to print; none needs more than the
diagnostics themselves, so the same run can be reported in any form. They list every diagnostic
(no cap, unlike the human form) but never quote source text, so their size is bounded by the count.
A diagnostic's notes (the calls that led to an error inside a block) go in each format's own way:
a `notes` list in JSON, extra lines of the annotation on GitHub, related locations in SARIF.
"""
from __future__ import annotations

import json
from importlib import metadata

from .codes import CODES
from .diagnostics import Diagnostic

FORMATS = ("human", "json", "github", "sarif")
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def to_json(diagnostics: list[Diagnostic]) -> str:
    return json.dumps([d.to_dict() for d in diagnostics], indent=2)


def _escape_data(text: str) -> str:
    # The workflow-command escapes (actions/toolkit, command.ts): a newline would end the command.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def to_github(diagnostics: list[Diagnostic]) -> str:
    """One `::error file=…,line=…::message` workflow command per diagnostic: GitHub shows each
    on the pull request's diff, at its line."""
    lines = []
    for d in diagnostics:
        props = {}
        if d.path:
            props["file"] = d.path
        if d.span:
            props |= {"line": d.span.line, "endLine": d.span.end_line, "col": d.span.column,
                      "endColumn": d.span.end_column}
        props["title"] = f"{d.code} {d.name}"
        head = ",".join(f"{k}={_escape_property(str(v))}" for k, v in props.items())
        # GitHub shows a multi-line message as written: one line per note, located like the message
        message = "\n".join([d.message] + [f"{n.span}: note: {n.message}" for n in d.notes])
        lines.append(f"::{d.severity} {head}::{_escape_data(message)}")
    return "\n".join(lines)


def _version() -> str:
    try:
        return metadata.version("lmspec")
    except metadata.PackageNotFoundError:
        return "0"


def _uri(path: str) -> str:
    return path.replace("\\", "/")


def _physical(span) -> dict:
    return {"artifactLocation": {"uri": _uri(span.file)},
            "region": {"startLine": span.line, "startColumn": span.column,
                       "endLine": span.end_line, "endColumn": span.end_column}}


def to_sarif(diagnostics: list[Diagnostic]) -> str:
    """A SARIF 2.1.0 log with one run: every code as a rule, every diagnostic as a result."""
    rules = [{
        "id": c.code,
        "name": c.name,
        "shortDescription": {"text": c.summary},
        "defaultConfiguration": {"level": c.severity},
    } for c in CODES.values()]
    index = {c: i for i, c in enumerate(CODES)}
    results = []
    for d in diagnostics:
        result = {"ruleId": d.code, "level": d.severity, "message": {"text": d.message}}
        if d.code in index:
            result["ruleIndex"] = index[d.code]
        if d.span:
            result["locations"] = [{"physicalLocation": _physical(d.span)}]
        elif d.path:
            result["locations"] = [{"physicalLocation": {"artifactLocation": {"uri": _uri(d.path)}}}]
        if d.notes:
            result["relatedLocations"] = [{"id": i, "message": {"text": n.message},
                                           "physicalLocation": _physical(n.span)} for i, n in enumerate(d.notes)]
        results.append(result)
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "lmspec", "version": _version(), "rules": rules}},
            "columnKind": "unicodeCodePoints",
            "results": results,
        }],
    }
    return json.dumps(log, indent=2)
