"""Checkpoints: one directory per saved step, written atomically, the last K kept.

    RUN/checkpoints/step_000500/model.safetensors      weights (tied weights stored once)
                               /optimizer.safetensors  optimizer state, keyed `<param name>.<state key>`
                               (or /optimizer.dcp/     the same through torch.distributed.checkpoint,
                                                       from an FSDP or a model-parallel run)
                               /rng.safetensors        RNG states (torch CPU/CUDA, the data generator)
                               /meta.json              step, train config, metrics, tokenizer, spec, and a
                                                       checksum of every other file (checkpoint/integrity.py)
    RUN/checkpoints/latest                             the name of the newest complete directory

A checkpoint is built under `.tmp-*` in the same parent and renamed into place, so a crash or
Ctrl-C at any moment leaves the previous checkpoint and `latest` as they were. Every reader of a
file here (read_tensors, Checkpoint.load_model, the optimizer readers) verifies its checksum first.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from safetensors.torch import load_file, load_model, save_file, save_model

from lmspec.runtime.atomic import atomic_directory, remove_directory, remove_temporaries, write_text_atomically
from lmspec.runtime.distributed.canonical_state import param_names_by_group
from lmspec.runtime.checkpoint.layout import (  # noqa: F401  (the layout is part of this module's interface)
    CHECKPOINTS_DIR, LATEST_FILE, META_FILE, MODEL_FILE, CheckpointError, find_checkpoint, step_dir_name,
)
from lmspec.runtime.checkpoint.layout import step_dirs as _step_dirs
from lmspec.runtime.checkpoint.integrity import (
    CHECKSUMS_FIELD, advice, checksums_of, newest_intact_before, verified_while_read, verify_directory, verify_file,
)

# dcp.load(no_dist=True) says it reads in one process, which is what it is asked to do
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")

OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_DCP_DIR = "optimizer.dcp"  # an FSDP run's optimizer state instead, sharded (runtime/checkpoint/sharded.py)
RNG_FILE = "rng.safetensors"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- saving

def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    rng: dict[str, torch.Tensor] | None,
    train_config: dict,
    metrics: dict,
    tokenizer: str,
    spec: dict,
    keep: int = 3,
    weights: dict[str, torch.Tensor] | None = None,
    move_in: dict[str, Path] | None = None,
) -> Path:
    """Write RUN/checkpoints/step_NNNNNN atomically, point `latest` at it, keep the newest `keep`.

    The weights are `model`'s, or `weights` as given (already gathered, tied ones once); `move_in`
    names directories, written beside the checkpoint under temporary names, that are moved into it
    before it appears. Returns the new checkpoint directory."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "train_config": train_config,
        "metrics": metrics,
        "tokenizer": tokenizer,
        "spec": spec,
    }
    try:
        json.dumps(meta)  # found now, before a file is written
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {err}") from None

    parent = Path(run_dir) / CHECKPOINTS_DIR
    parent.mkdir(parents=True, exist_ok=True)
    move_in = move_in or {}
    remove_stale_temporaries(parent, spare=set(move_in.values()))
    name = step_dir_name(step)
    try:
        # replace=True: a step saved again, after a crash before `latest` moved on past it
        with atomic_directory(parent / name, replace=True) as tmp:
            _fill(tmp, model, weights, optimizer, rng, meta, move_in)
        write_text_atomically(parent / LATEST_FILE, name + "\n")
    except BaseException:  # includes KeyboardInterrupt: the staged directories are of no use now
        for source in move_in.values():
            shutil.rmtree(source, ignore_errors=True)
        raise
    _prune(parent, keep_newest=keep, current=step)
    return parent / name


def _fill(tmp: Path, model, weights, optimizer, rng, meta: dict, move_in: dict[str, Path]) -> None:
    """The files of a checkpoint, in the directory that becomes it (atomic_directory flushes them),
    meta.json last with the checksums of all the others: the staged DCP shards of every rank are in
    by then, so each file gets one whoever wrote it."""
    if weights is not None:
        save_file(weights, str(tmp / MODEL_FILE))
    else:
        save_model(model, str(tmp / MODEL_FILE))
    for entry, source in move_in.items():
        os.rename(source, tmp / entry)
    if optimizer is not None:
        tensors, metadata = _flatten_optimizer(optimizer, model)
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata=metadata)
    if rng is not None:
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / RNG_FILE))
    meta = {**meta, CHECKSUMS_FIELD: checksums_of(tmp)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def remove_stale_temporaries(parent: Path, spare: set[Path] = frozenset()) -> None:
    """Remove what an interrupted save left behind (anything named .tmp-*), except `spare`."""
    remove_temporaries(parent, spare=spare)


def _prune(parent: Path, keep_newest: int, current: int) -> None:
    """Keep `current` and the keep_newest - 1 newest before it. Directories past `current` belong to a
    run that crashed before updating `latest` and was resumed from an earlier step: they go too."""
    older = [(s, p) for s, p in _step_dirs(parent) if s < current]
    doomed = [p for s, p in _step_dirs(parent) if s > current]
    doomed += [p for _, p in older[:max(0, len(older) - (keep_newest - 1))]]
    for path in doomed:
        remove_directory(path)  # never a half-deleted step_*: a kill leaves a .tmp-* the next save removes


# ------------------------------------------------------------------------------------ optimizer state


def _flatten_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> tuple[dict, dict]:
    """Optimizer state as flat tensors named by parameter, plus the hyper-parameters as JSON metadata."""
    state_dict = optimizer.state_dict()
    group_names = param_names_by_group(optimizer, model)
    index_to_name = {}
    groups = []
    for saved, names in zip(state_dict["param_groups"], group_names):
        index_to_name.update(zip(saved["params"], names))
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": names})
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, dict] = {}  # non-tensor state values, if an optimizer keeps any
    for index, state in state_dict["state"].items():
        name = index_to_name[index]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().contiguous()
            else:
                extra.setdefault(name, {})[key] = value
    try:
        metadata = {"param_groups": json.dumps(groups), "extra_state": json.dumps(extra)}
    except TypeError as err:
        raise CheckpointError(f"optimizer hyper-parameters are not JSON-serialisable: {err}") from None
    return tensors, metadata


