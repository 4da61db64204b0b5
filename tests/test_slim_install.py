"""`pip install lmspec` with no extras checks, formats, diffs and describes specs without torch; a
verb whose extra is missing says in one line which to install (runtime/cli/extras.py), and that
table agrees with pyproject.toml's extras."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from lmspec.runtime.checkpoint.header import read_header
from lmspec.runtime.errors import DiffInputError
from lmspec.runtime.cli.extras import EXTRAS, MIN_TORCH, VERB_EXTRAS, extra_for, old_torch_report
from lmspec.runtime.cli.main import VERBS, main

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SLIM_VERBS = {"check", "fmt", "diff", "plan", "info"}  # `info` needs the graph extra for --graph only
HEAVY = sorted(set().union(*EXTRAS.values()))  # every module an extra brings
CLI_MAIN = importlib.import_module("lmspec.runtime.cli.main")  # the module (the package exports its main())


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


def _pins(requirements: list[str]) -> dict[str, str]:
    return {_name(r): r for r in requirements}


# ---------------------------------------------------------------------------- the tables

def test_core_is_what_check_fmt_diff_and_info_need():
    assert set(_pins(PROJECT["dependencies"])) == {"lark", "networkx"}


def test_the_extras_table_is_pyprojects_extras():
    extras = PROJECT["optional-dependencies"]
    assert set(extras) == set(EXTRAS) | {"all", "test"}
    for extra, modules in EXTRAS.items():
        # each distribution imports as its name (prometheus-client as prometheus_client)
        assert set(_pins(extras[extra])) == {m.replace("_", "-") for m in modules}, extra
    (everything,) = extras["all"]  # lmspec[every other extra but test]
    name, _, listed = everything.partition("[")
    assert name == "lmspec" and set(listed.removesuffix("]").split(",")) == set(EXTRAS)
    pins: dict[str, str] = {}
    for extra in EXTRAS:  # a distribution in two extras has one version range
        for name, requirement in _pins(extras[extra]).items():
            assert pins.setdefault(name, requirement) == requirement, (extra, requirement)
    assert f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]},<2.15" in extras["train"]


def test_a_torch_older_than_the_pin_is_one_line_before_anything_runs(monkeypatch, capsys):
    import importlib.metadata
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.6.0+cu124" if name == "torch" else real(name))
    assert main(["train", str(ROOT / "specs/tiny.arch"), "--out", "nowhere"]) == 1
    assert capsys.readouterr().err == (f"lmspec train: error: needs torch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer, "
                                       f"and torch 2.6.0+cu124 is installed: pip install 'torch>={MIN_TORCH[0]}."
                                       f"{MIN_TORCH[1]}'\n")
    assert main(["check", str(ROOT / "specs/tiny.arch")]) == 0  # a verb without torch does not ask
    assert old_torch_report("export") and old_torch_report("generate") is None


def test_every_verb_is_slim_or_names_its_extra():
    firsts = {row.name.split(" ")[0] for row in VERBS}
    assert firsts == SLIM_VERBS | set(VERB_EXTRAS), firsts ^ (SLIM_VERBS | set(VERB_EXTRAS))
    assert set(VERB_EXTRAS.values()) <= set(EXTRAS)
    assert set(VERB_EXTRAS) & SLIM_VERBS == {"info"}


@pytest.mark.parametrize("verb, module, extra", [
    ("train", "torch", "train"), ("finetune classify", "torch.nn", "train"), ("data prepare", "datasketch", "train"),
    ("export", "onnx.reference", "export"), ("export", "torch", "export"), ("generate", "numpy", "serve"),
    ("serve", "uvicorn", "serve"), ("classify", "onnxruntime", "serve"), ("info", "matplotlib.figure", "graph"),
    ("info", "pydot", "graph"), ("train", "yaml", None), ("train", "lmspec.runtime.nothing", None),
])
def test_extra_for(verb, module, extra):
    assert extra_for(verb, module) == extra


def test_the_precommit_hooks_install_lmspec_without_extras():
    """`language: python`: pre-commit pip-installs the repository as it stands, so no extras."""
    yaml = pytest.importorskip("yaml")
    for hook in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text()):
        assert hook["language"] == "python" and not hook.get("additional_dependencies"), hook["id"]
        assert hook["entry"].split()[:2] in (["lmspec", "check"], ["lmspec", "fmt"]), hook["entry"]


# ---------------------------------------------------------------------------- the message

def _raising(exc: BaseException):
    def handler(args):
        raise exc
    return handler


def _with_handler(monkeypatch, verb: str, exc: BaseException) -> None:
    rows = [dataclasses.replace(row, handler=_raising(exc)) if row.name == verb else row for row in VERBS]
    monkeypatch.setattr(CLI_MAIN, "VERBS", rows)


@pytest.mark.parametrize("debug", [False, True])
def test_a_missing_extra_is_one_line_and_exit_1(monkeypatch, capsys, debug):
    _with_handler(monkeypatch, "train", ModuleNotFoundError("No module named 'torch'", name="torch"))
    if debug:  # not a bug, so no traceback either way
        monkeypatch.setenv("LMSPEC_DEBUG", "1")
    assert main(["train", "specs/tiny.arch"]) == 1
    out, err = capsys.readouterr()
    assert not out
    assert err == ("lmspec train: error: needs the train extra (torch is not installed): "
                   "pip install 'lmspec[train]'\n")


def test_a_missing_submodule_names_its_package_and_the_verbs_extra(monkeypatch, capsys):
    _with_handler(monkeypatch, "generate", ModuleNotFoundError("No module named 'onnxruntime.capi'",
                                                               name="onnxruntime.capi"))
    assert main(["generate", "model.onnx"]) == 1
    assert capsys.readouterr().err == ("lmspec generate: error: needs the serve extra (onnxruntime is not "
                                       "installed): pip install 'lmspec[serve]'\n")


def test_a_module_of_no_extra_is_still_an_internal_error(monkeypatch, capsys):
    monkeypatch.delenv("LMSPEC_DEBUG", raising=False)
    _with_handler(monkeypatch, "train", ModuleNotFoundError("No module named 'lmspec.nothing'", name="lmspec.nothing"))
    assert main(["train", "specs/tiny.arch"]) == 3
    assert "internal error: ModuleNotFoundError" in capsys.readouterr().err


def _run(code: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter from the repository root, with `block` uninstallable (as if not
    installed: importing one raises ModuleNotFoundError, find_spec finds nothing)."""
    prelude = f"import sys\nfor m in {list(block)!r}: sys.modules[m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_train_without_torch_names_the_train_extra_and_writes_nothing(tmp_path):
    out = _run("from lmspec.runtime.cli.main import main\n"
               f"sys.exit(main(['train', 'specs/tiny.arch', '--out', {str(tmp_path / 'run')!r}, '--steps', '1']))",
               block=("torch",))
    assert out.returncode == 1, out.stderr
    assert out.stderr == "lmspec train: error: needs the train extra (torch is not installed): pip install 'lmspec[train]'\n"
    assert not any(tmp_path.iterdir())


