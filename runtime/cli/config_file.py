"""`--config FILE.toml` for the verbs that start a run: the verb's options read from a TOML file (the
command line overriding it, as argparse defaults are), and the options a run used written back as
RUN/config.toml, so that `--config RUN/config.toml` repeats the run.

A key is an option's long name, with dashes or underscores (`eval-every = 50`, `eval_every = 50`), or
a positional's name (`spec = "specs/gpt2.arch"`); `--set` is a table (`[set]` with `layers = 4`) or a
list of NAME=VALUE strings. Paths are read from the current directory, as on the command line.
"""
from __future__ import annotations

import argparse
import difflib
import math
import re
import tomllib
from pathlib import Path

from lmspec.runtime.cli.numbers import Number
from lmspec.runtime.errors import UsageError

CONFIG_FILE = "config.toml"  # in a run directory: the options it was started with
_NOT_RECORDED = {"help", "config", "resume"}  # how this invocation started, not what the run is


class ConfigFileError(UsageError):
    """A config file that cannot be read, or a key in it that the verb does not take; located at file:line."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml",
                        help="read the options from a TOML file (keys are the long option names; flags given "
                             "here override it); a run writes the options it used as RUN/config.toml")


def options_from_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """{dest: value} of the options `path` sets, each checked against `parser`'s declaration."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"--config {path}: unreadable ({err})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(err))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(err))
        at = f"{path}:{where.group(1)}:{where.group(2)}" if where else path
        raise ConfigFileError(f"{at}: not TOML: {message}") from None
    actions = _actions_by_key(parser)
    values = {}
    for key, value in table.items():
        at = f"{path}:{_line_of(text, key)}"
        action = actions.get(key) or actions.get(key.replace("_", "-"))
        if action is None:
            near = difflib.get_close_matches(key.replace("_", "-"), [k for k in actions if "_" not in k], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; `lmspec {parser.prog.split(' ', 1)[-1]} --help` lists them"
            raise ConfigFileError(f"{at}: unknown option {key!r}{hint}")
        if action.dest in _NOT_RECORDED:
            raise ConfigFileError(f"{at}: {key!r} belongs on the command line, not in a config file")
        values[action.dest] = _checked(action, key, value, at)
    return values


def apply_config_file(args: argparse.Namespace, argv: list[str], top: argparse.ArgumentParser,
                      verb_parser: argparse.ArgumentParser) -> argparse.Namespace:
    """`args` re-read with --config's options as defaults: what the command line gives wins."""
    values = options_from_file(args.config, verb_parser)
    verb_parser.set_defaults(**values)
    return top.parse_args(argv)


def loosen_required(verb_parser: argparse.ArgumentParser) -> None:
    """Let a config file give what argparse would demand on the command line (the positionals, a
    required -o): argparse checks those before any default applies, so check_required does, after."""
    for action in verb_parser._actions:
        if not action.option_strings and action.nargs is None:
            action.nargs = "?"
            action.required_of_run = True
        elif action.required:
            action.required = False
            action.required_of_run = True


def check_required(args: argparse.Namespace, verb_parser: argparse.ArgumentParser) -> None:
    missing = [action for action in verb_parser._actions
               if getattr(action, "required_of_run", False) and getattr(args, action.dest) is None]
    if missing:
        names = ", ".join(a.option_strings[-1] if a.option_strings else a.dest.upper() for a in missing)
        source = f"; {args.config} does not give it either" if getattr(args, "config", None) else \
            " (on the command line, or in a --config file)"
        raise UsageError(f"the following arguments are required: {names}{source}")


def config_text(args: argparse.Namespace, verb_parser: argparse.ArgumentParser, verb: str) -> str:
    """The TOML of the options `args` holds for `verb_parser`'s verb (None values left out: they are
    the defaults), which --config reads back to the same values."""
    from lmspec.runtime.checkpoint.layout import run_options_header

    lines = run_options_header(verb)
    overrides = []
    for action in verb_parser._actions:
        if action.dest in _NOT_RECORDED or isinstance(action, argparse._HelpAction):
            continue
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        if action.dest == "set":
            overrides = list(value)
            continue
        key = action.option_strings[-1].lstrip("-") if action.option_strings else action.dest
        lines.append(f"{key} = {_toml_value(value)}")
    if overrides:
        lines.append(f"set = {_toml_value(overrides)}")
    return "\n".join(lines) + "\n"


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    keys = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = [s.lstrip("-") for s in action.option_strings if s.startswith("--")] or [action.dest]
        for name in names:
            keys[name] = action
        keys[action.dest] = action
    return keys


def _checked(action: argparse.Action, key: str, value, at: str):
    """`value` as the command line would have given it to `action`, or a located error."""
    def wrong(expected: str):
        return ConfigFileError(f"{at}: {key} must be {expected}, got {_toml_value(value)}")

    if action.dest == "set":
        if isinstance(value, dict):
            return [f"{name}={_dsl_literal(v)}" for name, v in value.items()]
        if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
            return value
        raise wrong('a table of hyper-parameters, or a list of "NAME=VALUE" strings')
    if isinstance(action, argparse._AppendAction):
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise wrong("a list of strings")
        return value
    if action.nargs == 0:  # a flag (store_true): `compile = true` gives --compile
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if action.nargs == "?" and action.option_strings and value is True:  # --activation-checkpointing alone
        return action.const
    kind = action.type.kind if isinstance(action.type, Number) else action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        value = float(value)
    elif action.nargs in ("+", "*"):
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise wrong("a list of strings")
    elif not isinstance(value, str):
        raise wrong("a string")
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    if isinstance(action.type, Number) and action.type.problem(value) is not None:
        raise wrong(action.type.expected())
    return value


def _line_of(text: str, key: str) -> int:
    """The line that sets `key` at the top level (or its table's header), 1-based; 1 if not found."""
    pattern = re.compile(rf"""^\s*(\[\s*)?["']?{re.escape(key)}["']?\s*(=|\])""")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return 1


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan" if math.isnan(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped) + '"'


def _dsl_literal(value) -> str:
    """A TOML value as the spec language writes it, for `--set NAME=VALUE`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_dsl_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value == "none" else _toml_string(value)
    return repr(value)
