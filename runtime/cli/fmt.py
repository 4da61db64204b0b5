"""`lmspec fmt`: rewrite specs in the canonical layout of lmspec.dsl.formatter. Never imports torch."""
from __future__ import annotations

import difflib
import os
import stat
import sys

from lmspec.dsl.diagnostics import SpecError
from lmspec.dsl.formatter import format_source
from lmspec.runtime.atomic import write_text_atomically
from lmspec.runtime.cli.spec import expand_spec_paths
from lmspec.runtime.cli.verb import Verb
from lmspec.runtime.errors import UsageError, WriteError


def _count(n: int, what: str) -> str:
    return f"{n} file{'s' * (n != 1)} {what}"


def _diff(path: str, old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        path, path))


def _stdin(args) -> int:
    text = sys.stdin.read()
    try:
        out = format_source(text, "<stdin>")
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        return 1
    if args.diff:
        sys.stdout.write(_diff("<stdin>", text, out))
    elif args.check:
        if out != text:
            print("would reformat -")
    else:
        sys.stdout.write(out)
        return 0
    return int(out != text)


def fmt_options(p) -> None:
    """`lmspec fmt`'s options."""
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="spec files, directories (every **/*.arch), glob patterns, or - for stdin to stdout")
    p.add_argument("--check", action="store_true",
                   help="write nothing; list the files that would change and exit 1 if there are any")
    p.add_argument("--diff", action="store_true",
                   help="write nothing; print a unified diff of the changes and exit 1 if there are any")


def cmd_fmt(args) -> int:
    if "-" in args.files:
        if len(args.files) > 1:
            raise UsageError("- (stdin) must be the only file")
        return _stdin(args)
    files = list(dict.fromkeys(expand_spec_paths(args.files)))  # a file named twice is formatted once
    for path in files:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    write = not (args.check or args.diff)
    changed = unchanged = failed = 0
    for path in files:
        try:
            with open(path, encoding="utf-8", newline="") as f:  # newline="": CRLF files count as changed
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            print(f"lmspec fmt: error: {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        try:
            out = format_source(text, path)
        except SpecError as err:
            print(err.render(), file=sys.stderr)
            failed += 1
            continue
        if out == text:
            unchanged += 1
            continue
        changed += 1
        if args.diff:
            sys.stdout.write(_diff(path, text, out))
        elif args.check:
            print(f"would reformat {path}")
        else:
            target = os.path.realpath(path)  # through a symbolic link: the file it names, the link kept
            try:
                write_text_atomically(target, out, permissions=stat.S_IMODE(os.stat(target).st_mode))
            except WriteError as err:
                print(f"lmspec fmt: error: cannot write {path}: {err.reason}", file=sys.stderr)
                changed, failed = changed - 1, failed + 1
                continue
            print(f"reformatted {path}")
    parts = []
    if changed:
        parts.append(_count(changed, "reformatted" if write else "would be reformatted"))
    if unchanged:
        parts.append(_count(unchanged, "left unchanged" if write else "would be left unchanged"))
    if failed:
        parts.append(_count(failed, "failed"))
    # with --diff, stdout carries the diff alone (for `patch`); the summary goes to stderr
    print(", ".join(parts) or "no .arch files found", file=sys.stderr if args.diff else sys.stdout)
    return 1 if failed or (changed and not write) else 0


FMT = Verb(
    "fmt",
    ("Rewrite spec files in the canonical layout: same meaning, same comments; files that do not parse get a "
     "located syntax error and are left as they are."),
    fmt_options, cmd_fmt,
    examples="""examples:
  lmspec fmt specs/                          # every .arch file under specs/, rewritten in place
  lmspec fmt my.arch 'models/**/*.arch'
  lmspec fmt --check specs/                  # CI: exit 1 if a file is not formatted, write nothing
  lmspec fmt --diff specs/gpt2.arch          # show the changes as a unified diff, write nothing
  lmspec fmt - < my.arch > formatted.arch    # stdin to stdout""",
)
