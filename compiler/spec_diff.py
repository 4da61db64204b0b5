"""Compare two models for checkpoint compatibility: can the weights saved for OLD load into NEW?

Pure comparison, no files and no torch: `spec_diff(old, new)` takes two ModelGraphs (or, for OLD,
the {name: shape} of the tensors a checkpoint holds) and returns a SpecDiff: parameters added,
removed, reshaped and renamed, tie changes, hyper-parameter changes, parameter and FLOP counts,
and a verdict.

The verdict follows what loading does (runtime/checkpoint/store.py `Checkpoint.load_model`, which is
safetensors' `load_model(strict=True)`): a checkpoint stores a tied weight once, under the first of
its names in sorted order (`lmspec train`, also under FSDP) or under the name of the parameter it
is tied to (`lmspec import hf`); loading then needs every name of NEW, or for a tied group exactly
one of its names, in the file with NEW's shape, and nothing in the file that NEW lacks. A spec
OLD is compatible only when both ways of storing its ties load; a checkpoint OLD is judged by the
tensors its file holds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from .analysis import flops_per_token, parameter_count
from .graph import ModelGraph

Shape = tuple  # of ints

# How checkpoints of a spec store a tied group: the name each writer keeps.
TRAINED = "trained"    # lmspec train / finetune / lora merge: safetensors' save_model, sorted first
IMPORTED = "imported"  # lmspec import hf: the parameter the others are tied to
STORAGE = {TRAINED: "checkpoints written by `lmspec train`", IMPORTED: "checkpoints written by `lmspec import hf`",
           "checkpoint": "the checkpoint"}


@dataclass
class Renamed:
    old: str
    new: str
    shape: Shape


@dataclass
class Reshaped:
    name: str
    old: Shape
    new: Shape


@dataclass
class Tie:
    name: str  # the tied parameter
    to: str    # the one it shares storage with


@dataclass
class LoadCheck:
    """What strict loading reports for one way OLD's checkpoints store their weights."""
    storage: str  # a key of STORAGE
    stored: dict[str, Shape]  # the tensors such a checkpoint holds
    missing: list[str] = field(default_factory=list)     # NEW needs them, the file lacks them
    unexpected: list[str] = field(default_factory=list)  # in the file, NEW has no place for them
    mismatched: list[str] = field(default_factory=list)  # in both, shapes differ

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


@dataclass
class SpecDiff:
    added: list[tuple[str, Shape]]
    removed: list[tuple[str, Shape]]
    reshaped: list[Reshaped]
    renamed: list[Renamed]
    untied: list[Tie]  # tied in OLD, separate in NEW
    tied: list[Tie]    # separate in OLD, tied in NEW
    hyper_added: dict[str, object]
    hyper_removed: dict[str, object]
    hyper_changed: dict[str, tuple[object, object]]
    hyper_renamed: list[tuple[str, str]]  # (old name, new name), the same value
    params_old: int
    params_new: int
    flops_old: float | None  # forward FLOPs per token; None without OLD's graph
    flops_new: float
    seq_old: int | None
    seq_new: int | None
    checks: list[LoadCheck]
    reasons: list[str]

    @property
    def breaking(self) -> bool:
        return not all(c.ok for c in self.checks)

    @property
    def params_change(self) -> int:
        return self.params_new - self.params_old

    def to_dict(self) -> dict:
        def pct(a, b):
            return None if not a or b is None else round(100.0 * (b - a) / a, 4)
        shape = list
        return {
            "added": [{"name": n, "shape": shape(s)} for n, s in self.added],
            "removed": [{"name": n, "shape": shape(s)} for n, s in self.removed],
            "reshaped": [{"name": r.name, "old": shape(r.old), "new": shape(r.new)} for r in self.reshaped],
            "renamed": [{"old": r.old, "new": r.new, "shape": shape(r.shape)} for r in self.renamed],
            "ties": {"untied": [{"name": t.name, "was_tied_to": t.to} for t in self.untied],
                     "tied": [{"name": t.name, "tied_to": t.to} for t in self.tied]},
            "hyper": {"added": self.hyper_added, "removed": self.hyper_removed,
                      "changed": {k: {"old": a, "new": b} for k, (a, b) in self.hyper_changed.items()},
                      "renamed": [{"old": a, "new": b} for a, b in self.hyper_renamed]},
            "parameters": {"old": self.params_old, "new": self.params_new, "change": self.params_change,
                           "percent": pct(self.params_old, self.params_new)},
            "flops": {"old": self.flops_old, "new": self.flops_new, "seq_old": self.seq_old, "seq_new": self.seq_new,
                      "change": None if self.flops_old is None else self.flops_new - self.flops_old,
                      "percent": pct(self.flops_old, self.flops_new)},
            "checks": [{"storage": c.storage, "ok": c.ok, "missing": c.missing, "unexpected": c.unexpected,
                        "mismatched": c.mismatched} for c in self.checks],
            "breaking": self.breaking,
            "reasons": self.reasons,
        }


