"""A row of the command line's table: a verb, what it does, its options and its handler, declared in the
handler's module beside the handler; runtime/cli/main.py lists the rows."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Output:
    """Something a verb writes, at a path its options give: main() checks that it can be written before
    the handler runs (a read-only folder costs a second, not a run), and holds a run directory's lock
    for the whole verb (one writer per run)."""
    path: Callable[[argparse.Namespace], str | None]  # None: not written this time
    directory: bool
    run: bool = False  # a run directory that one process at a time may write


def option_output(dest: str, *, directory: bool, run: bool = False) -> Output:
    """The output named by option `dest`, when given."""
    return Output(lambda args: getattr(args, dest, None), directory, run)


@dataclass(frozen=True)
class Verb:
    name: str  # "train", or a group's verb: "finetune classify"
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    examples: str = ""
    outputs: tuple[Output, ...] = ()
    # a verb that starts a run: its options may come from `--config FILE.toml`, and the run directory
    # (its Output with run=True) gets the options it used as config.toml (runtime/cli/config_file.py)
    config_file: bool = False
