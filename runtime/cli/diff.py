"""`lmspec diff OLD NEW`: will checkpoints of OLD load into NEW? Each side is a spec or a checkpoint.

Never imports torch: a spec side is built by the compiler, a checkpoint side is read from its
meta.json (the spec record, rebuilt by compiler/rewrites.py `graph_from_record`) and the header of
its model.safetensors (names and shapes, no tensor data).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmspec.runtime.checkpoint.layout import CHECKPOINTS_DIR, META_FILE, MODEL_FILE, CheckpointError, find_checkpoint
from lmspec.runtime.cli.options import cli_overrides
from lmspec.runtime.cli.verb import Verb
from lmspec.runtime.errors import DiffInputError  # noqa: F401  (raised here, and imported from here)
from lmspec.runtime.errors import UsageError


@dataclass
class Side:
    path: str
    kind: str  # "spec" or "checkpoint"
    graph: object  # ModelGraph
    stored: dict | None = None  # a checkpoint's tensors: {name: shape}
    note: str = ""


def _find_step_dir(path: Path) -> Path:
    try:
        found = find_checkpoint(path)
    except CheckpointError as err:
        raise DiffInputError(str(err)) from None
    if found is None:
        raise DiffInputError(f"{path}: neither a spec file nor a checkpoint (expected {CHECKPOINTS_DIR}/step_NNNNNN/)")
    return found


def read_header(path: Path) -> tuple[dict[str, tuple], dict]:
    """({name: shape}, metadata) of a safetensors file, from its header only: the format's first 8
    bytes are the header's length (little-endian), then the header is JSON. Read with the standard
    library, since safetensors' reader needs numpy and `lmspec diff` installs without it."""
    if not path.is_file():
        raise DiffInputError(f"{path}: missing")
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= path.stat().st_size - 8:
                raise ValueError(f"header length {size} does not fit the file")
            header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None) or {}
        return {name: tuple(int(n) for n in entry["shape"]) for name, entry in header.items()}, dict(metadata)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DiffInputError(f"{path}: corrupt or unreadable ({err})") from None


