"""Where a run keeps its checkpoints, and how to find the one a path means. No torch here, so
verbs that only read a checkpoint's record and header (`lmspec diff`) stay light.

    RUN/checkpoints/step_000500/…   one directory per saved step (see runtime/checkpoint/store.py)
    RUN/checkpoints/latest          the name of the newest complete one
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from lmspec.runtime.errors import CheckpointError  # noqa: F401  (raised here, and imported from here)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
CONFIG_FILE = "config.toml"  # in a run directory: the options it started with (`--config` reads it back)
STEP_DIR = re.compile(r"^step_(\d+)$")
# config.toml's first two lines: the verb that wrote it, and the directory its relative paths are from
_OPTIONS_VERB = "# the options of `lmspec {verb}` for this run; `lmspec {verb} --config THIS_FILE` repeats it"
_OPTIONS_BASE = "# (paths are from {base})"


def write_run_options(run_dir: str | os.PathLike, text: str | None) -> None:
    """RUN/config.toml, the options a fresh run started with (runtime/cli/config_file.py writes the
    text); None, for a resumed run, keeps the one there."""
    if text is None:
        return
    from lmspec.runtime.atomic import write_text_atomically
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(run_dir) / CONFIG_FILE, text)


def run_options_header(verb: str) -> list[str]:
    """The comment lines config.toml opens with (run_options_origin reads them back)."""
    return [_OPTIONS_VERB.format(verb=verb), _OPTIONS_BASE.format(base=os.getcwd())]


def run_options_origin(text: str) -> tuple[str | None, Path | None]:
    """(the verb, the directory relative paths are from) that a config.toml's header names; None for
    what it does not name."""
    verb = re.match(r"# the options of `lmspec (.+?)` for this run", text)
    base = re.search(r"^# \(paths are from (.*)\)$", text, re.MULTILINE)
    return (verb.group(1) if verb else None), (Path(base.group(1)) if base else None)


def run_directory(out: str | None, spec: str) -> Path:
    """Where `lmspec train` keeps a run: --out, or runs/<the spec's name>."""
    return Path(out or os.path.join("runs", Path(spec).stem))


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_dirs(parent: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in parent.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The step directory meant by `path` (a run dir, its checkpoints dir, or a step dir), or None
    when the run has no checkpoint yet."""
    path = Path(path)
    if (path / META_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    if STEP_DIR.match(path.name) and path.is_dir():
        return path  # a step directory that lost its files: load_checkpoint reports which
    parent = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    if not parent.is_dir():
        return None
    latest = parent / LATEST_FILE
    if latest.is_file():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{latest}: unreadable ({err})") from None
        if not STEP_DIR.match(name) or not (parent / name).is_dir():
            raise CheckpointError(f"{latest}: names {name!r}, which is not a checkpoint directory in {parent}")
        return parent / name
    # No `latest`: a crash between renaming a checkpoint into place and writing `latest`.
    # Every step_* directory is complete (they appear only by rename), so the newest is good.
    dirs = step_dirs(parent)
    return dirs[-1][1] if dirs else None
