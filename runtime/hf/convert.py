"""Hugging Face model directories <-> lmspec checkpoints, the steps: the other modules of hf/ do the work.

    import: config.json -> family -> hyper-parameters checked against the spec (config.py) -> every
            parameter the spec declares planned as pieces of HF tensors (names.py; shapes checked
            from the headers alone) -> model.safetensors written tensor by tensor (streaming.py)
            -> checkpoints/step_000000/
    export: the same plan run backwards: each lmspec tensor read, cut into its HF pieces, written.

Memory: nothing is loaded whole; streaming.py says how.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lmspec.runtime.atomic import atomic_directory, write_text_atomically
from lmspec.runtime.errors import HFError  # noqa: F401  (raised here, and imported from here)
from lmspec.runtime.hf.config import (
    CONFIG_FILE,
    MISSING,
    check_hyper,
    check_op_args,
    check_requires,
    config_for_export,
    family_of,
    first_present,
    hyper_from_config,
    op_args_from_config,
    read_config,
    set_hint,
)
from lmspec.runtime.hf.chat_files import chat_template_from_files, files_with_chat_template
from lmspec.runtime.hf.directories import refuse_non_empty, write_json, write_text
from lmspec.runtime.hf.families import Family, Stack, fill_template, template_for
from lmspec.runtime.hf.map_file import read_map
from lmspec.runtime.hf.shipped import MAPS, family_for_model_type, shipped_model_types
from lmspec.runtime.hf.names import Piece, Planned, infer_family, match_params, pieces_of, tensor_map
from lmspec.runtime.hf.streaming import DTYPES, WEIGHTS_FILE, SafetensorsDir, SafetensorsWriter, torch_dtype

TOKENIZER_FILE = "tokenizer.json"
# Small files carried from the source directory into the checkpoint and back out by `export hf`.
CARRIED_FILES = ("generation_config.json",)
CARRIED_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                           "chat_template.json")
_CARRY_LIMIT = 1 << 20


# ------------------------------------------------------------------------------------------- import

def _model_name(directory: Path) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", directory.resolve().name).strip("_").lower() or "model"
    return name if name[0].isalpha() else "m_" + name


def spec_text_from_config(directory: Path, config: dict, model_type: str, family: Family) -> str:
    _, rope_type = first_present(config, ("rope_parameters.rope_type", "rope_scaling.rope_type", "rope_scaling.type"))
    template = template_for(model_type, family, None if rope_type is MISSING else str(rope_type))
    if template is None:
        raise HFError(f"no spec template for model_type {model_type} yet; write a spec and pass --spec")
    values = {name: value for name, (value, _) in hyper_from_config(family, config).items()}
    values.update(op_args_from_config(family, config, directory / CONFIG_FILE))  # {mlp_act}, {layernorm_eps}
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


def _template_note(record: dict) -> str:
    """A chat template's state, for the import's last line: it parses, or why it does not."""
    from lmspec.runtime.data.chat_jinja import JinjaChat
    from lmspec.runtime.errors import ChatError

    try:
        JinjaChat(record["template"], record["source"])
    except ChatError as err:
        return f"recorded, but chat requests will be refused: {err}"
    return "Jinja, recorded"


def _one_line(errors: list[str], prefix: str) -> str:
    return prefix + "; ".join(errors)


def import_hf(directory: str | os.PathLike, out: str | os.PathLike, spec: str | None = None,
              overrides: dict | None = None, model: str | None = None, emit_spec: str | None = None,
              tokenizer: str | None = None, map_path: str | None = None, log=print) -> Path:
    """Import the Hugging Face model in `directory` as an lmspec checkpoint in the run directory `out`,
    its family read from `map_path` (a TOML map, runtime/hf/map_file.py) or found by its model_type."""
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
    from lmspec.runtime.checkpoint.integrity import CHECKSUMS_FIELD, checksums_of
    from lmspec.runtime.errors import UsageError

    directory, out = Path(directory), Path(out)
    overrides = overrides or {}
    if (spec is None) == (emit_spec is None):
        raise UsageError("give either --spec SPEC or --emit-spec FILE")
    config = read_config(directory)
    map_text = None
    if map_path is not None:
        map_text, family = read_map(map_path)
        model_type = config.get("model_type")
        if model_type not in family.model_types:
            raise HFError(f"{directory / CONFIG_FILE}: model_type {model_type!r} is not one of the map's "
                          f"family.model_types ({', '.join(family.model_types)}) in {map_path}")
    else:
        model_type, family = family_of(config, str(directory / CONFIG_FILE))
    refuse_non_empty(out, "a checkpoint")
    problems = check_requires(family, config)
    if problems:
        raise HFError(_one_line(problems, f"{directory / CONFIG_FILE}: "))

    emitted = emitted_map = None
    if emit_spec is not None:
        emitted = spec_text_from_config(directory, config, model_type, family)
        # the map goes beside the spec, so that both can be edited and imported again with --spec --map
        emitted_map = map_text if map_text is not None else (MAPS / f"{family.name}.toml").read_text()
        map_target = Path(emit_spec).with_suffix(".toml")
        if map_target.exists() and (not map_target.is_file() or map_target.read_text(encoding="utf-8") != emitted_map):
            raise UsageError(f"--emit-spec {emit_spec}: {map_target}, where its map goes, exists; remove it or "
                             f"choose another name")
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
        hint = set_hint(family, config, graph)
        raise HFError(_one_line(problems, f"{directory / CONFIG_FILE} does not match {graph.file}: ") + hint)

    tok, tokenizer_from_dir = _find_tokenizer(directory, tokenizer)
    vocab = graph.hyper.get("vocab")
    if isinstance(vocab, int) and tok.vocab_size > vocab:
        raise HFError(f"the tokenizer ({tok.source}) has {tok.vocab_size} tokens but the model predicts {vocab}")

    carried = _carried(directory, tokenizer_from_dir)
    chat = chat_template_from_files(carried)  # the model's own, rendered by chat, generate --chat and serve
    train_config = {"chat_template": chat} if chat is not None else {}

    source = SafetensorsDir(directory)
    owned, tied = tensor_map(family, graph)
    entries, layouts = _check_source(family, source, owned, tied, directory, map_path)
    params = sum(math.prod(p.shape) for p in owned)
    log(f"importing {model_type} ({family.name} family) from {directory}: {len(owned)} tensors, {params:,} parameters"
        f" -> {graph.name} ({graph.file})")

    with atomic_directory(out) as tmp:
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
            "format": FORMAT_VERSION, "step": 0, "train_config": train_config, "metrics": {},
            "tokenizer": tok.to_json(),
            "spec": spec_record(graph, overrides),
            "hf": {"model_type": model_type, "family": family.name, "source": str(directory.resolve()),
                   "config": config, "files": carried, **({"map": map_text} if map_text else {})},
            CHECKSUMS_FIELD: checksums_of(step),  # as save_checkpoint records them: verified on every read
        }
        write_json(step / META_FILE, meta)
        write_text(tmp / CHECKPOINTS_DIR / LATEST_FILE, step.name + "\n")
        if emitted is not None:
            write_text_atomically(emit_spec, emitted)
            write_text_atomically(map_target, emitted_map)
            log(f"wrote {emit_spec} and its map {map_target}")
    size = (out / CHECKPOINTS_DIR / step.name / MODEL_FILE).stat().st_size
    log(f"wrote {out / CHECKPOINTS_DIR / step.name} ({size / 2**20:.1f} MiB); tokenizer: {tok.source} "
        f"({tok.vocab_size} tokens)")
    if chat is not None:
        log(f"chat template: {chat['source']} ({_template_note(chat)})")
    return out


def _check_source(family: Family, source: SafetensorsDir, owned: list[Planned], tied: list[Planned],
                  directory: Path, map_path: str | None = None):
    """The output header entries and, per parameter, its pieces resolved to the source's names.
    Every piece must exist with the planned shape; every source tensor must be used or ignorable:
    otherwise one error lists every tensor that is missing, of the wrong shape, or left unused."""
    missing: list[str] = []
    wrong_shape: list[str] = []
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
                missing.append(f"{piece.hf} (the spec's {planned.name} needs it)")
                continue
            dtype, shape = source.meta[name]
            if shape != piece.shape:
                wrong_shape.append(f"{name} has shape {list(shape)} but the spec's {planned.name} needs "
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
    problems = [f"{_count(items, 'tensor')} {what}: {_first(items)}" for items, what in (
        (missing, "missing"), (wrong_shape, "of another shape"), (unused, "with no place in the spec")) if items]
    if problems:
        by = f" (by the map {map_path})" if map_path else ""
        raise HFError(f"{directory}{by}: " + "; ".join(problems))
    return entries, layouts


LISTED = 2  # of each kind of problem, the tensors one error names before "and N more"


def _count(items: list, noun: str) -> str:
    return f"1 {noun}" if len(items) == 1 else f"{len(items)} {noun}s"


def _first(items: list[str]) -> str:
    return ", ".join(items[:LISTED]) + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


def _assemble(source: SafetensorsDir, planned: Planned, resolved: list[tuple[str, Piece]], st_dtype: str):
    """One lmspec tensor built from its pieces; the source files are open only meanwhile."""
    import torch

    dtype = torch_dtype(st_dtype)
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


def export_family(ckpt, graph, model_type: str | None = None, map_path: str | None = None) -> tuple[Family, str]:
    """(family, model_type) a checkpoint exports as: the map given (or the one it was imported by),
    --model-type's family, the family it was imported from, else the shipped family whose table holds
    the spec's parameters (HFError when none does)."""
    from lmspec.runtime.errors import UsageError

    record = _hf_record(ckpt.path)
    recorded_map = (record or {}).get("map")
    if map_path is not None or recorded_map:  # the map given, or the one the checkpoint was imported by
        if map_path is not None:
            _, family = read_map(map_path)
        else:
            from lmspec.runtime.hf.map_file import parse_map
            family = parse_map(recorded_map, f"{ckpt.path}: the map recorded at import")
        model_type = model_type or (record or {}).get("model_type") or family.model_types[0]
        if model_type not in family.model_types:
            raise UsageError(f"--model-type {model_type}: not one of the map's ({', '.join(family.model_types)})")
    elif model_type is not None:
        family = family_for_model_type(model_type)
        if family is None:
            raise UsageError(f"--model-type {model_type}: not one of {', '.join(sorted(shipped_model_types()))}")
    elif record is not None and family_for_model_type(record.get("model_type")) is not None:
        model_type = record["model_type"]
        family = family_for_model_type(model_type)
    else:
        family, model_type = infer_family(graph)
    return family, model_type


