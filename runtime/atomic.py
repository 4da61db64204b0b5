"""Writing files and directories so that a crash leaves the old one or the new one, never half of one.

Everything is written under a temporary name beside its destination, `.tmp-<name>-<pid>`, flushed
to disk and renamed over it: both names are in one directory, so the rename is atomic. A writer
that is killed leaves only such a temporary, which `remove_temporaries` clears the next time.

    write_text_atomically(path, text), write_bytes_atomically(path, data)   a whole file at once
    with atomic_file(path, "w") as f: ...                                   a file written in pieces
    PendingFile(path): .file, then .commit() or .discard()                  one kept open across calls
    with atomic_directory(final) as tmp: ...                                a directory built whole
    with scratch_directory(parent, name) as work: ...; install_file(...)    files made by other tools
    remove_directory(path), remove_temporaries(directory), fsync_file(path), fsync_dir(path)
    check_output_location(path, directory=...)                             before any work: can it be written?

A write that fails for a reason of the file system (read-only, full, a path through a file) raises
WriteError naming the destination and the reason, a user error rather than a bug, and leaves nothing.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from lmspec.runtime.errors import WriteError

TMP_PREFIX = ".tmp-"
_TEMPORARY = re.compile(rf"^{re.escape(TMP_PREFIX)}(.+)-(\d+)$")  # group 1: the final name, 2: the writer's pid


def temporary_name(path: str | os.PathLike) -> Path:
    """The name a file or directory is written under before the rename: hidden, beside it, unique per process."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")


# ------------------------------------------------------------------------------------------- files

class PendingFile:
    """A file open under its temporary name: `commit()` puts it in place, `discard()` drops it. For a
    writer that keeps one open across calls (token shards); a `with` block uses atomic_file.

    Text modes default to UTF-8; `newline` is open()'s; `permissions` (e.g. 0o644) are set before the
    rename, else the new file gets the umask's, as any new file does."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                 newline: str | None = None, permissions: int | None = None):
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
        self.path = Path(path)
        self.temporary = temporary_name(self.path)
        self.permissions = permissions
        if mode == "w":
            encoding = encoding or "utf-8"
        with failures_as_write_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file: IO = open(self.temporary, mode, encoding=encoding, newline=newline)

    def commit(self) -> None:
        """Flush to disk, rename over the destination, and make the rename durable."""
        try:
            with failures_as_write_errors(self.path):
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                if self.permissions is not None:
                    os.chmod(self.temporary, self.permissions)
                os.replace(self.temporary, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        try:
            self.file.close()  # may flush what the disk refuses again: the file goes anyway
        except OSError:
            pass
        self.temporary.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **options) -> Iterator[IO]:
    """A file object written under the temporary name, put in place only if the block succeeds
    (an exception, Ctrl-C included, leaves the old file and no temporary). Options: PendingFile's."""
    pending = PendingFile(path, mode, **options)
    try:
        with failures_as_write_errors(pending.path):
            yield pending.file
    except BaseException:
        pending.discard()
        raise
    pending.commit()


def write_text_atomically(path: str | os.PathLike, text: str, **options) -> None:
    """Write `text` (UTF-8) to `path` through a temporary name, fsync and rename. Options: PendingFile's."""
    with atomic_file(path, "w", **options) as f:
        f.write(text)


def write_bytes_atomically(path: str | os.PathLike, data: bytes, *, permissions: int | None = None) -> None:
    """Write `data` to `path` through a temporary name, fsync and rename."""
    with atomic_file(path, "wb", permissions=permissions) as f:
        f.write(data)


