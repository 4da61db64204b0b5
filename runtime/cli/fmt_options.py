"""Command-line options of `lmspec fmt`."""
from __future__ import annotations


def add_fmt_verbs(verb, top) -> None:
    f = verb("fmt", "Rewrite spec files in the canonical layout: same meaning, same comments; files that "
             "do not parse get a located syntax error and are left as they are.",
             "cli.fmt:cmd_fmt", top, examples="""examples:
  lmspec fmt specs/                          # every .arch file under specs/, rewritten in place
  lmspec fmt my.arch 'models/**/*.arch'
  lmspec fmt --check specs/                  # CI: exit 1 if a file is not formatted, write nothing
  lmspec fmt --diff specs/gpt2.arch          # show the changes as a unified diff, write nothing
  lmspec fmt - < my.arch > formatted.arch    # stdin to stdout""")
    f.add_argument("files", nargs="+", metavar="FILE",
                   help="spec files, directories (every **/*.arch), glob patterns, or - for stdin to stdout")
    f.add_argument("--check", action="store_true",
                   help="write nothing; list the files that would change and exit 1 if there are any")
    f.add_argument("--diff", action="store_true",
                   help="write nothing; print a unified diff of the changes and exit 1 if there are any")
