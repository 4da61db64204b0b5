"""Every kind of mistake in a spec gives a located error and a non-zero exit, never a traceback.

Each file in tests/broken_specs/ states the diagnostics it must produce in `# expect:` lines."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BROKEN = sorted((ROOT / "tests" / "broken_specs").glob("*.arch"))


def _expected(path: Path) -> list[str]:
    return [line.split("# expect: ", 1)[1].strip() for line in path.read_text().splitlines()
            if line.startswith("# expect: ")]


def _check(*args):
    return subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", "check", *args], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_spec_reports_located_error(path):
    expected = _expected(path)
    assert expected, f"{path.name} has no '# expect:' line"
    result = _check(str(path.relative_to(ROOT)))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    for want in expected:
        assert want in result.stderr, f"missing {want!r} in:\n{result.stderr}"
    # the source line is quoted with a caret under the error
    assert "^" in result.stderr and " | " in result.stderr


def test_every_error_in_a_file_is_reported():
    result = _check("tests/broken_specs/many_errors.arch")
    assert result.stderr.count(": error: ") == 3


def test_json_format_lists_diagnostics():
    import json
    result = _check("tests/broken_specs/shape_mismatch.arch", "tests/broken_specs/unknown_op.arch",
                    "--format", "json")
    assert result.returncode == 1
    found = json.loads(result.stdout)
    assert [(d["file"].split("/")[-1], d["line"], d["column"], d["severity"]) for d in found] == [
        ("shape_mismatch.arch", 7, 7, "error"), ("unknown_op.arch", 6, 7, "error")]
    assert all(d["code"].startswith("E") and d["message"] for d in found)


def test_shipped_specs_all_pass():
    result = _check("specs/")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_glob_and_missing_file():
    ok = _check("specs/gpt2*.arch")
    assert ok.returncode == 0 and "checked 4 files" in ok.stdout
    missing = _check("no/such/file.arch")
    assert missing.returncode == 1
    assert "file not found: no/such/file.arch" in missing.stderr
    assert "Traceback" not in missing.stderr
