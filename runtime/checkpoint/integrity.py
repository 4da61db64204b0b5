"""Checksums of a checkpoint's files: recorded in its meta.json when it is written, verified each time
one of its files is read, and, when one does not match, which earlier checkpoint of the run to use.

    meta.json   "checksums": {"model.safetensors": "xxh3_128:…", "optimizer.dcp/__0_0.distcp": "xxh3_128:…",
                              "optimizer.dcp/.metadata": "xxh3_128:…", "rng.safetensors": "xxh3_128:…"}

Every file of the step directory has one but meta.json, which holds them (its JSON is checked as it is
parsed). The process that writes meta.json takes them, after every file is in the directory, other
ranks' DCP shards included, and before the directory is renamed into place, so they describe exactly
what appears. A checkpoint written before lmspec recorded checksums has none and is read unchecked.
No torch here: `lmspec data verify` checks a run without loading a tensor.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lmspec.runtime.checkpoint.layout import (
    CHECKPOINTS_DIR, LATEST_FILE, META_FILE, STEP_DIR, CheckpointError, step_dirs,
)
from lmspec.runtime.checksum import file_checksum, file_matches, is_checksum

CHECKSUMS_FIELD = "checksums"


def checksums_of(directory: Path) -> dict[str, str]:
    """A checksum of every file under `directory` but its meta.json, keyed by the path relative to it."""
    directory = Path(directory)
    found = {}
    for folder, _, files in os.walk(directory):
        for name in files:
            path = Path(folder) / name
            relative = path.relative_to(directory).as_posix()
            if relative != META_FILE:
                found[relative] = file_checksum(path)
    return dict(sorted(found.items()))


def recorded_checksums(step_dir: Path) -> dict[str, str] | None:
    """The checksums meta.json records for a step directory's files; None for a checkpoint written
    before they were recorded (or a directory with no readable meta.json, which load_checkpoint reports)."""
    try:
        meta = json.loads((Path(step_dir) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    sums = meta.get(CHECKSUMS_FIELD) if isinstance(meta, dict) else None
    if sums is None:
        return None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and is_checksum(v) for k, v in sums.items()):
        raise CheckpointError(f"{Path(step_dir) / META_FILE}: field {CHECKSUMS_FIELD!r} is corrupt")
    return sums


def _step_dir_of(path: Path) -> Path | None:
    """The checkpoint directory a file belongs to: the nearest folder above it with a meta.json (the
    step directory for model.safetensors, its parent for a file of optimizer.dcp/)."""
    for parent in list(path.parents)[:2]:
        if (parent / META_FILE).is_file():
            return parent
    return None


def _problem(path: Path, recorded: str) -> str | None:
    """What is wrong with one file, or None when it has the checksum recorded for it."""
    if not path.is_file():
        return "missing"
    try:
        return None if file_matches(path, recorded) else "checksum mismatch (the file is corrupt)"
    except ValueError as err:  # an algorithm this lmspec does not know
        return f"cannot be verified: {err}"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"


def verify_file(path: str | os.PathLike) -> None:
    """Check one file of a checkpoint against the checksum its meta.json records (once, as it is
    read): a CheckpointError naming the file and the newest intact earlier checkpoint when it differs."""
    path = Path(path)
    step_dir, recorded = _recorded(path)
    if recorded is not None:  # None: a checkpoint from before checksums, or a file it does not list
        _refuse(path, _problem(path, recorded), step_dir)


def _recorded(path: Path) -> tuple[Path | None, str | None]:
    """The checkpoint directory `path` belongs to, and the checksum its meta.json records for it."""
    step_dir = _step_dir_of(path)
    sums = recorded_checksums(step_dir) if step_dir is not None else None
    return step_dir, sums.get(path.relative_to(step_dir).as_posix()) if sums else None


def _refuse(path: Path, problem: str | None, step_dir: Path, cause: BaseException | None = None) -> None:
    """Raise the located error for a damaged file, naming the checkpoint to use instead; nothing if intact."""
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}; {advice(newest_intact_before(step_dir))}") from cause


@contextmanager
def verified_while_read(path: str | os.PathLike) -> Iterator[None]:
    """verify_file's check, run in a thread beside the read in the block, its verdict given when the
    block ends: xxh3 lets go of the GIL, so on a file in the page cache the hash hides behind the
    copy instead of adding to it. What the block read must not be used when this raises."""
    path = Path(path)
    step_dir, recorded = _recorded(path)
    if recorded is None:
        yield
        return
    found: list[str | None] = []
    checker = threading.Thread(target=lambda: found.append(_problem(path, recorded)), daemon=True)
    checker.start()
    try:
        yield
    except BaseException as err:  # a corrupt file may fail to parse: the checksum says why
        checker.join()
        _refuse(path, found[0] if found else None, step_dir, cause=err)
        raise
    checker.join()
    _refuse(path, found[0], step_dir)


def verify_directory(directory: str | os.PathLike) -> None:
    """Check every file a checkpoint records under `directory` (optimizer.dcp/) before it is read."""
    directory = Path(directory)
    step_dir = directory.parent
    prefix = directory.name + "/"
    for name, recorded in sorted((recorded_checksums(step_dir) or {}).items()):
        if name.startswith(prefix):
            _refuse(step_dir / name, _problem(step_dir / name, recorded), step_dir)


# --------------------------------------------------------------------------------- whole checkpoints

@dataclass
class CheckpointReport:
    """What verifying one step directory found."""

    path: Path
    checked: int = 0  # files whose checksum was compared
    problems: list[tuple[Path, str]] = field(default_factory=list)  # (file, what is wrong)
    unrecorded: bool = False  # written before lmspec recorded checksums: nothing to compare

    @property
    def intact(self) -> bool:
        return not self.unrecorded and not self.problems

    @property
    def unchecked(self) -> str:
        """Why part of it could not be verified; empty when every file was."""
        return "no checksums recorded (written before lmspec recorded them)" if self.unrecorded else ""


def check_checkpoint(step_dir: Path) -> CheckpointReport:
    """Compare every file a step directory records with its checksum; reads each file whole."""
    step_dir = Path(step_dir)
    report = CheckpointReport(step_dir)
    meta = step_dir / META_FILE
    if not meta.is_file():
        report.problems.append((meta, "missing"))
        return report
    try:
        json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        report.problems.append((meta, f"corrupt ({err})"))
        return report
    try:
        sums = recorded_checksums(step_dir)
    except CheckpointError as err:
        report.problems.append((meta, str(err).partition(": ")[2]))
        return report
    if sums is None:
        report.unrecorded = True
        return report
    for name, recorded in sums.items():
        report.checked += 1
        problem = _problem(step_dir / name, recorded)
        if problem is not None:
            report.problems.append((step_dir / name, problem))
    return report


def check_run(path: str | os.PathLike) -> list[CheckpointReport]:
    """Verify every checkpoint `path` holds: a run directory or its checkpoints directory (each step
    directory, oldest first), or one step directory."""
    path = Path(path)
    parent = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    if (path / META_FILE).is_file() or STEP_DIR.match(path.name):
        return [check_checkpoint(path)]
    found = step_dirs(parent) if parent.is_dir() else []
    if not found:
        raise CheckpointError(f"{path}: no checkpoint found (expected {CHECKPOINTS_DIR}/step_NNNNNN/)")
    return [check_checkpoint(step_dir) for _, step_dir in found]


def newest_intact_before(step_dir: Path) -> Path | None:
    """The newest checkpoint of the same run older than `step_dir` whose every file matches its
    checksum (one without checksums cannot be vouched for and is passed over)."""
    match = STEP_DIR.match(step_dir.name)
    if match is None or not step_dir.parent.is_dir():
        return None
    for step, candidate in reversed(step_dirs(step_dir.parent)):
        if step < int(match.group(1)) and check_checkpoint(candidate).intact:
            return candidate
    return None


def advice(intact: Path | None) -> str:
    """What to do about a corrupt checkpoint: load or resume from `intact`, an earlier one, if any."""
    if intact is None:
        return "no earlier checkpoint of this run is intact; restore the file from a copy"
    latest = intact.parent / LATEST_FILE
    return (f"{intact.name} is intact: load {intact} instead, or resume from it with "
            f"`echo {intact.name} > {latest}` and `lmspec train … --resume`")


def run_advice(reports: list[CheckpointReport]) -> str | None:
    """After check_run: what to do when the newest checkpoint is damaged, from the reports of the older."""
    if not reports or not reports[-1].problems:
        return None
    return advice(next((r.path for r in reversed(reports[:-1]) if r.intact), None))