def read_optimizer_by_name(step_dir: Path, names=None) -> dict:
    """A checkpoint's optimizer state keyed by parameter name, the form
    torch.distributed.checkpoint.state_dict uses: {"state": {name: {...}}, "param_groups": [...]}
    with each group's "params" a list of names. From optimizer.safetensors, or from optimizer.dcp
    (an FSDP or model-parallel run's), there only the parameters in `names` if given."""
    path = Path(step_dir) / OPTIMIZER_FILE
    if not path.is_file() and (Path(step_dir) / OPTIMIZER_DCP_DIR).is_dir():
        return read_optimizer_dcp_by_name(Path(step_dir) / OPTIMIZER_DCP_DIR, names)
    tensors = read_tensors(path)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        saved_groups = json.loads(metadata["param_groups"])
        extra = json.loads(metadata.get("extra_state", "{}"))
    except (KeyError, json.JSONDecodeError, SafetensorError) as err:
        raise CheckpointError(f"{path}: optimizer hyper-parameters are missing or corrupt ({err})") from None
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in saved_groups]
    known = {name for g in groups for name in g["params"]}
    state: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition(".")
        if name not in known:
            raise CheckpointError(f"{path}: state for unknown parameter {name!r}")
        state.setdefault(name, {})[field] = tensor
    for name, values in extra.items():
        if name not in known:
            raise CheckpointError(f"{path}: state for unknown parameter {name!r}")
        state.setdefault(name, {}).update(values)
    return {"state": state, "param_groups": groups}


