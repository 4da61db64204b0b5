"""runtime/atomic.py: a crash leaves the old file or directory or the new one, whole, and no temporary."""
import os
import re
import stat
import subprocess
import sys

import pytest

from lmspec.runtime import atomic
from lmspec.runtime.atomic import (
    PendingFile,
    atomic_directory,
    atomic_file,
    check_output_location,
    failures_as_write_errors,
    install_file,
    remove_directory,
    remove_temporaries,
    scratch_directory,
    temporary_name,
    write_bytes_atomically,
    write_text_atomically,
)
from lmspec.runtime.errors import WriteError


class Crash(Exception):
    pass


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def mode_of(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ---- files ---------------------------------------------------------------------------------------

def test_temporary_name_is_hidden_beside_the_file_and_per_process(tmp_path):
    assert temporary_name(tmp_path / "meta.json") == tmp_path / f".tmp-meta.json-{os.getpid()}"


def test_new_content_appears_whole_only_when_the_block_ends(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with atomic_file(path, "w") as f:
        f.write("new ")
        f.flush()
        assert path.read_text() == "old\n"  # readers still see the old file, whole
        assert temporary_name(path).read_text() == "new "
        f.write("content\n")
    assert path.read_text() == "new content\n"
    assert names(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("error", [Crash, KeyboardInterrupt])
def test_an_exception_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_file(path) as f:
            f.write(b"half of the new")
            raise error()
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["out.bin"]


def test_an_exception_mid_write_leaves_no_file_where_there_was_none(tmp_path):
    with pytest.raises(Crash):
        with atomic_file(tmp_path / "new.bin") as f:
            f.write(b"x")
            raise Crash
    assert names(tmp_path) == []


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def refuse(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="disk on fire"):
        write_text_atomically(path, "new")
    assert path.read_text() == "old"
    assert names(tmp_path) == ["out.txt"]


def test_the_file_is_flushed_to_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    write_bytes_atomically(tmp_path / "f", b"data")
    assert calls == ["fsync", "replace", "fsync"]  # the file, the rename, the folder


def test_text_is_utf8_and_newlines_are_as_given(tmp_path):
    write_text_atomically(tmp_path / "a.txt", "héllo\nwörld\n")
    assert (tmp_path / "a.txt").read_bytes() == "héllo\nwörld\n".encode("utf-8")
    with atomic_file(tmp_path / "b.jsonl", "w", newline="\n") as f:
        f.write("one\ntwo\n")
    assert (tmp_path / "b.jsonl").read_bytes() == b"one\ntwo\n"


def test_bytes_are_written_exactly_and_parents_created(tmp_path):
    data = bytes(range(256)) * 3
    write_bytes_atomically(tmp_path / "deep" / "er" / "x.bin", data)
    assert (tmp_path / "deep" / "er" / "x.bin").read_bytes() == data


def test_permissions_follow_the_umask_unless_given(tmp_path, umask_022):
    path = tmp_path / "f.txt"
    path.write_text("old")
    path.chmod(0o600)
    write_text_atomically(path, "new")
    assert mode_of(path) == 0o644  # a new file, as any new file
    write_text_atomically(path, "newer", permissions=0o755)
    assert mode_of(path) == 0o755 and path.read_text() == "newer"


def test_a_pending_file_stays_open_across_calls_until_committed_or_discarded(tmp_path):
    kept = PendingFile(tmp_path / "kept.bin")
    kept.file.write(b"one ")
    kept.file.write(b"two")
    assert not kept.path.exists()
    kept.commit()
    dropped = PendingFile(tmp_path / "dropped.bin")
    dropped.file.write(b"x")
    dropped.discard()
    assert names(tmp_path) == ["kept.bin"] and kept.path.read_bytes() == b"one two"


def test_only_whole_file_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        PendingFile(tmp_path / "f", "a")


def test_install_file_moves_a_finished_file_into_place(tmp_path):
    (tmp_path / "out.onnx").write_bytes(b"old")
    with scratch_directory(tmp_path, "export") as work:
        (work / "model.onnx").write_bytes(b"new")
        install_file(work / "model.onnx", tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == b"new"
    assert names(tmp_path) == ["out.onnx"]


# ---- directories -------------------------------------------------------------------------------

def test_a_directory_appears_whole_under_its_name_only_when_the_block_ends(tmp_path):
    final = tmp_path / "step_000100"
    with atomic_directory(final) as tmp:
        assert tmp == temporary_name(final) and tmp.is_dir()
        (tmp / "model.safetensors").write_bytes(b"weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "meta.json").write_text("{}")
        assert not final.exists()
    assert names(final) == ["model.safetensors", "sub"]
    assert (final / "sub" / "meta.json").read_text() == "{}"
    assert names(tmp_path) == ["step_000100"]


@pytest.mark.parametrize("error", [Crash, KeyboardInterrupt])
def test_a_failed_directory_leaves_nothing_behind(tmp_path, error):
    with pytest.raises(error):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half").write_bytes(b"x")
            raise error()
    assert names(tmp_path) == []


def test_every_file_in_the_directory_is_flushed_before_the_rename(tmp_path, monkeypatch):
    flushed, real_fsync_file = [], atomic.fsync_file
    monkeypatch.setattr(atomic, "fsync_file", lambda p: (flushed.append(os.path.basename(p)), real_fsync_file(p)))
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_bytes(b"a")
        (tmp / "d").mkdir()
        (tmp / "d" / "b").write_bytes(b"b")
    assert sorted(flushed) == ["a", "b"]


def test_an_empty_directory_gives_way_but_one_with_content_does_not(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty") as tmp:
        (tmp / "f").write_text("new")
    assert (tmp_path / "empty" / "f").read_text() == "new"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("old")
    with pytest.raises(OSError):
        with atomic_directory(tmp_path / "full") as tmp:
            (tmp / "g").write_text("new")
    assert names(tmp_path / "full") == ["f"] and (tmp_path / "full" / "f").read_text() == "old"
    assert names(tmp_path) == ["empty", "full"]


def test_replace_swaps_a_directory_with_content_whole(tmp_path):
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "old").write_text("old")
    with atomic_directory(tmp_path / "step", replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert names(tmp_path / "step") == ["new"]
    assert names(tmp_path) == ["step"]


def test_remove_directory_renames_first_then_deletes(tmp_path, monkeypatch):
    (tmp_path / "step_000001").mkdir()
    (tmp_path / "step_000001" / "f").write_text("x")
    seen = []
    real_rmtree = atomic.shutil.rmtree
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda p, **kw: (seen.append(names(tmp_path)), real_rmtree(p, **kw)))
    remove_directory(tmp_path / "step_000001")
    assert seen == [[f".tmp-old-step_000001-{os.getpid()}"]]  # never a half-deleted step_000001
    assert names(tmp_path) == []


def test_a_scratch_directory_is_removed_whatever_happens(tmp_path):
    with scratch_directory(tmp_path, "export") as work:
        assert work.name == f".tmp-export-{os.getpid()}"
        (work / "f").write_text("x")
    with pytest.raises(Crash):
        with scratch_directory(tmp_path, "export") as work:
            (work / "f").write_text("x")
            raise Crash
    assert names(tmp_path) == []


# ---- what a killed writer left -----------------------------------------------------------------

def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): no process has it now."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_temporaries_clears_every_temporary_but_the_spared(tmp_path):
    dead = _dead_pid()
    for folder in (f".tmp-step_000200-{dead}", ".tmp-dcp-step_000300", "step_000100"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.safetensors").touch()
    for file in (f".tmp-latest-{dead}", "latest", f".tmp-latest-{os.getpid()}"):  # ours: left by a namesake
        (tmp_path / file).touch()
    remove_temporaries(tmp_path, spare={tmp_path / ".tmp-dcp-step_000300"})
    assert names(tmp_path) == [".tmp-dcp-step_000300", "latest", "step_000100"]


def test_remove_temporaries_of_named_files_only(tmp_path):
    dead = _dead_pid()
    for name in (f".tmp-train_007.bin-{dead}", f".tmp-meta.json-{dead}", f".tmp-notes.txt-{dead}", ".tmp-meta.json",
                 "train_000.bin"):
        (tmp_path / name).touch()
    remove_temporaries(tmp_path, of=re.compile(r"(train|val)_\d{3,}\.bin|meta\.json"))
    assert names(tmp_path) == [".tmp-meta.json", f".tmp-notes.txt-{dead}", "train_000.bin"]


def test_remove_temporaries_spares_a_running_writer(tmp_path):
    """Two processes writing beside each other: clearing what a killed writer left must not take the
    file another live process is writing right now, and does take a dead one's."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        for name in (f".tmp-model.onnx-{live.pid}", f".tmp-model.onnx-{dead}", f".tmp-step_000004-{live.pid}"):
            (tmp_path / name).mkdir() if "step" in name else (tmp_path / name).touch()
        remove_temporaries(tmp_path)
        assert names(tmp_path) == [f".tmp-model.onnx-{live.pid}", f".tmp-step_000004-{live.pid}"]
    finally:
        live.kill()
        live.wait()
    remove_temporaries(tmp_path)  # the writer has gone: now they are leftovers
    assert names(tmp_path) == []


# ---- write errors: the file system's refusals are the user's to fix, named by the path they gave ---------

def test_a_refused_write_becomes_one_write_error_naming_the_destination(tmp_path):
    import errno

    from safetensors import SafetensorError

    destination = tmp_path / "run" / "model.onnx"
    refusals = {
        OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".tmp-x-1")): "No space left on device",
        PermissionError(errno.EACCES, "Permission denied"): "Permission denied",
        SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                        'left on device" })'): "No space left on device",
        RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                     "file write failed"): "the disk refused the data (is it full?)",
    }
    for refusal, reason in refusals.items():
        with pytest.raises(WriteError) as caught:
            with failures_as_write_errors(destination):
                raise refusal
        assert str(caught.value) == f"cannot write {destination}: {reason}"
    for other in (FileNotFoundError(errno.ENOENT, "No such file or directory"), ValueError("a bug")):
        with pytest.raises(type(other)):  # a missing input, or a bug: not a write the disk refused
            with failures_as_write_errors(destination):
                raise other
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path}/a-file/x.json: {tmp_path}/a-file is a file"):
        (tmp_path / "a-file").write_text("")
        write_text_atomically(tmp_path / "a-file" / "x.json", "{}")


def test_the_output_location_is_checked_without_leaving_anything(tmp_path):
    (tmp_path / "a-file").write_text("x")
    check_output_location(tmp_path / "new" / "deeper", directory=True)  # made later by the writer
    check_output_location(tmp_path / "a-file", directory=False)  # replaced later
    for path, directory, reason in ((tmp_path / "a-file", True, "it is a file, not a directory"),
                                    (tmp_path, False, "it is a directory"),
                                    (tmp_path / "a-file" / "x", True, f"{tmp_path / 'a-file'} is a file, not a directory")):
        with pytest.raises(WriteError, match=f"^cannot write {re.escape(str(path))}: {re.escape(reason)}$"):
            check_output_location(path, directory=directory)
    assert names(tmp_path) == ["a-file"]
