"""Command-line options of `lmspec diff`."""
from __future__ import annotations


def add_diff_verbs(verb, top) -> None:
    d = verb("diff", "Compare two models for checkpoint compatibility: parameters added, removed, reshaped and "
             "renamed, weight ties, hyper-parameters, parameter and FLOP counts, and whether checkpoints of OLD "
             "load into NEW. Each side is a spec file or a checkpoint; never imports torch.",
             "cli.diff:cmd_diff", top, examples="""examples:
  lmspec diff specs/tiny.arch my-tiny.arch                   # two specs
  lmspec diff runs/tiny specs/tiny.arch --new-set layers=6   # a checkpoint's own tensors against a spec
  lmspec diff specs/gpt2.arch specs/gpt2.arch --old-set layers=4 --new-set layers=6 --seq 512
  lmspec diff runs/tiny new.arch --format json --fail-on-breaking      # CI: exit 1 when breaking""")
    d.add_argument("old", metavar="OLD", help="a spec file, or a checkpoint (run or checkpoints/step_N directory)")
    d.add_argument("new", metavar="NEW", help="a spec file, or a checkpoint (compared as the model it rebuilds)")
    d.add_argument("--old-set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a hyper-parameter of OLD when it is a spec (repeatable)")
    d.add_argument("--new-set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a hyper-parameter of NEW when it is a spec (repeatable)")
    d.add_argument("--model", help="the model to use when a spec file defines several")
    d.add_argument("--seq", type=int, help="sequence length for both FLOP counts (default: each model's context)")
    d.add_argument("--format", choices=["human", "json"], default="human",
                   help="json: one object with added/removed/reshaped/renamed/hyper/parameters/flops/breaking/reasons")
    d.add_argument("--fail-on-breaking", action="store_true",
                   help="exit 1 when checkpoints of OLD do not load into NEW")
