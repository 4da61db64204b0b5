"""What `lmspec data prepare` did to every file and document: tallied while streaming, written as
report.json and printed as a short summary."""
from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from lmspec.runtime.data.cleaning import CleaningCounts
from lmspec.runtime.data.dedupe import NearMatch

MAX_EXAMPLES = 5        # bad JSON lines and near-duplicate pairs shown in the report
SNIPPET_CHARS = 120     # how much of a document an example shows


class KeptDocuments:
    """Where each kept document came from (its input position and source), for the report."""

    def __init__(self):
        self.input_index = array("q")
        self.sources: list[str] = []

    @property
    def count(self) -> int:
        return len(self.input_index)

    def add(self, input_index: int, source: str) -> None:
        self.input_index.append(input_index)
        self.sources.append(source)



@dataclass
class Tally:
    """What happened to every document and file, gathered while streaming."""

    documents_in: int = 0
    documents_out: int = 0
    removed: dict = field(default_factory=lambda: dict.fromkeys(
        ("exact_duplicates", "near_duplicates", "too_short", "too_long", "empty"), 0))
    skipped_files: list = field(default_factory=list)
    bad_json_count: int = 0
    bad_json_examples: list = field(default_factory=list)
    invalid_utf8_files: dict = field(default_factory=dict)
    control_chars_removed: int = 0
    line_endings_normalised: int = 0
    nfc_normalised_documents: int = 0
    near_examples: list = field(default_factory=list)

    def count_cleaning(self, counts: CleaningCounts) -> None:
        self.control_chars_removed += counts.control_chars
        self.line_endings_normalised += counts.line_endings
        self.nfc_normalised_documents += counts.nfc_changed

    def skip(self, path: Path, reason: str) -> None:
        self.skipped_files.append({"path": str(path), "reason": reason})

    def bad_json(self, source: str, reason: str) -> None:
        self.bad_json_count += 1
        if len(self.bad_json_examples) < MAX_EXAMPLES:
            self.bad_json_examples.append(f"{source}: {reason}")

    def invalid_utf8(self, path: Path, count: int) -> None:
        if count:
            key = str(path)
            self.invalid_utf8_files[key] = self.invalid_utf8_files.get(key, 0) + count

    def note_near_duplicate(self, match: NearMatch, input_index: int, source: str, text: str,
                            kept: KeptDocuments) -> None:
        if len(self.near_examples) < MAX_EXAMPLES:
            self.near_examples.append({
                "similarity": round(match.similarity, 3),
                "kept": {"index": kept.input_index[match.kept], "source": kept.sources[match.kept],
                         "output_index": match.kept},
                "dropped": {"index": input_index, "source": source, "text": _snippet(text)},
            })

    def report(self, *, inputs, output, files, bytes_in, bytes_out, settings, seconds) -> dict:
        return {
            "inputs": inputs,
            "output": output,
            "files": files,
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "removed": dict(self.removed),
            "skipped_files": self.skipped_files,
            "bad_json_lines": {"count": self.bad_json_count, "examples": self.bad_json_examples},
            "invalid_utf8": {"count": sum(self.invalid_utf8_files.values()),
                             "files": self.invalid_utf8_files},
            "control_chars_removed": self.control_chars_removed,
            "line_endings_normalised": self.line_endings_normalised,
            "nfc_normalised_documents": self.nfc_normalised_documents,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            **settings,
            "near_duplicate_examples": self.near_examples,
            "seconds": seconds,
        }


def _snippet(text: str) -> str:
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 1] + "…"


def fill_kept_texts(examples: list[dict], written: Path) -> None:
    wanted = {example["kept"]["output_index"] for example in examples}
    if not wanted:
        return
    texts = {}
    with written.open(encoding="utf-8") as lines:
        for position, line in enumerate(lines):
            if position in wanted:
                texts[position] = _snippet(json.loads(line)["text"])
                if len(texts) == len(wanted):
                    break
    for example in examples:
        example["kept"]["text"] = texts[example["kept"]["output_index"]]


def format_report(report: dict) -> str:
    """A short printout of a `prepare` report."""
    removed = report["removed"]
    lines = [
        f"{report['documents_in']:,} documents in {report['files']:,} file(s) "
        f"({_human_bytes(report['bytes_in'])}) -> {report['documents_out']:,} kept "
        f"({_human_bytes(report['bytes_out'])}) in {report['output']}",
        "removed: " + (", ".join(f"{count:,} {reason.replace('_', ' ')}"
                                 for reason, count in removed.items() if count) or "nothing"),
    ]
    cleaning = [(report["invalid_utf8"]["count"], "invalid UTF-8 bytes"),
                (report["control_chars_removed"], "control characters"),
                (report["line_endings_normalised"], "CR line endings"),
                (report["nfc_normalised_documents"], "documents put in NFC form")]
    if any(count for count, _ in cleaning):
        lines.append("cleaned: " + ", ".join(f"{count:,} {what}" for count, what in cleaning if count))
    invalid = [f"  {path}: {count:,} invalid UTF-8 bytes dropped"
               for path, count in report["invalid_utf8"]["files"].items()]
    lines.extend(_at_most(MAX_EXAMPLES, invalid, "files with invalid UTF-8"))
    skipped = [f"skipped {s['path']}: {s['reason']}" for s in report["skipped_files"]]
    lines.extend(_at_most(MAX_EXAMPLES, skipped, "skipped files"))
    bad = report["bad_json_lines"]
    if bad["count"]:
        lines.append(f"{bad['count']:,} JSON records without usable text, e.g.")
        lines.extend(f"  {example}" for example in bad["examples"])
    for example in report["near_duplicate_examples"][:3]:
        lines.append(f"near duplicate ({example['similarity']:.2f}): {example['dropped']['source']} "
                     f"of {example['kept']['source']}")
    return "\n".join(lines)


def _at_most(limit: int, lines: list[str], what: str) -> list[str]:
    if len(lines) <= limit:
        return lines
    return lines[:limit] + [f"  … and {len(lines) - limit:,} more {what}"]


def _human_bytes(count: int) -> str:
    if count < 1000:
        return f"{count} B"
    for unit in ("KB", "MB", "GB"):
        count /= 1000
        if count < 1000 or unit == "GB":
            return f"{count:.1f} {unit}"