def install_file(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished file, made by a tool that writes only to a path (in a scratch_directory beside
    `path`, so that the move is a rename), onto `path`: flushed to disk first."""
    with failures_as_write_errors(path):
        fsync_file(source)
        os.replace(source, path)
    fsync_dir(Path(path).parent)


# ------------------------------------------------------------------------------------- directories

@contextmanager
def atomic_directory(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A directory built under the temporary name and renamed to `final` when the block succeeds,
    every file in it flushed to disk first; deleted when the block fails. An empty `final` gives
    way; with replace=True so does one with content (remove_directory, just before the rename),
    otherwise the rename fails rather than mix two directories."""
    final = Path(final)
    tmp = _fresh_directory(temporary_name(final), final)
    try:
        with failures_as_write_errors(final):
            yield tmp
            _fsync_tree(tmp)
            if final.is_dir() and (replace or not any(final.iterdir())):
                remove_directory(final)
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


@contextmanager
def scratch_directory(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A working directory `parent/.tmp-<name>-<pid>`, deleted afterwards whatever happens: for tools
    that write only to paths; what they make is moved out with install_file."""
    work = _fresh_directory(temporary_name(Path(parent) / name), Path(parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fresh_directory(path: Path, destination: Path) -> Path:
    with failures_as_write_errors(destination):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)  # left by a killed process that had our pid
        path.mkdir()
    return path


def remove_directory(path: str | os.PathLike) -> None:
    """Delete a directory so that no half-deleted one is ever seen under its name: renamed to a
    temporary name first (atomic), then deleted; a kill in between leaves a temporary."""
    path = Path(path)
    doomed = temporary_name(path.with_name(f"old-{path.name}"))
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_temporaries(directory: str | os.PathLike, *, of: re.Pattern | None = None,
                       spare: set[Path] | frozenset[Path] = frozenset()) -> None:
    """Delete what interrupted writers left in `directory`: every `.tmp-*` entry, or with `of` only
    the temporaries whose final name `of` matches whole (a folder shared with other files); never
    those in `spare`, and never those of another process that is still running (its pid ends the
    name): it may be writing them now. A temporary of this process counts as left over, from a
    killed one that had the same pid: callers clear a folder before they write into it."""
    for entry in Path(directory).iterdir():
        if entry in spare or not _is_temporary(entry.name, of) or _writer_is_running(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _writer_is_running(name: str) -> bool:
    match = _TEMPORARY.match(name)
    if match is None or int(match.group(2)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(2)), 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # gone; or a number no pid can be
        return False
    except PermissionError:  # another user's process: running
        return True
    return True


def _is_temporary(name: str, of: re.Pattern | None) -> bool:
    if of is None:
        return name.startswith(TMP_PREFIX)
    match = _TEMPORARY.match(name)
    return match is not None and of.fullmatch(match.group(1)) is not None


# ------------------------------------------------------------------------------------------ fsync

def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file that was written and closed elsewhere (by a library) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside `path` durable; some file systems refuse fsync on a directory, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and folder under `root` to disk: what libraries wrote there (safetensors, DCP,
    onnx) is durable before the directory is renamed into place, whether they fsync'd it or not."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


# ------------------------------------------------------------------------------------ write errors

# what the file system says when a write cannot be done; ENOENT is not among them (a missing input)
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                 errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EIO, errno.EMLINK, errno.ETXTBSY}
# libraries that write in their own code report the OS error inside their message
_ERRNO_IN_MESSAGE = re.compile(r"(?:os error |code: )(\d+)")
_DISK_FULL_WORDS = ("file write failed", "no space left", "disk quota", "file too large")


@contextmanager
def failures_as_write_errors(destination: str | os.PathLike) -> Iterator[None]:
    """Inside the block, a failure of the file system to write becomes a WriteError naming
    `destination` (the path the user gave, not a temporary) and the reason; any other error passes."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        reason = write_failure_reason(err, Path(destination))
        if reason is None:
            raise
        raise WriteError(destination, reason) from err


def write_failure_reason(err: BaseException, destination: Path | None = None) -> str | None:
    """Why `err` is the file system refusing a write ("Read-only file system", "x is a file, not a
    directory"), or None when it is something else. Looks through the exceptions it wraps, as
    torch.distributed.checkpoint's do."""
    for inner in _wrapped(err):
        code = inner.errno if isinstance(inner, OSError) else _errno_in_message(str(inner))
        if code in _WRITE_ERRNOS:
            blocked = _file_on_the_way(destination) if destination is not None else None
            return blocked or os.strerror(code)
        text = str(inner).lower()
        if not isinstance(inner, OSError) and any(words in text for words in _DISK_FULL_WORDS):
            return "the disk refused the data (is it full?)" if "write failed" in text else text.strip()
    return None


def _wrapped(err: BaseException, depth: int = 0) -> Iterator[BaseException]:
    if err is None or depth > 8:
        return
    yield err
    for failure in (getattr(err, "failures", None) or {}).values():  # dcp's CheckpointException
        if isinstance(failure, BaseException):
            yield from _wrapped(failure, depth + 1)
        elif isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
            yield from _wrapped(failure[0], depth + 1)
    yield from _wrapped(err.__cause__ or err.__context__, depth + 1)


def _errno_in_message(text: str) -> int | None:
    match = _ERRNO_IN_MESSAGE.search(text)
    return int(match.group(1)) if match else None


def _file_on_the_way(path: Path) -> str | None:
    """'a is a file, not a directory' when a parent of `path` is a file."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a directory"
    return None


def check_output_location(path: str | os.PathLike, *, directory: bool) -> None:
    """Raise WriteError unless `path` can be written, as a directory or as a file, before any work
    is done: it (or the folder it would be made in) exists as the right kind, and a few bytes can
    be written there and flushed. Nothing is left behind."""
    path = Path(path)
    blocked = _file_on_the_way(path)
    if blocked:
        raise WriteError(path, blocked)
    if path.exists() and path.is_dir() != directory:
        raise WriteError(path, "it is a file, not a directory" if directory else "it is a directory")
    folder = path if path.is_dir() else path.parent
    while not folder.exists():
        folder = folder.parent
    probe = temporary_name(folder / "write-check")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        reason = err.strerror or str(err)
        raise WriteError(path, reason if folder == path else f"{folder}: {reason}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