# ------------------------------------------------------------------------------------------ weights

def param_shapes(graph: ModelGraph) -> dict[str, Shape]:
    """Every parameter name of the model (tied ones included), in graph order."""
    return {name: tuple(p.shape) for name, p in graph.params.items()}


def tie_groups(graph: ModelGraph) -> list[list[str]]:
    """Names that share one tensor, two or more per group, each group's owner (untied one) first."""
    root = {}

    def find(name):
        while graph.params[name].tied_to is not None and graph.params[name].tied_to in graph.params:
            name = graph.params[name].tied_to
        return name
    for name in graph.params:
        root.setdefault(find(name), []).append(name)
    return [[owner] + [n for n in names if n != owner] for owner, names in root.items() if len(names) > 1]


def stored_names(graph: ModelGraph, storage: str = TRAINED) -> dict[str, Shape]:
    """The tensors a checkpoint of `graph` holds: each tied group once, under the name that `storage`'s
    writer keeps (TRAINED: the first in sorted order, like safetensors' save_model; IMPORTED: the owner)."""
    shapes = param_shapes(graph)
    dropped = set()
    for group in tie_groups(graph):
        keep = min(group) if storage == TRAINED else group[0]
        dropped.update(n for n in group if n != keep)
    return {n: s for n, s in shapes.items() if n not in dropped}


def check_load(stored: Mapping[str, Shape], new: ModelGraph, storage: str = "checkpoint") -> LoadCheck:
    """safetensors' load_model(model, file, strict=True) on NEW's model with a file holding `stored`."""
    expected = param_shapes(new)
    check = LoadCheck(storage, dict(stored))
    missing = [n for n in expected if n not in stored]
    unexpected = [n for n in stored if n not in expected]
    check.mismatched = [n for n in expected if n in stored and tuple(stored[n]) != expected[n]]
    for group in tie_groups(new):  # a shared tensor: exactly one of its names must come from the file
        in_file = sorted(n for n in group if n in stored)
        keep = in_file[0] if in_file else min(group)
        for name in group:
            if name == keep:
                continue
            if name in missing:
                missing.remove(name)
            else:
                unexpected.append(name)  # a second copy of a tensor NEW shares: strict loading refuses it
    check.missing, check.unexpected = missing, unexpected
    return check


# ------------------------------------------------------------------------------------------ the diff

