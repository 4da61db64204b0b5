"""What a checkpoint holds, read without torch: its spec record's graph and its tensors' names and
shapes (the header of model.safetensors, no tensor data), for `lmspec diff` and `train --init-from`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmspec.runtime.checkpoint.layout import CHECKPOINTS_DIR, META_FILE, MODEL_FILE, CheckpointError, find_checkpoint
from lmspec.runtime.errors import DiffInputError


@dataclass
class CheckpointTensors:
    path: str  # its step directory
    graph: object  # ModelGraph, rebuilt from the spec record
    stored: dict  # {name: shape} of the tensors it holds, its base's too when it holds adapters only
    base: str | None = None  # an adapters-only checkpoint's base checkpoint


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


def read_checkpoint_tensors(path: str | Path) -> CheckpointTensors:
    """The graph and tensors of the checkpoint at `path` (a run, checkpoints or step directory)."""
    from lmspec.compiler.rewrites import RewriteError, graph_from_record

    step_dir = _find_step_dir(Path(path))
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
    base = None
    if spec.get("base"):  # adapters only: the rest of the weights come from the base checkpoint
        if not isinstance(spec["base"], dict) or not isinstance(spec["base"].get("checkpoint"), str):
            raise DiffInputError(f"{meta_path}: field 'spec.base' is corrupt")
        base = spec["base"]["checkpoint"]
        stored = read_header(Path(base) / MODEL_FILE)[0] | stored
    try:
        graph = graph_from_record(spec)
    except RewriteError as err:
        raise DiffInputError(f"{step_dir}: {err}") from None
    return CheckpointTensors(str(step_dir), graph, stored, base)
