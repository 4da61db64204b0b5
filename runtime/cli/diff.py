"""`lmspec diff OLD NEW`: will checkpoints of OLD load into NEW? Each side is a spec or a checkpoint.

Never imports torch: a spec side is built by the compiler, a checkpoint side is read from its
meta.json (the spec record, rebuilt by compiler/rewrites.py `graph_from_record`) and the header of
its model.safetensors (names and shapes, no tensor data).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmspec.runtime.checkpoint.header import read_checkpoint_tensors
from lmspec.runtime.checkpoint.layout import META_FILE
from lmspec.runtime.cli.numbers import AT_LEAST_1
from lmspec.runtime.cli.options import cli_overrides
from lmspec.runtime.cli.verb import Verb
from lmspec.runtime.errors import DiffInputError  # noqa: F401  (raised here, and imported from here)
from lmspec.runtime.errors import UsageError
from lmspec.runtime.train.context import check_seq_fits


@dataclass
class Side:
    path: str
    kind: str  # "spec" or "checkpoint"
    graph: object  # ModelGraph
    stored: dict | None = None  # a checkpoint's tensors: {name: shape}
    note: str = ""


def resolve(path: str, overrides: list[str], model: str | None, option: str) -> Side:
    """A spec file, or a checkpoint (a run, checkpoints or step directory, or a file inside one)."""
    p = Path(path)
    if not p.exists():
        raise DiffInputError(f"{path}: no such file or directory")
    if p.is_file() and (p.name == META_FILE or p.suffix == ".safetensors"):
        p = p.parent
    if p.is_dir():
        if overrides:
            raise UsageError(f"{option} applies to a spec, but {path} is a checkpoint (its overrides are recorded)")
        held = read_checkpoint_tensors(p)
        return Side(held.path, "checkpoint", held.graph, held.stored, f"adapters on {held.base}" if held.base else "")
    from lmspec.compiler import load_spec
    return Side(path, "spec", load_spec(path, cli_overrides(overrides), model))


def diff_options(p) -> None:
    """`lmspec diff`'s options."""
    p.add_argument("old", metavar="OLD", help="a spec file, or a checkpoint (run or checkpoints/step_N directory)")
    p.add_argument("new", metavar="NEW", help="a spec file, or a checkpoint (compared as the model it rebuilds)")
    p.add_argument("--old-set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a hyper-parameter of OLD when it is a spec (repeatable)")
    p.add_argument("--new-set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a hyper-parameter of NEW when it is a spec (repeatable)")
    p.add_argument("--model", help="the model to use when a spec file defines several")
    p.add_argument("--seq", type=AT_LEAST_1,
                   help="sequence length for both FLOP counts (default: each model's context)")
    p.add_argument("--format", choices=["human", "json"], default="human",
                   help="json: one object with added/removed/reshaped/renamed/hyper/parameters/flops/breaking/reasons")
    p.add_argument("--fail-on-breaking", action="store_true",
                   help="exit 1 when checkpoints of OLD do not load into NEW")


def cmd_diff(args) -> int:
    from lmspec.compiler.spec_diff import spec_diff

    old = resolve(args.old, args.old_set, args.model, "--old-set")
    new = resolve(args.new, args.new_set, args.model, "--new-set")
    check_seq_fits(args.seq, old.graph)
    check_seq_fits(args.seq, new.graph)
    result = spec_diff(old.graph, new.graph, old_stored=old.stored, seq=args.seq)
    if args.format == "json":
        print(json.dumps({"old": _side_dict(old), "new": _side_dict(new), **result.to_dict()}, indent=2))
    else:
        from lmspec.compiler.spec_diff_text import render
        print(render(side_label(old), side_label(new), result))
    return 1 if args.fail_on_breaking and result.breaking else 0


DIFF = Verb(
    "diff",
    ("Compare two models for checkpoint compatibility: parameters added, removed, reshaped and renamed, weight "
     "ties, hyper-parameters, parameter and FLOP counts, and whether checkpoints of OLD load into NEW. Each "
     "side is a spec file or a checkpoint; never imports torch."),
    diff_options, cmd_diff,
    examples="""examples:
  lmspec diff specs/tiny.arch my-tiny.arch                   # two specs
  lmspec diff runs/tiny specs/tiny.arch --new-set layers=6   # a checkpoint's own tensors against a spec
  lmspec diff specs/gpt2.arch specs/gpt2.arch --old-set layers=4 --new-set layers=6 --seq 512
  lmspec diff runs/tiny new.arch --format json --fail-on-breaking      # CI: exit 1 when breaking""",
)


def _side_dict(side: Side) -> dict:
    return {"path": side.path, "kind": side.kind, "model": side.graph.name, "file": side.graph.file}


def side_label(side: Side) -> str:
    note = f"; {side.note}" if side.note else ""
    return f"model {side.graph.name}  ({side.kind} {side.path}{note})"