def _unflatten_optimizer(step_dir: Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    by_name = read_optimizer_by_name(step_dir)
    current = param_names_by_group(optimizer, model)
    if [g["params"] for g in by_name["param_groups"]] != current:
        raise CheckpointError(f"{Path(step_dir) / OPTIMIZER_FILE}: optimizer parameter groups do not match "
                              f"the model's parameters")
    index = {name: i for i, name in enumerate(n for names in current for n in names)}
    groups = [g | {"params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: values for n, values in by_name["state"].items()}, "param_groups": groups}


def read_tensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read straight onto `device` once its checksum is verified."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with verified_while_read(path):
            return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: corrupt or unreadable ({err})") from None


# --------------------------------------------------------------------------------------------- loading

@dataclass
class Checkpoint:
    """A saved step: its metadata now, its tensors on request."""

    path: Path  # the step directory
    step: int
    train_config: dict
    metrics: dict
    tokenizer: str  # a tokenizer's to_json(); rebuild with runtime.tokenizer.load_tokenizer
    spec: dict

    def load_model(self, model: torch.nn.Module) -> None:
        """Copy the saved weights into `model` (same parameter names and shapes, else CheckpointError)."""
        path = self.path / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            with verified_while_read(path):
                load_model(model, str(path), strict=True, device=str(device))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: corrupt or unreadable ({err})") from None
        except RuntimeError as err:  # missing/unexpected names or a shape mismatch
            raise CheckpointError(f"{path}: does not fit the model: {err}") from None

    def load_optimizer(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        """Restore the optimizer's state exactly; its parameter groups must hold the same parameters."""
        if (self.path / OPTIMIZER_DCP_DIR).is_dir():  # saved by an FSDP run: resharded for this one
            return load_sharded_optimizer(self, optimizer, model)
        state_dict = _unflatten_optimizer(self.path, optimizer, model)
        try:
            optimizer.load_state_dict(state_dict)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{self.path / OPTIMIZER_FILE}: does not fit the optimizer: {err}") from None

    def rng_states(self) -> dict[str, torch.Tensor]:
        return read_tensors(self.path / RNG_FILE)

    def verified(self, name: str) -> Path:
        """The path of one of the checkpoint's files, for a reader of its own (materialise_from_file),
        once its checksum is verified."""
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        verify_file(path)
        return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open the checkpoint at `path`: a run directory (its latest checkpoint), a checkpoints
    directory, or one step directory. Reads the metadata and checks the weights file's header."""
    step_dir = find_checkpoint(path)
    if step_dir is None:
        if not Path(path).exists():
            raise CheckpointError(f"{path}: no such file or directory")
        raise CheckpointError(f"{path}: no checkpoint found (expected {CHECKPOINTS_DIR}/step_NNNNNN/)")
    meta_path = step_dir / META_FILE

    def damaged(problem: str) -> CheckpointError:  # names the checkpoint to use instead, as a checksum mismatch does
        return CheckpointError(f"{problem}; {advice(newest_intact_before(step_dir))}")

    if not meta_path.is_file():
        raise damaged(f"{meta_path}: missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(f"{meta_path}: corrupt ({err})") from None
    if not isinstance(meta, dict):
        raise damaged(f"{meta_path}: corrupt (not a JSON object)")
    if meta.get("format", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: written by a newer lmspec (format {meta['format']})")
    expected = {"step": int, "train_config": dict, "metrics": dict, "tokenizer": str, "spec": dict}
    for field, kind in expected.items():
        if not isinstance(meta.get(field), kind):
            raise damaged(f"{meta_path}: field {field!r} is missing or not a {kind.__name__}")
    model_path = step_dir / MODEL_FILE
    if not model_path.is_file():
        raise damaged(f"{model_path}: missing")
    try:  # reading the header checks that the file is complete, without loading the tensors
        with safe_open(str(model_path), "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise damaged(f"{model_path}: corrupt or unreadable ({err})") from None
    return Checkpoint(
        path=step_dir,
        step=meta["step"],
        train_config=meta["train_config"],
        metrics=meta["metrics"],
        tokenizer=meta["tokenizer"],
        spec=meta["spec"],
    )


def read_optimizer_dcp_by_name(directory: Path, names=None) -> dict:
    """optimizer.dcp (written by an FSDP or a model-parallel run) as read_optimizer_by_name's form:
    {"state": {name: {...}}, "param_groups": [...]}, whole tensors on the CPU, only for `names`
    when given (every parameter otherwise). Read by this process alone, with no collective."""
    directory = Path(directory)
    verify_directory(directory)
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
        paths = metadata.planner_data
        template: dict = {"optimizer": {"state": {}, "param_groups": []}}
        for key, meta in metadata.state_dict_metadata.items():
            path = paths[key]
            if path[:2] == ("optimizer", "state") and len(path) == 4:
                if names is None or path[2] in names:
                    template["optimizer"]["state"].setdefault(path[2], {})[path[3]] = torch.empty(
                        meta.size, dtype=meta.properties.dtype)
            elif path[:2] == ("optimizer", "param_groups") and len(path) == 4:
                groups = template["optimizer"]["param_groups"]
                while len(groups) <= path[2]:
                    groups.append({})
                groups[path[2]][path[3]] = ""  # a placeholder dcp.load replaces with the saved value
        dcp.load(template, checkpoint_id=str(directory), no_dist=True)
    except CheckpointException as err:
        causes = "; ".join(f"{type(f[0] if isinstance(f, tuple) else f).__name__}" for f in err.failures.values())
        raise CheckpointError(f"{directory}: corrupt or incomplete ({causes})") from None
    except (RuntimeError, ValueError, KeyError, OSError, AttributeError) as err:
        raise CheckpointError(f"{directory}: corrupt or unreadable ({type(err).__name__}: {err})") from None
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in template["optimizer"]["param_groups"]]
    return {"state": template["optimizer"]["state"], "param_groups": groups}


def load_sharded_optimizer(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """Restore optimizer state saved by any run (sharded or not, on any number of ranks) into this
    one's layout, through torch's distributed state-dict API (what an FSDP run's optimizer needs). A sharded save is resharded by dcp.load; a plain one is read whole by every rank
    and each keeps its own shards."""
    sharded = checkpoint.path / OPTIMIZER_DCP_DIR
    try:
        if sharded.is_dir():
            verify_directory(sharded)
            state = get_optimizer_state_dict(model, optimizer)  # the layout to fill, state allocated
            dcp.load({"optimizer": state}, checkpoint_id=str(sharded))
            set_optimizer_state_dict(model, optimizer, state)
        else:
            state = read_optimizer_by_name(checkpoint.path)
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    except CheckpointError:
        raise
    except CheckpointException as err:  # dcp's own: a BaseException that gathers each rank's failure
        failures = {rank: f[0] if isinstance(f, tuple) else f for rank, f in err.failures.items()}  # (error, frames)
        causes = "; ".join(f"rank {rank}: {type(e).__name__} {e}".strip() for rank, e in failures.items())
        raise CheckpointError(f"{sharded}: corrupt or incomplete ({causes})") from None
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"{checkpoint.path}: the optimizer state does not fit this run: {err}") from None
