"""The `lmspec` command line: one table from each verb to its handler, and the one place where a
mistake in the user's input becomes one line and an exit code (a bug in lmspec, a short note).

Each verb's options sit beside its handler in this package's modules, with a Verb row naming both;
VERBS lists the rows. The handlers' modules import what their work needs only when it runs, so
`check`, `fmt`, `diff`, `info` and `plan` never import torch, and a verb that needs a module of an
extra not installed (runtime/cli/extras.py) says which extra to install.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from contextlib import ExitStack

from lmspec.dsl.errors import UserError
from lmspec.runtime.cli import (
    classify, data, diff, dpo, eval, export, fmt, hf, instruct, lora, plan, plot, serve, spec, train
)
from lmspec.runtime.atomic import check_output_location, write_failure_reason
from lmspec.runtime.checkpoint.run_lock import run_lock
from lmspec.runtime.cli.config_file import (
    add_config_option, apply_config_file, check_required, config_text, loosen_required
)
from lmspec.runtime.cli.extras import missing_extra_report, old_torch_report
from lmspec.runtime.cli.verb import Verb

VERBS: list[Verb] = [
    spec.CHECK, fmt.FMT, diff.DIFF, spec.INFO, plan.PLAN,
    train.TRAIN, train.SAMPLE, plot.PLOT,
    export.EXPORT, serve.GENERATE, serve.SERVE,
    data.DATA_PREPARE, data.DATA_TOKENIZE, data.DATA_VERIFY, hf.IMPORT_HF,
    data.TOKENIZER_TRAIN, data.TOKENIZER_ENCODE, data.TOKENIZER_DECODE,
    classify.FINETUNE_CLASSIFY, classify.CLASSIFY, instruct.FINETUNE_INSTRUCT, instruct.CHAT, dpo.FINETUNE_DPO,
    eval.EVAL, lora.LORA_MERGE,
]

GROUPS = {  # verbs of two words: the first names a group
    "data": "Prepare a text corpus: clean and deduplicate it, tokenize it into shards; verify shards and checkpoints.",
    "import": "Bring models in from other formats.",
    "tokenizer": "Train, inspect and use tokenizers.",
    "finetune": "Finetune a checkpoint: a classifier, an instruction follower, preferences (DPO).",
    "lora": "LoRA adapters: fold them into the base weights.",
}


TOUR = """examples, from a spec to a server (each verb's --help has more):
  lmspec check specs/*.arch                                  # every shape checked, no tensor made
  lmspec plan specs/llama3.2-1b.arch --gpus 8 --gpu-memory 80GB  # what training it needs
  lmspec train specs/tiny.arch --steps 1500 --out runs/tiny  # on the GPU where there is one
  lmspec sample runs/tiny --prompt "The "
  lmspec export runs/tiny -o exported/tiny.onnx
  lmspec serve exported/tiny.onnx                            # an OpenAI-compatible API on :8000"""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error in two lines: a one-line usage that points to `--help`
    (argparse's own lists every option: 22 lines for `train`), then the error, with the nearest
    choice where a choice was misspelt."""

    def error(self, message):
        formatter = self._get_formatter()
        positionals = " ".join(formatter._format_args(action, formatter._get_default_metavar_for_positional(action))
                               for action in self._get_positional_actions())
        usage = f"usage: {self.prog} [options] {positionals}".rstrip()
        self.exit(2, f"{usage}   (see {self.prog} --help)\n{self.prog}: error: {nearest_choice(message)}\n")


def nearest_choice(message: str) -> str:
    """argparse's "invalid choice: 'trian' (choose from …)" as "… (did you mean 'train'?)" where one
    choice is near; any other message as it is."""
    refused = re.fullmatch(r"(?P<head>.*invalid choice: '?(?P<value>.*?)'?) \(choose from (?P<choices>.*)\)", message)
    if not refused:
        return message
    choices = [choice.strip().strip("'") for choice in refused["choices"].split(",")]
    near = difflib.get_close_matches(refused["value"], choices, n=1, cutoff=0.6)
    return f"{refused['head']} (did you mean '{near[0]}'?)" if near else message


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples as written, and each option's default shown where its help does not say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
        return text if quiet or "default" in text else f"{text} (default: %(default)s)".lstrip()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lmspec")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def parser() -> argparse.ArgumentParser:
    """The parser of every verb in VERBS; a verb's handler is `args.handler`, its name `args.verb_name`."""
    p = _Parser(
        prog="lmspec", allow_abbrev=False, formatter_class=_Formatter,
        description="Build a language model from a spec: check, format and diff it, plan it, train it, finetune and "
                    "evaluate it, sample from it, export and serve it.")
    p.epilog = TOUR
    p.add_argument("--version", action="version", version=f"lmspec {_version()}")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for row in VERBS:
        *group, name = row.name.split(" ")
        parent = verbs
        if group:
            if group[0] not in groups:
                holder = verbs.add_parser(group[0], help=GROUPS[group[0]], description=GROUPS[group[0]],
                                          allow_abbrev=False)
                groups[group[0]] = holder.add_subparsers(dest="action", metavar="ACTION", required=True)
            parent = groups[group[0]]
        q = parent.add_parser(name, help=row.help, description=row.help, epilog=row.examples or None,
                              formatter_class=_Formatter, allow_abbrev=False)
        row.options(q)
        if row.config_file:
            add_config_option(q)
            loosen_required(q)
        for action in q._actions:  # an option declared without help still shows its default
            if action.help is None and action.option_strings and action.default not in (None, False, []):
                action.help = "(default: %(default)s)"
        q.set_defaults(handler=row.handler, verb_name=row.name, outputs=row.outputs, parser_of_verb=q,
                       verb_parser=q if row.config_file else None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = parser()
    args, unknown = top.parse_known_args(argv)
    if unknown:  # argparse would blame `lmspec` and show its usage; the verb's is the one that helps
        args.parser_of_verb.error(unrecognized_report(unknown, args.parser_of_verb))
    if too_old := old_torch_report(args.verb_name):
        print(too_old, file=sys.stderr)
        return 1
    try:
        if args.verb_parser is not None:
            args = options_of_run(args, argv, top)
        return _run(args)
    except UserError as err:  # every mistake in the input: a spec's, an option's, a file's
        print(err.report(args.verb_name), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmspec info … | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as err:  # a bug in lmspec, not in the input: say so briefly
        refused = write_failure_reason(err)
        if refused:  # no bug: a write the file system refused, in a writer that does not say where
            where = getattr(err, "filename", None)
            print(f"lmspec {args.verb_name}: error: {f'cannot write {where}: ' if where else ''}{refused}",
                  file=sys.stderr)
            return 1
        missing = isinstance(err, ModuleNotFoundError) and missing_extra_report(args.verb_name, err.name or "")
        if missing:  # no bug either: an install without the extra this verb needs, e.g. `pip install lmspec`
            print(missing, file=sys.stderr)
            return 1
        if os.environ.get("LMSPEC_DEBUG"):
            raise
        print(f"lmspec {args.verb_name}: internal error: {type(err).__name__}: {err}\n"
              f"(this is a bug in lmspec; run with LMSPEC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


def unrecognized_report(unknown: list[str], verb_parser: argparse.ArgumentParser) -> str:
    """argparse's message for arguments no option takes, with the nearest option of the verb for
    the first that looks like a misspelt one."""
    report = f"unrecognized arguments: {' '.join(unknown)}"
    options = [o for action in verb_parser._actions for o in action.option_strings if o.startswith("--")]
    for argument in unknown:
        if argument.startswith("--"):
            near = difflib.get_close_matches(argument.split("=", 1)[0], options, n=1, cutoff=0.75)
            if near:
                return f"{report} (did you mean {near[0]}?)"
    return report


def options_of_run(args, argv: list[str], top: argparse.ArgumentParser):
    """A run's options: with --config, the file's under the command line's; its positionals given one way or the other."""
    if args.config:
        args = apply_config_file(args, argv, top, args.verb_parser)
    check_required(args, args.verb_parser)
    # what a fresh run writes as RUN/config.toml once it has checked its input (a resumed run keeps its own)
    args.run_options = None if getattr(args, "resume", False) else config_text(args, args.verb_parser, args.verb_name)
    return args


def _run(args) -> int:
    """The verb's handler, what it writes checked first, and its run directory locked throughout
    (under torchrun by the first rank, for the job)."""
    with ExitStack() as held:
        for output in args.outputs:
            path = output.path(args)
            if path is None:
                continue
            check_output_location(path, directory=output.directory)
            if output.run and int(os.environ.get("RANK", "0")) == 0:
                held.enter_context(run_lock(path))
        return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