def test_info_graph_without_matplotlib_names_the_graph_extra(tmp_path):
    out = _run("from lmspec.runtime.cli.main import main\n"
               f"sys.exit(main(['info', 'specs/tiny.arch', '--graph', {str(tmp_path / 'g.svg')!r}]))",
               block=("matplotlib", "torch"))
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == ("lmspec info: error: needs the graph extra (matplotlib is not "
                                           "installed): pip install 'lmspec[graph]'")
    assert not (tmp_path / "g.svg").exists()


# ---------------------------------------------------------------------------- what the slim verbs import

def test_check_fmt_diff_info_and_plan_import_no_extra():
    code = f"""
from lmspec.runtime.cli.main import main
runs = [['check', 'specs/'], ['check', '--format', 'sarif', 'specs/tiny.arch'], ['fmt', '--check', 'specs/'],
        ['diff', 'specs/tiny.arch', 'specs/gpt2.arch'], ['diff', 'specs/tiny.arch', 'specs/llama3.2-1b.arch', '--format', 'json'],
        ['info', 'specs/gpt2.arch'], ['info', 'specs/tiny.arch', '--format', 'json', '--tp', '2', '--pp', '2'],
        ['plan', 'specs/gpt2.arch']]
codes = [main(argv) for argv in runs]
print(codes, sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[0, 0, 0, 0, 0, 0, 0, 0] []", out.stdout[-2000:] + out.stderr[-2000:]


def test_diff_reads_a_safetensors_header_as_safetensors_does(tmp_path):
    numpy = pytest.importorskip("numpy")
    from safetensors import safe_open
    from safetensors.numpy import save_file
    path = tmp_path / "model.safetensors"
    save_file({"wte.weight": numpy.zeros((7, 3), numpy.float32), "b": numpy.zeros((), numpy.int64),
               "e": numpy.zeros((0, 2), numpy.float16)}, str(path), metadata={"format": "pt"})
    with safe_open(str(path), framework="numpy") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()
    assert read_header(path) == expected == ({"wte.weight": (7, 3), "b": (), "e": (0, 2)}, {"format": "pt"})

    raw = path.read_bytes()
    for name, data in {"short": raw[:5], "too-long": (10**9).to_bytes(8, "little") + raw[8:],
                       "not-json": raw[:8] + b"{" * (len(raw) - 8),
                       "no-shape": _header(json.dumps({"a": {"dtype": "F32"}}).encode())}.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(DiffInputError, match="corrupt or unreadable"):
            read_header(bad)


def _header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


# ---------------------------------------------------------------------------- a real slim install

def _source_tree(dest: Path) -> Path:
    """The files git would ship (tracked, and untracked but not ignored), copied: building in the
    checkout itself would leave build/ and an egg-info there."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
