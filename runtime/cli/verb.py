"""A row of the command line's table: a verb, what it does, its options and its handler, declared in the
handler's module beside the handler; runtime/cli/main.py lists the rows."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    name: str  # "train", or a group's verb: "finetune classify"
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    examples: str = ""
