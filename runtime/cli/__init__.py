"""The `lmspec` command line: argparse, one table from verb to handler, and handlers that parse,
call a stage and print. No domain code. May import every stage."""

from lmspec.runtime.cli.main import main  # noqa: E402,F401  (the `lmspec` console script's entry point)