def spec_diff(old: ModelGraph | Mapping[str, Shape], new: ModelGraph, *,
              old_stored: Mapping[str, Shape] | None = None, seq: int | None = None) -> SpecDiff:
    """Compare OLD with NEW. `old` is a graph or, when only a checkpoint's tensors are known, their
    {name: shape}; `old_stored` the tensors OLD's checkpoint actually holds (without it, a graph OLD
    is judged by both ways its checkpoints may store ties). FLOPs at `seq`, else each model's context."""
    graph = old if isinstance(old, ModelGraph) else None
    if graph is None:
        old_stored = {n: tuple(s) for n, s in old.items()}
    # OLD's parameter names: what its checkpoint stores, with every name of a stored tied tensor
    if old_stored is not None:
        old_stored = {n: tuple(s) for n, s in old_stored.items()}
        old_shapes = dict(old_stored)
        # (without OLD's graph, NEW's ties say which names share a stored tensor)
        for group in (tie_groups(graph) if graph else tie_groups(new)):
            kept = [n for n in group if n in old_stored]
            if kept:
                old_shapes.update((n, old_stored[kept[0]]) for n in group if n not in old_shapes)
        checks = [check_load(old_stored, new, "checkpoint")]
    else:
        old_shapes = param_shapes(graph)
        ways = [TRAINED] + ([IMPORTED] if stored_names(graph, IMPORTED) != stored_names(graph, TRAINED) else [])
        checks = [check_load(stored_names(graph, w), new, w) for w in ways]
    new_shapes = param_shapes(new)

    removed = [(n, s) for n, s in old_shapes.items() if n not in new_shapes]
    added = [(n, s) for n, s in new_shapes.items() if n not in old_shapes]
    reshaped = [Reshaped(n, old_shapes[n], s) for n, s in new_shapes.items() if n in old_shapes and old_shapes[n] != s]
    renamed = _match_renames(removed, added)
    gone = {r.old for r in renamed} | {r.new for r in renamed}
    removed = [(n, s) for n, s in removed if n not in gone]
    added = [(n, s) for n, s in added if n not in gone]

    old_groups = _group_of(tie_groups(graph)) if graph else {}
    new_groups = _group_of(tie_groups(new))
    untied, tied = [], []
    if graph is not None:
        for name, p in graph.params.items():
            if p.tied_to and name in new_shapes and p.tied_to in new_shapes \
                    and new_groups.get(name) is not new_groups.get(p.tied_to, ()):
                untied.append(Tie(name, p.tied_to))
    for name, p in new.params.items():
        if p.tied_to and name in old_shapes and p.tied_to in old_shapes \
                and (name not in old_groups or old_groups.get(name) is not old_groups.get(p.tied_to)):
            tied.append(Tie(name, p.tied_to))

    old_hyper = dict(graph.hyper) if graph else {}
    h_removed = {k: v for k, v in old_hyper.items() if k not in new.hyper}
    h_added = {k: v for k, v in new.hyper.items() if k not in old_hyper}
    h_changed = {k: (v, new.hyper[k]) for k, v in old_hyper.items() if k in new.hyper and not _same(v, new.hyper[k])}
    h_renamed = []
    if graph is not None:
        for k, v in list(h_removed.items()):
            was = [a for a, w in h_removed.items() if _same(w, v)]
            now = [a for a, w in h_added.items() if _same(w, v)]
            if len(was) == 1 and len(now) == 1:
                h_renamed.append((k, now[0]))
        for a, b in h_renamed:
            del h_removed[a], h_added[b]

    seq_old = (seq or graph.context) if graph else None
    seq_new = seq or new.context
    result = SpecDiff(
        added=added, removed=removed, reshaped=reshaped, renamed=renamed, untied=untied, tied=tied,
        hyper_added=h_added if graph else {}, hyper_removed=h_removed, hyper_changed=h_changed,
        hyper_renamed=h_renamed,
        params_old=parameter_count(graph) if graph else sum(_numel(s) for s in old_stored.values()),
        params_new=parameter_count(new),
        flops_old=flops_per_token(graph, seq_old) if graph else None, flops_new=flops_per_token(new, seq_new),
        seq_old=seq_old, seq_new=seq_new, checks=checks, reasons=[],
    )
    result.reasons = _reasons(result)
    return result


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _group_of(groups: list[list[str]]) -> dict[str, list[str]]:
    return {name: group for group in groups for name in group}


def _match_renames(removed: list[tuple[str, Shape]], added: list[tuple[str, Shape]]) -> list[Renamed]:
    """Pair removed with added parameters of the same shape and the same last name part (`weight`,
    `bias`): where a (shape, suffix) has as many removed as added, they pair in graph order."""
    groups: dict[tuple, tuple[list, list]] = {}
    for i, items in enumerate((removed, added)):
        for name, shape in items:
            groups.setdefault((shape, name.rsplit(".", 1)[-1]), ([], []))[i].append(name)
    pairs = []
    for (shape, _), (was, now) in groups.items():
        if was and len(was) == len(now):
            pairs += [Renamed(a, b, shape) for a, b in zip(was, now)]
    order = {name: i for i, (name, _) in enumerate(added)}
    return sorted(pairs, key=lambda r: order[r.new])


# ---------------------------------------------------------------------------------------- the reasons

