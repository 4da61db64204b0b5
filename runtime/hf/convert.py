"""Hugging Face model directories <-> lmspec checkpoints, through the tables of hf_families.

    import: config.json -> family -> hyper-parameters checked against the spec -> every parameter
            the spec declares planned as pieces of HF tensors (shapes checked from the headers
            alone) -> model.safetensors written tensor by tensor -> checkpoints/step_000000/
    export: the same plan run backwards: each lmspec tensor read, cut into its HF pieces, written.

Memory: nothing is loaded whole. The source files are opened (memory-mapped) for one output
tensor at a time and closed after it, and the output file is written by a streaming writer of
the safetensors format (header first, from the planned names, dtypes and shapes; then the bytes
of each tensor as it is produced), so the peak is about one output tensor (for a mixture of
experts, one layer's stacked experts), not a copy of the model.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from lmspec.runtime.hf.families import (
    FAMILIES,
    MODEL_TYPES,
    Cat,
    Family,
    Hyper,
    Stack,
    T,
    family_for_model_type,
    fill_template,
    spec_literal,
    template_for,
)
from lmspec.runtime.errors import HFError  # noqa: F401  (raised here, and imported from here)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
# Small files carried from the source directory into the checkpoint and back out by `export hf`.
CARRIED_FILES = ("generation_config.json",)
CARRIED_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                           "chat_template.json")
_CARRY_LIMIT = 1 << 20

# safetensors dtype names -> (torch dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
_TORCH_TO_ST = {name: st for st, (name, _) in DTYPES.items()}


# ------------------------------------------------------------------------------------ config.json

def read_config(directory: Path) -> dict:
    if not directory.exists():
        raise HFError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise HFError(f"{directory}: not a directory (expected a Hugging Face model directory)")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise HFError(f"{path}: missing (a Hugging Face model directory holds config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(config, dict):
        raise HFError(f"{path}: not a JSON object")
    return config


def family_of(config: dict, where: str = CONFIG_FILE) -> tuple[str, Family]:
    model_type = config.get("model_type")
    family = family_for_model_type(model_type) if isinstance(model_type, str) else None
    if family is None:
        known = ", ".join(sorted(MODEL_TYPES))
        raise HFError(f"{where}: model_type {model_type!r} is not supported (supported: {known})")
    return model_type, family


_MISSING = object()


def config_get(config: dict, key: str):
    """The value at a dotted key path, or _MISSING."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _first(config: dict, keys: tuple[str, ...]) -> tuple[str, object]:
    """(key, value) of the first key present with a value that is not null, else (keys[0], _MISSING)."""
    for key in keys:
        value = config_get(config, key)
        if value is not _MISSING and value is not None:
            return key, value
    return keys[0], _MISSING