def export_config(ckpt, family: Family, model_type: str, graph, dtype: str, eot_id: int | None) -> dict:
    """config.json for the checkpoint as `model_type`: the one it was imported with, else the family's
    base with the spec's values; checked against the spec (HFError naming what disagrees)."""
    record = _hf_record(ckpt.path)
    if record is not None and record.get("model_type") == model_type:
        config = record["config"]
    else:
        config = config_for_export(family, model_type, graph, dtype, eot_id)
    problems = check_requires(family, config) + check_hyper(family, config, graph) + \
        check_op_args(family, config, graph)
    if problems:
        raise HFError(_one_line(problems, f"cannot write a {model_type} config.json for {graph.file}: "))
    return config


def checkpoint_config(ckpt, graph, eot_id: int | None, dtype: str = "float32", model_type: str | None = None,
                      map_path: str | None = None) -> tuple[Family, str, dict]:
    """(family, model_type, config.json) of a checkpoint whose model is `graph`, as `export hf` would
    write it, written nowhere (`export` puts it beside an ONNX model for Optimum)."""
    family, model_type = export_family(ckpt, graph, model_type, map_path)
    return family, model_type, export_config(ckpt, family, model_type, graph, dtype, eot_id)


@dataclass
class HFExport:
    """What `lmspec export hf` writes for a checkpoint, before a byte of it is written: config.json,
    the tokenizer's and chat template's files, and the tensors, which `tensors` reads from the
    checkpoint one at a time (`export gguf` converts them on the way, with no model directory between)."""

    name: str  # the spec's model name
    model_type: str
    config: dict
    entries: list[tuple[str, str, tuple[int, ...]]]  # (Hugging Face name, safetensors dtype, shape), in order
    files: dict[str, str]  # name -> text: tokenizer.json, tokenizer_config.json, a chat template, ...
    weights: Path  # the checkpoint's model.safetensors
    reads: list[tuple[Planned, str]]  # each parameter's plan and the checkpoint tensor it is read from
    padded_shapes: dict  # a vocabulary padded for training: the rows to keep

    def tensors(self):
        """(Hugging Face name, tensor) in the order of `entries`, each checkpoint tensor read once."""
        from safetensors import SafetensorError, safe_open

        from lmspec.compiler.vocab_padding import unpad
        from lmspec.runtime.checkpoint.store import CheckpointError

        for planned, key in self.reads:
            try:
                with safe_open(str(self.weights), "pt") as f:  # opened per tensor: its pages unmapped after
                    tensor = f.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{self.weights}: cannot read ({err})") from None
            if key in self.padded_shapes:
                tensor = unpad(tensor, self.padded_shapes[key][1])
            for piece in planned.pieces:
                part = tensor[piece.index]
                yield piece.hf, part.t() if piece.transpose else part
            del tensor

    def write_files(self, directory: Path) -> None:
        """config.json and the small files beside the weights."""
        write_json(directory / CONFIG_FILE, self.config)
        for name, text in self.files.items():
            write_text(directory / name, text)