def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(fold_names(names)[:limit])
    more = len(fold_names(names)) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def _check_reasons(d: SpecDiff, c: LoadCheck) -> list[str]:
    missing, unexpected = set(c.missing), set(c.unexpected)
    out, explained = [], set()
    if c.mismatched:  # told by parameter name, the same for every way of storing ties
        rows = fold_rows([((r.name,), (r.old, r.new)) for r in d.reshaped]) or [((n,), None) for n in c.mismatched]
        shown = [f"{n} {_fmt(s[0])} → {_fmt(s[1])}" if s else n for (n,), s in rows]
        count = len(d.reshaped) or len(c.mismatched)
        out.append(f"{count} parameter{'s' * (count != 1)} change shape: " + "; ".join(shown[:3])
                   + (f" and {len(shown) - 3} more" if len(shown) > 3 else ""))
    renames = [r for r in d.renamed if r.new in missing or r.old in unexpected]
    if renames:
        out.append(f"renamed {', '.join(f'{r.old} → {r.new}' for r in renames[:3])}"
                   + (f" and {len(renames) - 3} more" if len(renames) > 3 else "")
                   + ": a checkpoint's tensors would need these names mapped")
        explained |= {r.new for r in renames} | {r.old for r in renames}
    for t in d.untied:
        if {t.name, t.to} & missing:
            out.append(f"untied {t.name} from {t.to}: OLD's checkpoints store the two as one tensor, "
                       f"NEW expects both")
            explained |= {t.name, t.to}
    for t in d.tied:
        if {t.name, t.to} & unexpected:
            extra = sorted(n for n in (t.name, t.to) if n in unexpected)
            out.append(f"tied {t.name} to {t.to}: OLD's checkpoints hold both tensors and strict loading refuses "
                       f"the second ({', '.join(extra)})")
            explained |= {t.name, t.to}
    added = [n for n, _ in d.added if n in missing and n not in explained]
    if added:
        out.append(f"NEW adds {len(added)} parameter{'s' * (len(added) != 1)} OLD's checkpoints lack: {_names(added)}")
    removed = [n for n, _ in d.removed if n in unexpected and n not in explained]
    if removed:
        out.append(f"NEW drops {len(removed)} parameter{'s' * (len(removed) != 1)} OLD's checkpoints hold: "
                   f"{_names(removed)}")
    explained |= set(added) | set(removed)
    rest = [n for n in c.missing if n not in explained]
    if rest:
        out.append(f"NEW expects {_names(rest)}, which OLD's checkpoints do not hold under that name")
    rest = [n for n in c.unexpected if n not in explained]
    if rest:
        out.append(f"OLD's checkpoints hold {_names(rest)}, which NEW does not take")
    return out


def _reasons(d: SpecDiff) -> list[str]:
    """Each failing check's reasons; those that hold for only some ways of storing ties say which."""
    per = [(c, _check_reasons(d, c)) for c in d.checks if not c.ok]
    if not per:
        return []
    common = [r for r in per[0][1] if all(r in reasons for _, reasons in per)] if len(per) == len(d.checks) else []
    out = list(common)
    for c, reasons in per:
        out += [f"{r} ({STORAGE[c.storage]})" for r in reasons if r not in common]
    return out


# ----------------------------------------------------------------------------------- compact listing

def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


_INDEX = re.compile(r"(?<![^.])(\d+)(?![^.])")


def fold_rows(rows: list[tuple[tuple[str, ...], object]]) -> list[tuple[tuple[str, ...], object]]:
    """Fold rows whose names differ only in their first numeric part (a repeat index), with the same
    payload, into one: ('block.{0-3}.ln.weight',). Every name of a row must share that index."""
    folded: dict[tuple, list[int]] = {}
    order = []
    for names, payload in rows:
        found = [_INDEX.search(n) for n in names]
        if all(found) and len({m.group(1) for m in found}) == 1:
            patterns = tuple(n[:m.start()] + "{}" + n[m.end():] for n, m in zip(names, found))
            key = (patterns, repr(payload))
            if key not in folded:
                folded[key] = []
                order.append((key, payload))
            folded[key].append(int(found[0].group(1)))
        else:
            key = (names, repr(payload), "plain")
            folded[key] = []
            order.append((key, payload))
    out = []
    for key, payload in order:
        indices = folded[key]
        if len(key) == 3:
            out.append((key[0], payload))
        elif len(indices) == 1:
            out.append((tuple(p.replace("{}", str(indices[0]), 1) for p in key[0]), payload))
        else:
            out.append((tuple(p.replace("{}", "{" + _ranges(indices) + "}", 1) for p in key[0]), payload))
    return out


def fold_names(names: list[str]) -> list[str]:
    return [n[0] for n, _ in fold_rows([((n,), None) for n in names])]


def _ranges(indices: list[int]) -> str:
    indices = sorted(set(indices))
    parts, start = [], indices[0]
    for a, b in zip(indices, indices[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)
