"""The `lmspec` command line: check | info | train | sample.

Each verb imports what it needs when it runs, so `check` and `info` never import torch.
A mistake in the user's input ends as a located message and a non-zero exit, not a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmspec.dsl.diagnostics import SpecError

from .usage import UsageError

EXAMPLES = {
    "check": """examples:
  lmspec check specs/gpt2.arch
  lmspec check 'specs/**/*.arch' --format json
  lmspec check specs/ --set layers=4""",
    "info": """examples:
  lmspec info specs/gpt2.arch
  lmspec info specs/gpt2.arch --set layers=4 --set dim=256 --seq 512
  lmspec info specs/gpt2.arch --graph gpt2.svg""",
    "train": """examples:
  lmspec train specs/tiny.arch                      # embedded corpus (CPython's docs), char-level
  lmspec train specs/shakespeare-char.arch --data ../shared/data/tinyshakespeare.txt --steps 2000
  lmspec train specs/gpt2.arch --set layers=4 --set dim=256 --data corpus/ --tokenizer tok.json
  lmspec train specs/tiny.arch --out runs/tiny --resume   # continue a stopped run""",
    "sample": """examples:
  lmspec sample runs/tiny --prompt "The " --max-tokens 200
  lmspec sample runs/tiny/checkpoints/step_000500 --temperature 0.8 --top-k 40 --seed 1""",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmspec",
        description="Build a language model from a spec: check it, inspect it, train it, sample from it.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def verb(name, help_, handler):
        """A verb whose `handler` ('module:function' in lmspec.runtime) is imported only when it runs."""
        q = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        q.set_defaults(handler=handler)
        return q

    def override_options(q):
        q.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="override a hyper-parameter of the spec (repeatable)")
        q.add_argument("--model", help="the model to use when a file defines several")

    c = verb("check", "Check spec files and report every error, located, before anything runs.",
             "spec_commands:cmd_check")
    c.add_argument("paths", nargs="+", metavar="PATH", help="spec files, directories or glob patterns")
    c.add_argument("--format", choices=["human", "json"], default="human")
    override_options(c)

    i = verb("info", "Parameters, FLOPs per token and a per-block breakdown of a spec.", "spec_commands:cmd_info")
    i.add_argument("spec")
    i.add_argument("--seq", type=int, help="sequence length for FLOP counts (default: the context)")
    i.add_argument("--graph", metavar="FILE", help="also draw the graph to FILE (.dot, .svg, .png, .pdf)")
    i.add_argument("--format", choices=["human", "json"], default="human")
    override_options(i)

    t = verb("train", "Train a spec on a text corpus (next-token cross-entropy, AdamW).", "commands:cmd_train")
    t.add_argument("spec")
    override_options(t)
    t.add_argument("--data", help="a text file or a directory of .txt files (default: CPython's docs)")
    t.add_argument("--tokenizer", help="a Hugging Face tokenizers JSON file (default: characters)")
    t.add_argument("--out", help="run directory for checkpoints and logs (default: runs/<spec name>)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.add_argument("--steps", type=int, help="optimizer steps in all (default: 500, or the resumed run's)")
    t.add_argument("--batch", type=int, default=12)
    t.add_argument("--seq", type=int, help="training sequence length (default: the model's context)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default: lr/10)")
    t.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--beta2", type=float, default=0.95, help="AdamW's second-moment decay (nanoGPT's char model: 0.99)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--eval-batches", type=int, default=20)
    t.add_argument("--ckpt-every", type=int, default=100)
    t.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--sample-tokens", type=int, default=200, help="print a sample this long at the end (0: none)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = verb("sample", "Generate text from a checkpoint, using the KV cache.", "commands:cmd_sample")
    s.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    s.add_argument("--prompt", default="", help="text to continue (default: empty)")
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        module, function = args.handler.split(":")
        return getattr(importlib.import_module(f"lmspec.runtime.{module}"), function)(args)
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except UsageError as err:
        print(f"lmspec {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in lmspec, not in the input: say so briefly
        if os.environ.get("LMSPEC_DEBUG"):
            raise
        print(f"lmspec {args.verb}: internal error: {type(err).__name__}: {err}\n"
              f"(this is a bug in lmspec; run with LMSPEC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