def test_a_fresh_venv_without_extras_checks_and_formats_specs_without_torch(tmp_path):
    """`pip install .` into a new virtual environment (lark and networkx come from the package index):
    torch is not there, check and fmt --check pass, diff reads a checkpoint, train names its extra."""
    started = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python, lmspec = bindir / "python", bindir / "lmspec"
    src = _source_tree(tmp_path / "src")
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(src)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    found = subprocess.run([str(python), "-c", "import importlib.util as u, json; "
                            f"print(json.dumps({{m: u.find_spec(m) is not None for m in {HEAVY + ['lark', 'networkx']!r}}}))"],
                           capture_output=True, text=True, timeout=60)
    installed = json.loads(found.stdout)
    assert installed.pop("lark") and installed.pop("networkx")
    assert not any(installed.values()), f"a slim install brought {[m for m, v in installed.items() if v]}"

    def lmspec_run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(lmspec), *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)

    for argv in (["check", "specs/"], ["fmt", "--check", "specs/"], ["diff", "specs/tiny.arch", "specs/gpt2.arch"],
                 ["info", "specs/gpt2.arch"], ["plan", "specs/gpt2.arch"]):
        out = lmspec_run(*argv)
        assert out.returncode == 0, (argv, out.stdout + out.stderr)

    # a checkpoint trained here (with torch), diffed there (without)
    run = tmp_path / "run"
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    trained = subprocess.run([sys.executable, "-m", "lmspec.runtime", "train", "specs/tiny.arch", "--data", str(text),
                              "--out", str(run), "--steps", "1", "--batch", "2", "--warmup", "1", "--eval-batches", "1",
                              "--no-progress", "--sample-tokens", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    out = lmspec_run("diff", str(run), "specs/tiny.arch", "--new-set", "vocab=28", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["breaking"] is False  # 28 characters in the text: its tokenizer's vocab

    out = lmspec_run("train", "specs/tiny.arch", "--out", str(tmp_path / "never"))
    assert out.returncode == 1
    assert out.stderr == "lmspec train: error: needs the train extra (torch is not installed): pip install 'lmspec[train]'\n"
    assert not (tmp_path / "never").exists()
    print(f"slim install and checks: {time.monotonic() - started:.0f} s")