def _set_path(config: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        config = config.setdefault(part, {})
    config[parts[-1]] = value


def hyper_from_config(family: Family, config: dict) -> dict[str, tuple[object, str]]:
    """Every hyper-parameter of the family's table: name -> (value or None, the config key read)."""
    found: dict[str, tuple[object, str]] = {}
    for h in family.hyper:
        key, value = _first(config, h.key_list)
        if h.when is not None:
            _, cond = _first(config, h.when.keys)
            if (h.when.default if cond is _MISSING else cond) != h.when.value:
                found[h.name] = (None, key)
                continue
        if value is _MISSING:
            value = _default(h, config)
        found[h.name] = (value, key)
    return found


def _default(h: Hyper, config: dict):
    if isinstance(h.default, str):  # an expression of other config keys
        try:
            return evaluate(h.default, {k: v for k, v in config.items() if isinstance(v, (int, float))})
        except (KeyError, ValueError, ZeroDivisionError):
            return None
    return h.default


def check_requires(family: Family, config: dict) -> list[str]:
    errors = []
    for r in family.requires:
        key, value = _first(config, r.key_list)
        if value is _MISSING:
            value = r.default
        if not any(_same(value, a) for a in r.allowed):
            expected = " or ".join(json.dumps(a) for a in r.allowed)
            errors.append(f"{key} = {json.dumps(value)} is not supported by the {family.name} family "
                          f"(expected {expected})")
    return errors


def _op_arg_values(spec, graph) -> list:
    """The distinct values of one op argument over the graph's nodes, in order."""
    seen = []
    for _, data in graph.nodes():
        if data.get("op") == spec.op:
            value = data["args"].get(spec.arg)
            if not any(_same(value, v) for v in seen):
                seen.append(value)
    return seen


def check_op_args(family: Family, config: dict, graph) -> list[str]:
    """Disagreements between op arguments in the spec (an activation, an eps) and config.json."""
    errors = []
    for spec in family.op_args:
        key, value = _first(config, spec.key_list)
        if value is _MISSING:
            value = spec.default
        for used in _op_arg_values(spec, graph):
            if spec.values is None:
                accepted = (used,)
            elif used in spec.values:
                accepted = spec.values[used]
            else:
                errors.append(f"the spec's {spec.op}({spec.arg}={_show(used)}) has no {key} "
                              f"in the {family.name} family")
                continue
            if not any(_same(value, a) for a in accepted):
                errors.append(f"config.json {key} = {_show(value)} but the spec's {spec.op} has "
                              f"{spec.arg}={_show(used)} (that is {key} = {_show(accepted[0])})")
    return errors


def check_hyper(family: Family, config: dict, graph) -> list[str]:
    """Disagreements between config.json and the spec's hyper-parameters, one phrase each."""
    errors = []
    derived = hyper_from_config(family, config)
    for h in family.hyper:
        value, key = derived[h.name]
        if h.name in graph.hyper:
            spec_value = graph.hyper[h.name]
            if value is None:
                if h.needed:
                    errors.append(f"config.json has no {key}, but the spec has {h.name} = {_show(spec_value)}")
                else:
                    errors.append(f"config.json has no {key} for the spec's {h.name} = {_show(spec_value)}")
            elif not _same(value, spec_value):
                errors.append(f"config.json {key} = {_show(value)} but the spec has {h.name} = {_show(spec_value)}")
        elif h.needed and value is not None:
            errors.append(f"config.json {key} = {_show(value)} but the spec has no {h.name} hyper-parameter")
    head, tie_key, tie_default = family.tie
    if head in graph.params:
        _, tied = _first(config, (tie_key,))
        tied = tie_default if tied is _MISSING else bool(tied)
        spec_tied = graph.params[head].tied_to is not None
        if tied != spec_tied:
            how = f"ties {head} to {graph.params[head].tied_to}" if spec_tied else f"has its own {head}"
            errors.append(f"config.json {tie_key} = {json.dumps(tied)} but the spec {how}")
    return errors


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, str)) or value is None else str(value)


# ------------------------------------------------------------------------ small arithmetic on names

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.truediv}


