"""A SpecDiff in words, as `lmspec diff` prints it: hyper-parameters, parameters (repeat indices folded),
counts, and the verdict with its reasons."""
from __future__ import annotations

from .spec_diff import SpecDiff, fold_rows

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


def render(old: str, new: str, d: SpecDiff) -> str:
    """The diff as `lmspec diff` prints it; `old` and `new` say what each side is (a model and its file)."""
    lines = [f"old: {old}", f"new: {new}"]

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
