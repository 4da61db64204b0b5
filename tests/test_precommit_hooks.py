""".pre-commit-hooks.yaml: each hook's entry, run as pre-commit runs it (the staged files appended),
passes a good spec and fails a bad one."""
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
HOOKS = {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
GOOD = ROOT / "specs" / "gpt2.arch"
UNKNOWN_OP = ROOT / "tests" / "broken_specs" / "unknown_op.arch"


def run_hook(hook_id: str, *files: Path) -> subprocess.CompletedProcess:
    """The hook's entry with `files` appended; `lmspec` (the console script pyproject declares) runs
    as this interpreter's `-m lmspec.runtime`, so the test does not depend on PATH."""
    argv = shlex.split(HOOKS[hook_id]["entry"])
    assert argv[0] == "lmspec"
    cmd = [sys.executable, "-m", "lmspec.runtime", *argv[1:], *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def fmt_exists() -> bool:
    return subprocess.run([sys.executable, "-m", "lmspec.runtime", "fmt", "--help"],
                          capture_output=True, cwd=ROOT).returncode == 0


def test_hooks_are_declared_for_arch_files():
    assert set(HOOKS) == {"lmspec-check", "lmspec-fmt"}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lmspec"] == "lmspec.runtime.cli:main"
    for hook in HOOKS.values():
        assert hook["language"] == "python" and hook["pass_filenames"] is True
        assert re.search(hook["files"], "specs/gpt2.arch") and not re.search(hook["files"], "specs/gpt2.arch.bak")
        assert not re.search(hook["files"], "README.md")
    assert HOOKS["lmspec-check"]["entry"] == "lmspec check"
    assert HOOKS["lmspec-fmt"]["entry"] == "lmspec fmt --check"


def test_check_hook_passes_a_good_spec_and_fails_a_bad_one():
    good = run_hook("lmspec-check", GOOD)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = run_hook("lmspec-check", GOOD, UNKNOWN_OP)  # pre-commit passes many files at once
    assert bad.returncode != 0
    assert "layernrom" in bad.stdout + bad.stderr


def test_fmt_hook_passes_a_formatted_spec_and_fails_a_messy_one(tmp_path):
    if not fmt_exists():
        pytest.skip("`lmspec fmt` does not exist yet")
    good = run_hook("lmspec-fmt", GOOD)
    assert good.returncode == 0, good.stdout + good.stderr
    messy = tmp_path / "messy.arch"
    messy.write_text(GOOD.read_text().replace(" = ", "=").replace(", ", ",") + "\n\n\n")
    before = messy.read_text()
    bad = run_hook("lmspec-fmt", messy)
    assert bad.returncode != 0, bad.stdout + bad.stderr
    assert messy.read_text() == before  # --check reports, never rewrites
    broken = run_hook("lmspec-fmt", ROOT / "tests" / "broken_specs" / "syntax_error.arch")
    assert broken.returncode != 0
