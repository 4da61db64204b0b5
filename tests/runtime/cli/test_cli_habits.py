"""What people expect of a command line: `python -m lmspec`, `--version`, defaults in `--help`, no
silent abbreviation of long options, and `-o/--out` on every verb that writes."""
import subprocess
import sys

import pytest

from lmspec.runtime.cli.main import VERBS, main, parser
from runtime_helpers import ROOT


def test_python_m_lmspec_is_the_command():
    out = subprocess.run([sys.executable, "-m", "lmspec", "check", "specs/tiny.arch"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "checked 1 file: ok" in out.stdout, out.stderr
    version = subprocess.run([sys.executable, "-m", "lmspec", "--version"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    from importlib.metadata import version as installed
    assert version.returncode == 0 and version.stdout.strip() == f"lmspec {installed('lmspec')}"


def test_an_abbreviated_long_option_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "specs/tiny.arch", "--step", "5", "--out", "nowhere"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --step" in capsys.readouterr().err


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch BATCH (default: 12)" in text and "--lr LR (default: 0.001)" in text
    assert text.count("(default: 12)") == 1
    assert "(default: 500, or the resumed run's)" in text  # a help that says its default keeps its own words


def _subparsers(p):
    return next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices


def test_every_verb_that_writes_takes_o_and_out():
    verbs = _subparsers(parser())
    writers = []
    for row in VERBS:
        *group, name = row.name.split(" ")
        q = _subparsers(verbs[group[0]])[name] if group else verbs[name]
        options = {o for a in q._actions for o in a.option_strings}
        if "--out" in options or "--output" in options:
            writers.append(row.name)
            assert {"-o", "--out"} <= options, row.name
    assert {"train", "export", "import hf", "data prepare", "finetune classify", "lora merge"} <= set(writers)
