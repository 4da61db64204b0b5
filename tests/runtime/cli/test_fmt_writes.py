"""`lmspec fmt` writing in place: through a symbolic link it rewrites the file the link names and keeps
the link; a file it cannot write is one located error line, the others are still formatted."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from lmspec.runtime.cli.main import main

MESSY = "model m {  x=1\n input t: i64[b, s]\n output t: i64[b,s] }\n"
TIDY = "model m {\n  x = 1\n  input t: i64[b, s]\n  output t: i64[b, s]\n}\n"


def test_fmt_through_a_symbolic_link_rewrites_the_target_and_keeps_the_link(tmp_path, capsys):
    (tmp_path / "real.arch").write_text(MESSY)
    (tmp_path / "link.arch").symlink_to("real.arch")
    (tmp_path / "real.arch").chmod(0o640)
    assert main(["fmt", str(tmp_path / "link.arch")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"reformatted {tmp_path / 'link.arch'}"
    assert (tmp_path / "link.arch").is_symlink() and os.readlink(tmp_path / "link.arch") == "real.arch"
    assert (tmp_path / "real.arch").read_text() == TIDY
    assert oct((tmp_path / "real.arch").stat().st_mode & 0o777) == "0o640"


def test_a_file_fmt_cannot_write_is_one_error_and_the_rest_are_formatted(tmp_path, capsys):
    locked, free = tmp_path / "locked", tmp_path / "free"
    locked.mkdir()
    free.mkdir()
    (locked / "a.arch").write_text(MESSY)
    (free / "b.arch").write_text(MESSY)
    root = os.geteuid() == 0
    if root:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", locked], capture_output=True).returncode:
            pytest.skip("running as root where the immutable flag cannot be set")
    else:
        locked.chmod(0o555)
    try:
        assert main(["fmt", str(locked / "a.arch"), str(free / "b.arch")]) == 1
    finally:
        subprocess.run(["chattr", "-i", locked]) if root else locked.chmod(0o755)
    out = capsys.readouterr()
    assert out.err.strip() == (f"lmspec fmt: error: cannot write {locked / 'a.arch'}: "
                               + ("Operation not permitted" if root else "Permission denied"))
    assert out.out.splitlines() == [f"reformatted {free / 'b.arch'}", "1 file reformatted, 1 file failed"]
    assert (locked / "a.arch").read_text() == MESSY and (free / "b.arch").read_text() == TIDY
    assert sorted(p.name for p in locked.iterdir()) == ["a.arch"]