def evaluate(expr: str, names: dict):
    """`heads * head_dim`-style arithmetic over `names` (KeyError names a missing one)."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression {expr!r}")
    return walk(ast.parse(expr, mode="eval"))


# ----------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Piece:
    """One HF tensor: its name, its shape in the HF file, where it sits in the lmspec tensor."""
    hf: str
    shape: tuple[int, ...]
    index: tuple = ()
    transpose: bool = False


@dataclass
class Planned:
    """One lmspec parameter and the HF pieces it is made of."""
    name: str
    shape: tuple[int, ...]
    source: object
    layer: str | None
    pieces: list[Piece]


def _fmt(template: str, i: str | None, j: int | None = None) -> str:
    if i is not None:
        template = template.replace("{i}", i)
    if j is not None:
        template = template.replace("{j}", str(j))
    return template


def _sizes(cat: Cat, total: int, names: dict, param: str) -> list[int]:
    if cat.parts is None:
        weights = [1] * len(cat.names)
    else:
        try:
            weights = [evaluate(p, names) for p in cat.parts]
        except KeyError as err:
            raise HFError(f"cannot split {param}: the spec has no hyper-parameter {err.args[0]}") from None
    whole = sum(weights)
    if whole <= 0 or any(total * w % whole for w in weights):
        raise HFError(f"cannot split {param} of {total} rows in the proportions {cat.parts or weights}")
    return [total * w // whole for w in weights]


def pieces_of(source, shape: tuple[int, ...], layer: str | None, names: dict, param: str,
              fused: bool = False) -> list[Piece]:
    if isinstance(source, str):
        return [Piece(_fmt(source, layer), shape)]
    if isinstance(source, T):
        if len(shape) != 2:
            raise HFError(f"{param}: a transposed parameter must be a matrix, the spec's is {list(shape)}")
        return [Piece(_fmt(source.name, layer), (shape[1], shape[0]), (), True)]
    if isinstance(source, Cat):
        out, start = [], 0
        for name, size in zip(source.names, _sizes(source, shape[0], names, param)):
            out.append(Piece(_fmt(name, layer), (size, *shape[1:]), (slice(start, start + size),)))
            start += size
        return out
    if isinstance(source, Stack):
        if fused:
            return [Piece(_fmt(source.fused, layer), shape)]
        out = []
        for j in range(shape[0]):
            for p in pieces_of(source.inner, shape[1:], layer, names, param):
                out.append(Piece(_fmt(p.hf, None, j), p.shape, (j, *p.index), p.transpose))
        return out
    raise TypeError(f"unknown table entry {source!r}")


def _row_patterns(family: Family):
    return [(re.compile("^" + re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), source)
            for name, source in family.params]


def match_params(family: Family, graph) -> list[tuple[str, object, object, str | None]]:
    """(name, param, table source, layer) for every parameter of the spec that the table holds;
    HFError for an owned parameter the table does not know (the spec is of another family)."""
    rows = _row_patterns(family)
    found = []
    for name, param in graph.params.items():
        match = next(((m, src) for pattern, src in rows if (m := pattern.match(name))), None)
        if match is None:
            if param.tied_to is not None:
                continue
            raise HFError(f"the spec's parameter {name} has no Hugging Face counterpart in the "
                          f"{family.name} table (runtime/hf/families.py): is {graph.file} a {family.name} model?")
        found.append((name, param, match[1], match[0].groupdict().get("i")))
    return found


def plan(family: Family, graph) -> tuple[list[Planned], list[Planned]]:
    """(the owned parameters, the tied ones) of the spec, each matched to its table row."""
    names = {k: v for k, v in graph.hyper.items() if isinstance(v, (int, float))}
    if "heads" in names:
        names.setdefault("kv_heads", names["heads"])
    owned, tied = [], []
    for name, param, source, layer in match_params(family, graph):
        shape = tuple(param.shape)
        if not all(isinstance(d, int) for d in shape):
            raise HFError(f"the spec's parameter {name} has a symbolic shape {list(shape)}")
        entry = Planned(name, shape, source, layer, pieces_of(source, shape, layer, names, name))
        (tied if param.tied_to is not None else owned).append(entry)
    return owned, tied


def infer_family(graph) -> Family:
    """The first family whose table holds every parameter the spec owns."""
    for family in FAMILIES.values():
        try:
            owned, _ = plan(family, graph)
        except HFError:
            continue
        if owned:
            return family
    raise HFError(f"the parameters of model {graph.name} match no Hugging Face family's table "
                  f"({', '.join(FAMILIES)}); name one with --model-type")


# ---------------------------------------------------------------------------- reading safetensors

class SafetensorsDir:
    """The tensors of a Hugging Face directory (one file or shards), indexed from their headers."""

    def __init__(self, directory: Path):
        from safetensors import SafetensorError, safe_open

        self.directory = directory
        files = self._files(directory)
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for path in files:
            try:
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        if key in self.where:
                            raise HFError(f"{path}: tensor {key} is also in {self.where[key]}")
                        self.where[key] = path
                        self.meta[key] = (sl.get_dtype(), tuple(sl.get_shape()))
            except (SafetensorError, OSError) as err:
                raise HFError(f"{path}: corrupt or unreadable safetensors file ({err})") from None
        for key, (dtype, _) in self.meta.items():
            if dtype not in DTYPES:
                raise HFError(f"{self.where[key]}: tensor {key} has dtype {dtype}, which lmspec does not read")

    @staticmethod
    def _files(directory: Path) -> list[Path]:
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise HFError(f"{index}: not a safetensors index ({err})") from None
            files = [directory / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise HFError(f"{index}: names shard {missing[0]}, which is missing")
            return files
        if (directory / WEIGHTS_FILE).is_file():
            return [directory / WEIGHTS_FILE]
        shards = sorted(directory.glob("*.safetensors"))
        if shards:
            return shards
        legacy = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = f" ({legacy[0]} is a pickle checkpoint: convert it to safetensors first)" if legacy else ""
        raise HFError(f"{directory}: holds no {WEIGHTS_FILE} (nor {INDEX_FILE} with its shards){hint}")

    def resolve(self, name: str, aliases: tuple[tuple[str, str], ...]) -> str | None:
        if name in self.meta:
            return name
        for prefix, replacement in aliases:
            if name.startswith(prefix) and replacement + name[len(prefix):] in self.meta:
                return replacement + name[len(prefix):]
        return None

    def reader(self) -> _Reader:
        return _Reader(self)


class _Reader:
    """Opens the files it needs on first use and closes them all on exit (unmapping their pages)."""

    def __init__(self, source: SafetensorsDir):
        self.source = source
        self.handles: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()

    def get(self, name: str):
        from safetensors import SafetensorError, safe_open

        path = self.source.where[name]
        try:
            if path not in self.handles:
                handle = safe_open(str(path), "pt")
                handle.__enter__()
                self.handles[path] = handle
            return self.handles[path].get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise HFError(f"{path}: cannot read tensor {name} ({err})") from None


# ---------------------------------------------------------------------------- writing safetensors

class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header from the planned (name, dtype, shape)
    list first, then each tensor's bytes in that order, so only one tensor is in memory at a time."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in entries:
            if name in header:
                raise ValueError(f"tensor {name} is planned twice")
            size = math.prod(shape) * DTYPES[dtype][1]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as safetensors does
        self.path = path
        self.entries = list(entries)
        self.done = 0
        self.size = 8 + len(raw) + offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def write(self, name: str, tensor) -> None:
        import torch

        expected = self.entries[self.done]
        got = (name, _TORCH_TO_ST.get(str(tensor.dtype).removeprefix("torch.")), tuple(tensor.shape))
        if got != expected:
            raise ValueError(f"writing {got}, but the header planned {expected}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self.file.write(flat.view(torch.uint8).numpy().data)
        self.done += 1

    def close(self) -> None:
        if self.done != len(self.entries):
            raise ValueError(f"{self.path}: {len(self.entries) - self.done} planned tensors were not written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        self.file.close()


def _torch_dtype(st_dtype: str):
    import torch
    return getattr(torch, DTYPES[st_dtype][0])


# ------------------------------------------------------------------------------------- directories

def refuse_non_empty(path: Path, what: str) -> None:
    from lmspec.runtime.errors import UsageError
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists and is not empty; {what} is never written over an existing one")


def _temporary_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _move_into_place(tmp: Path, final: Path) -> None:
    from lmspec.runtime.atomic import fsync_dir
    fsync_dir(tmp)
    if final.is_dir():  # empty (checked before): a rename onto it would also do, but be explicit
        final.rmdir()
    os.rename(tmp, final)
    fsync_dir(final.parent)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, value) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n")


def _model_name(directory: Path) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", directory.resolve().name).strip("_").lower() or "model"
    return name if name[0].isalpha() else "m_" + name


# ------------------------------------------------------------------------------------------- import

def spec_text_from_config(directory: Path, config: dict, model_type: str, family: Family) -> str:
    _, rope_type = _first(config, ("rope_parameters.rope_type", "rope_scaling.rope_type", "rope_scaling.type"))
    template = template_for(model_type, family, None if rope_type is _MISSING else str(rope_type))
    if template is None:
        raise HFError(f"no spec template for model_type {model_type} yet; write a spec and pass --spec")
    values = {name: value for name, (value, _) in hyper_from_config(family, config).items()}
    values.update(name=_model_name(directory), source=directory.resolve().name)
    text, missing = fill_template(template, values)
    if missing:
        raise HFError(f"{directory / CONFIG_FILE}: has no value for the template's {', '.join(sorted(set(missing)))}")
    return text


def _find_tokenizer(directory: Path, given: str | None):
    from lmspec.runtime.data.tokenizer import FileTokenizer, TokenizerError

    if given:
        return FileTokenizer.from_path(given), False
    try:
        return FileTokenizer.from_path(directory), True
    except TokenizerError:
        if any((directory / n).exists() for n in (TOKENIZER_FILE, "vocab.json", "encoder.json")):
            raise  # there is one, but it is broken: say why
        raise HFError(f"{directory} holds no tokenizer (tokenizer.json, vocab.json + merges.txt, or encoder.json + "
                      f"vocab.bpe), and a checkpoint needs one: name it with --tokenizer PATH") from None


def _carried(directory: Path, tokenizer_from_dir: bool) -> dict[str, str]:
    names = CARRIED_FILES + (CARRIED_TOKENIZER_FILES if tokenizer_from_dir else ())
    files = {}
    for name in names:
        path = directory / name
        if path.is_file() and path.stat().st_size <= _CARRY_LIMIT:
            try:
                files[name] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                pass
    return files


def _set_hint(family: Family, config: dict, graph) -> str:
    """`(--set layers=2 ...)` when the mismatches are hyper-parameter values a --set can fix."""
    sets = []
    for name, (value, _) in hyper_from_config(family, config).items():
        if name in graph.hyper and value is not None and not _same(value, graph.hyper[name]):
            sets.append(f"--set {name}={spec_literal(value)}")
    return f" (to size the spec like config.json: {' '.join(sets)})" if sets else ""


def _one_line(errors: list[str], prefix: str) -> str:
    return prefix + "; ".join(errors)


def import_hf(directory: str | os.PathLike, out: str | os.PathLike, spec: str | None = None,
              overrides: dict | None = None, model: str | None = None, emit_spec: str | None = None,
              tokenizer: str | None = None, log=print) -> Path:
    """Import the Hugging Face model in `directory` as an lmspec checkpoint in the run directory `out`."""
    from lmspec.compiler import load_spec

    from lmspec.runtime.checkpoint.store import (
        CHECKPOINTS_DIR,
        FORMAT_VERSION,
        LATEST_FILE,
        META_FILE,
        MODEL_FILE,
        step_dir_name,
    )
    from lmspec.compiler.rewrites import spec_record
    from lmspec.runtime.errors import UsageError

    directory, out = Path(directory), Path(out)
    overrides = overrides or {}
    if (spec is None) == (emit_spec is None):
        raise UsageError("give either --spec SPEC or --emit-spec FILE")
    config = read_config(directory)
    model_type, family = family_of(config, str(directory / CONFIG_FILE))
    refuse_non_empty(out, "a checkpoint")
    problems = check_requires(family, config)
    if problems:
        raise HFError(_one_line(problems, f"{directory / CONFIG_FILE}: "))

    emitted = None
    if emit_spec is not None:
        emitted = spec_text_from_config(directory, config, model_type, family)
        target = Path(emit_spec)
        if target.exists() and (not target.is_file() or target.read_text(encoding="utf-8") != emitted):
            raise UsageError(f"--emit-spec {target}: the file exists; remove it or choose another name")
        spec = os.path.normpath(emit_spec)
        graph = load_spec(spec, overrides, model, sources={spec: emitted})
    else:
        graph = load_spec(spec, overrides, model)

    match_params(family, graph)  # a spec of another family: say that, not every size that differs
    problems = check_hyper(family, config, graph) + check_op_args(family, config, graph)
    if problems:
        hint = _set_hint(family, config, graph)
        raise HFError(_one_line(problems, f"{directory / CONFIG_FILE} does not match {graph.file}: ") + hint)

    tok, tokenizer_from_dir = _find_tokenizer(directory, tokenizer)
    vocab = graph.hyper.get("vocab")
    if isinstance(vocab, int) and tok.vocab_size > vocab:
        raise HFError(f"the tokenizer ({tok.source}) has {tok.vocab_size} tokens but the model predicts {vocab}")

    source = SafetensorsDir(directory)
    owned, tied = plan(family, graph)
    entries, layouts = _check_source(family, source, owned, tied, directory)
    params = sum(math.prod(p.shape) for p in owned)
    log(f"importing {model_type} ({family.name} family) from {directory}: {len(owned)} tensors, {params:,} parameters"
        f" -> {graph.name} ({graph.file})")

    tmp = _temporary_dir(out)
    try:
        step = tmp / CHECKPOINTS_DIR / step_dir_name(0)
        step.mkdir(parents=True)
        writer = SafetensorsWriter(step / MODEL_FILE, entries, {"format": "pt"})
        try:
            for planned, pieces, (_, dtype, _) in zip(owned, layouts, entries):
                writer.write(planned.name, _assemble(source, planned, pieces, dtype))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        meta = {
            "format": FORMAT_VERSION, "step": 0, "train_config": {}, "metrics": {},
            "tokenizer": tok.to_json(),
            "spec": spec_record(graph, overrides),
            "hf": {"model_type": model_type, "family": family.name, "source": str(directory.resolve()),
                   "config": config, "files": _carried(directory, tokenizer_from_dir)},
        }
        _write_json(step / META_FILE, meta)
        _write_text(tmp / CHECKPOINTS_DIR / LATEST_FILE, step.name + "\n")
        if emitted is not None:
            from lmspec.runtime.atomic import write_text_atomically
            write_text_atomically(emit_spec, emitted)
            log(f"wrote {emit_spec}")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = (out / CHECKPOINTS_DIR / step.name / MODEL_FILE).stat().st_size
    log(f"wrote {out / CHECKPOINTS_DIR / step.name} ({size / 2**20:.1f} MiB); tokenizer: {tok.source} "
        f"({tok.vocab_size} tokens)")
    return out


def _check_source(family: Family, source: SafetensorsDir, owned: list[Planned], tied: list[Planned],
                  directory: Path):
    """The output header entries and, per parameter, its pieces resolved to the source's names.
    Every piece must exist with the planned shape; every source tensor must be used or ignorable."""
    errors: list[str] = []
    used: set[str] = set()
    entries, layouts = [], []
    for planned in owned:
        pieces = planned.pieces
        if isinstance(planned.source, Stack) and planned.source.fused and pieces:
            fused = pieces_of(planned.source, planned.shape, planned.layer, {}, planned.name, fused=True)
            if source.resolve(pieces[0].hf, family.aliases) is None and \
                    source.resolve(fused[0].hf, family.aliases) is not None:
                pieces = fused
        resolved, dtypes = [], []
        for piece in pieces:
            name = source.resolve(piece.hf, family.aliases)
            if name is None:
                errors.append(f"tensor {piece.hf} is missing (the spec's {planned.name} needs it)")
                continue
            dtype, shape = source.meta[name]
            if shape != piece.shape:
                errors.append(f"tensor {name} has shape {list(shape)} but the spec's {planned.name} needs "
                              f"{list(piece.shape)}")
            used.add(name)
            dtypes.append(dtype)
            resolved.append((name, piece))
        layouts.append(resolved)
        common = dtypes[0] if dtypes and all(d == dtypes[0] for d in dtypes) else "F32"
        entries.append((planned.name, common, planned.shape))
    ignorable = {n for t in tied for p in t.pieces if (n := source.resolve(p.hf, family.aliases))}
    patterns = [re.compile(p) for p in family.ignore]
    unused = sorted(n for n in source.meta if n not in used and n not in ignorable
                    and not any(p.match(n) for p in patterns))
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise HFError(f"{directory}: {errors[0]}{more}")
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        raise HFError(f"{directory}: {len(unused)} tensors have no place in the spec: {shown}")
    return entries, layouts


def _assemble(source: SafetensorsDir, planned: Planned, resolved: list[tuple[str, Piece]], st_dtype: str):
    """One lmspec tensor built from its pieces; the source files are open only meanwhile."""
    import torch

    dtype = _torch_dtype(st_dtype)
    with source.reader() as reader:
        if len(resolved) == 1 and resolved[0][1].index == () and not resolved[0][1].transpose:
            tensor = reader.get(resolved[0][0])
            return tensor if tensor.dtype == dtype else tensor.to(dtype)
        out = torch.empty(planned.shape, dtype=dtype)
        for name, piece in resolved:
            part = reader.get(name)
            out[piece.index].copy_(part.t() if piece.transpose else part)
            del part
        return out


# ------------------------------------------------------------------------------------------- export

def _hf_record(step_dir: Path) -> dict | None:
    from lmspec.runtime.checkpoint.store import META_FILE
    try:
        meta = json.loads((step_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    record = meta.get("hf") if isinstance(meta, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("config"), dict) else None


def config_for_export(family: Family, model_type: str, graph, dtype: str, eot_id: int | None) -> dict:
    """config.json for a checkpoint that was not imported: the family's base plus the spec's values."""
    config = {"architectures": [family.architectures[model_type]], "model_type": model_type}
    config.update(json.loads(json.dumps(family.base_config.get(model_type, {}))))
    for h in family.hyper:
        if h.name in graph.hyper:
            _set_path(config, h.key_list[0], graph.hyper[h.name])
            if h.when is not None:
                _set_path(config, h.when.keys[0], h.when.value)
    for spec in family.op_args:
        used = _op_arg_values(spec, graph)
        if used:
            mapped = spec.values.get(used[0], (used[0],)) if spec.values is not None else (used[0],)
            _set_path(config, spec.key_list[0], mapped[0])
    config["bos_token_id"] = config["eos_token_id"] = eot_id
    head, tie_key, _ = family.tie
    config[tie_key] = head in graph.params and graph.params[head].tied_to is not None
    config["dtype"] = dtype
    return config


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, model_type: str | None = None,
              log=print) -> Path:
    """Write the checkpoint as a Hugging Face model directory `out` (config.json, model.safetensors,
    tokenizer.json): the inverse of import_hf, bit for bit."""
    from safetensors import SafetensorError, safe_open

    from lmspec.runtime.checkpoint.store import MODEL_FILE, CheckpointError, load_checkpoint
    from lmspec.compiler.rewrites import graph_from_record
    from lmspec.compiler.vocab_padding import unpad, unpadded_record, unpadded_shapes
    from lmspec.runtime.data.tokenizer import FileTokenizer, load_tokenizer
    from lmspec.runtime.errors import UsageError

    out = Path(out)
    refuse_non_empty(out, "a model directory")
    ckpt = load_checkpoint(checkpoint)
    graph = graph_from_record(unpadded_record(ckpt.spec))  # a vocabulary padded for training: the real one
    padded_shapes = unpadded_shapes(ckpt.spec)
    record = _hf_record(ckpt.path)
    if model_type is not None:
        family = family_for_model_type(model_type)
        if family is None:
            raise UsageError(f"--model-type {model_type}: not one of {', '.join(sorted(MODEL_TYPES))}")
    elif record is not None and family_for_model_type(record.get("model_type")) is not None:
        model_type = record["model_type"]
        family = family_for_model_type(model_type)
    else:
        family = infer_family(graph)
        model_type = family.model_types[0]
    owned, _ = plan(family, graph)

    weights = ckpt.path / MODEL_FILE
    stored: dict[str, tuple[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                stored[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: corrupt or unreadable ({err})") from None
    aliases: dict[str, list[str]] = {}  # a tied weight may be stored under its partner's name (save_model)
    for name, param in graph.params.items():
        if param.tied_to is not None:
            aliases.setdefault(param.tied_to, []).append(name)
    entries, sources = [], []
    for planned in owned:
        key = next((k for k in [planned.name, *aliases.get(planned.name, [])] if k in stored), None)
        if key is None:
            raise CheckpointError(f"{weights}: has no tensor {planned.name}")
        dtype, shape = stored[key]
        if key in padded_shapes and shape == padded_shapes[key][0]:
            shape = padded_shapes[key][1]  # written unpadded, below
        if shape != planned.shape:
            raise CheckpointError(f"{weights}: {key} has shape {list(shape)} but the spec says {list(planned.shape)}")
        if dtype not in DTYPES:
            raise CheckpointError(f"{weights}: {key} has dtype {dtype}, which lmspec does not write")
        sources.append(key)
        entries.extend((p.hf, dtype, p.shape) for p in planned.pieces)

    tokenizer = load_tokenizer(ckpt.tokenizer)
    if record is not None and record.get("model_type") == model_type:
        config = record["config"]
    else:
        config = config_for_export(family, model_type, graph, DTYPES[entries[0][1]][0] if entries else "float32",
                                   tokenizer.eot_id)
    problems = check_requires(family, config) + check_hyper(family, config, graph) + \
        check_op_args(family, config, graph)
    if problems:
        raise HFError(_one_line(problems, f"cannot write a {model_type} config.json for {graph.file}: "))

    tmp = _temporary_dir(out)
    try:
        writer = SafetensorsWriter(tmp / WEIGHTS_FILE, entries, {"format": "pt"})
        try:
            for planned, key in zip(owned, sources):
                with safe_open(str(weights), "pt") as f:  # opened per tensor: its pages unmapped after
                    tensor = f.get_tensor(key)
                if key in padded_shapes:
                    tensor = unpad(tensor, padded_shapes[key][1])
                for piece in planned.pieces:
                    part = tensor[piece.index]
                    writer.write(piece.hf, part.t() if piece.transpose else part)
                del tensor
            writer.close()
        except (SafetensorError, OSError) as err:
            writer.abort()
            raise CheckpointError(f"{weights}: cannot read ({err})") from None
        except BaseException:
            writer.abort()
            raise
        _write_json(tmp / CONFIG_FILE, config)
        files = dict(record.get("files", {})) if record is not None else {}
        if isinstance(tokenizer, FileTokenizer):
            _write_text(tmp / TOKENIZER_FILE, tokenizer.tokenizer.to_str())
            if "tokenizer_config.json" not in files:
                tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": graph.context}
                if tokenizer.eot_id is not None:
                    tok_config["eos_token"] = tokenizer.tokenizer.id_to_token(tokenizer.eot_id)
                files["tokenizer_config.json"] = json.dumps(tok_config, indent=2) + "\n"
        else:
            log(f"tokenizer: {tokenizer.kind} (characters) has no Hugging Face form; none written")
        for name, text in files.items():
            if isinstance(text, str) and "/" not in name and not name.startswith("."):
                _write_text(tmp / name, text)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({model_type}: {len(entries)} tensors, {(out / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MiB)")
    return out