def _read_checkpoint(path: Path) -> Side:
    from lmspec.compiler.rewrites import RewriteError, graph_from_record

    step_dir = _find_step_dir(path)
    meta_path = step_dir / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffInputError(f"{meta_path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffInputError(f"{meta_path}: corrupt ({err})") from None
    spec = meta.get("spec") if isinstance(meta, dict) else None
    if not isinstance(spec, dict) or not all(k in spec for k in ("file", "model", "sources", "overrides")):
        raise DiffInputError(f"{meta_path}: field 'spec' is missing or incomplete")
    stored, _ = read_header(step_dir / MODEL_FILE)
    note = ""
    if spec.get("base"):  # adapters only: the rest of the weights come from the base checkpoint
        if not isinstance(spec["base"], dict) or not isinstance(spec["base"].get("checkpoint"), str):
            raise DiffInputError(f"{meta_path}: field 'spec.base' is corrupt")
        base = Path(spec["base"]["checkpoint"])
        stored = read_header(base / MODEL_FILE)[0] | stored
        note = f"adapters on {base}"
    try:
        graph = graph_from_record(spec)
    except RewriteError as err:
        raise DiffInputError(f"{step_dir}: {err}") from None
    return Side(str(step_dir), "checkpoint", graph, stored, note)


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
        return _read_checkpoint(p)
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
    p.add_argument("--seq", type=int, help="sequence length for both FLOP counts (default: each model's context)")
    p.add_argument("--format", choices=["human", "json"], default="human",
                   help="json: one object with added/removed/reshaped/renamed/hyper/parameters/flops/breaking/reasons")
    p.add_argument("--fail-on-breaking", action="store_true",
                   help="exit 1 when checkpoints of OLD do not load into NEW")


def cmd_diff(args) -> int:
    from lmspec.compiler.spec_diff import spec_diff

    if args.seq is not None and args.seq < 1:
        raise UsageError("--seq must be positive")
    old = resolve(args.old, args.old_set, args.model, "--old-set")
    new = resolve(args.new, args.new_set, args.model, "--new-set")
    result = spec_diff(old.graph, new.graph, old_stored=old.stored, seq=args.seq)
    if args.format == "json":
        print(json.dumps({"old": _side_dict(old), "new": _side_dict(new), **result.to_dict()}, indent=2))
    else:
        print(render(old, new, result))
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


# ------------------------------------------------------------------------------------------- human form

LIMIT = 25  # rows per section, after folding repeat indices


def _shape(s) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _change(a, b, fmt) -> str:
    if a == b:
        return f"{fmt(a)} (unchanged)"
    if not a:
        return f"{fmt(a)} → {fmt(b)}"
    return f"{fmt(a)} → {fmt(b)}  ({'+' if b >= a else '-'}{fmt(abs(b - a))}, {100 * (b - a) / a:+.1f}%)"


def _flops(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= scale:
            return f"{v / scale:,.2f} {unit}"
    return f"{v:,.0f}"


def _section(lines: list[str], title: str, rows: list[str]) -> None:
    if not rows:
        return
    lines.append(title)
    lines += [f"  {r}" for r in rows[:LIMIT]]
    if len(rows) > LIMIT:
        lines.append(f"  … and {len(rows) - LIMIT} more (--format json lists every one)")


def render(old: Side, new: Side, d) -> str:
    from lmspec.compiler.spec_diff import fold_rows
    lines = []
    for label, side in (("old", old), ("new", new)):
        note = f"; {side.note}" if side.note else ""
        lines.append(f"{label}: model {side.graph.name}  ({side.kind} {side.path}{note})")

    hyper = [f"renamed  {a} → {b}" for a, b in d.hyper_renamed]
    hyper += [f"changed  {k}: {_value(a)} → {_value(b)}" for k, (a, b) in d.hyper_changed.items()]
    hyper += [f"added    {k} = {_value(v)}" for k, v in d.hyper_added.items()]
    hyper += [f"removed  {k} = {_value(v)}" for k, v in d.hyper_removed.items()]
    rows = [f"renamed  {a} → {b}  {_shape(s)}"
            for (a, b), s in fold_rows([((r.old, r.new), r.shape) for r in d.renamed])]
    rows += [f"reshaped {n}: {_shape(a)} → {_shape(b)}"
             for (n,), (a, b) in fold_rows([((r.name,), (r.old, r.new)) for r in d.reshaped])]
    rows += [f"added    {n}  {_shape(s)}" for (n,), s in fold_rows([((n,), s) for n, s in d.added])]
    rows += [f"removed  {n}  {_shape(s)}" for (n,), s in fold_rows([((n,), s) for n, s in d.removed])]
    rows += [f"untied   {t.name} (was tied to {t.to})" for t in d.untied]
    rows += [f"tied     {t.name} to {t.to}" for t in d.tied]
    lines.append("")
    _section(lines, "hyper-parameters:", hyper)
    _section(lines, "parameters:", rows)
    if not hyper and not rows:
        lines.append("no differences in hyper-parameters or parameters")
    lines.append("")
    lines.append(f"parameter count: {_change(d.params_old, d.params_new, lambda v: f'{v:,}')}")
    if d.flops_old is not None:
        at = f"seq {d.seq_new}" if d.seq_old == d.seq_new else f"seq {d.seq_old} → {d.seq_new}"
        lines.append(f"forward FLOPs per token ({at}): "
                     f"{_change(d.flops_old, d.flops_new, _flops)}")
    lines.append("")
    if d.breaking:
        lines.append("breaking: checkpoints of OLD do not load into NEW")
        lines += [f"  - {r}" for r in d.reasons]
    else:
        lines.append("compatible: checkpoints of OLD load into NEW")
    return "\n".join(lines)