def plan_hf_export(checkpoint: str | os.PathLike, model_type: str | None = None, map_path: str | None = None,
                   log=print) -> HFExport:
    """The checkpoint as its Hugging Face family, checked (every tensor there with the spec's shape, a
    config.json the family's checks accept) and planned, reading no tensor."""
    from safetensors import SafetensorError, safe_open

    from lmspec.runtime.checkpoint.store import MODEL_FILE, CheckpointError, load_checkpoint
    from lmspec.compiler.rewrites import graph_from_record
    from lmspec.compiler.vocab_padding import unpadded_record, unpadded_shapes
    from lmspec.runtime.data.chat_template import checkpoint_chat_template
    from lmspec.runtime.data.tokenizer import FileTokenizer, load_tokenizer

    ckpt = load_checkpoint(checkpoint)
    graph = graph_from_record(unpadded_record(ckpt.spec))  # a vocabulary padded for training: the real one
    padded_shapes = unpadded_shapes(ckpt.spec)
    family, model_type = export_family(ckpt, graph, model_type, map_path)
    owned, _ = tensor_map(family, graph)

    weights = ckpt.verified(MODEL_FILE)  # read tensor by tensor later, so its checksum is checked here
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
    entries, reads = [], []
    for planned in owned:
        key = next((k for k in [planned.name, *aliases.get(planned.name, [])] if k in stored), None)
        if key is None:
            raise CheckpointError(f"{weights}: has no tensor {planned.name}")
        dtype, shape = stored[key]
        if key in padded_shapes and shape == padded_shapes[key][0]:
            shape = padded_shapes[key][1]  # written unpadded
        if shape != planned.shape:
            raise CheckpointError(f"{weights}: {key} has shape {list(shape)} but the spec says {list(planned.shape)}")
        if dtype not in DTYPES:
            raise CheckpointError(f"{weights}: {key} has dtype {dtype}, which lmspec does not write")
        reads.append((planned, key))
        entries.extend((p.hf, dtype, p.shape) for p in planned.pieces)

    tokenizer = load_tokenizer(ckpt.tokenizer)
    config = export_config(ckpt, family, model_type, graph, DTYPES[entries[0][1]][0] if entries else "float32",
                           tokenizer.eot_id)
    record = _hf_record(ckpt.path)
    files = dict(record.get("files", {})) if record is not None else {}
    if isinstance(tokenizer, FileTokenizer):
        files[TOKENIZER_FILE] = tokenizer.tokenizer.to_str()
        if "tokenizer_config.json" not in files:
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": graph.context}
            if tokenizer.eot_id is not None:
                tok_config["eos_token"] = tokenizer.tokenizer.id_to_token(tokenizer.eot_id)
            files["tokenizer_config.json"] = json.dumps(tok_config, indent=2) + "\n"
        # the checkpoint's chat template (finetuned with, or imported with), for apply_chat_template
        files = files_with_chat_template(files, checkpoint_chat_template(ckpt.train_config, tokenizer))
    else:
        log(f"tokenizer: {tokenizer.kind} (characters) has no Hugging Face form; none written")
    files = {name: text for name, text in files.items()
             if isinstance(text, str) and "/" not in name and not name.startswith(".")}
    return HFExport(graph.name, model_type, config, entries, files, weights, reads, padded_shapes)


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, model_type: str | None = None,
              map_path: str | None = None, log=print) -> Path:
    """Write the checkpoint as a Hugging Face model directory `out` (config.json, model.safetensors,
    tokenizer.json, and its chat template in tokenizer_config.json): the inverse of import_hf, bit for bit."""
    out = Path(out)
    refuse_non_empty(out, "a model directory")
    export = plan_hf_export(checkpoint, model_type, map_path, log)
    with atomic_directory(out) as tmp:
        writer = SafetensorsWriter(tmp / WEIGHTS_FILE, export.entries, {"format": "pt"})
        try:
            for name, tensor in export.tensors():
                writer.write(name, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        export.write_files(tmp)
    log(f"wrote {out} ({export.model_type}: {len(export.entries)} tensors, "
        f"{(out / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MiB)")
    return out
