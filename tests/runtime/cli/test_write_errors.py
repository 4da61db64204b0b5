"""Writing where nothing can be written: a read-only folder, a full disk, an --out that is a file or lies
under one. Every verb that writes ends with one line naming the path and the reason and exit 1, before it
has read any data or loaded any model; nothing is left behind; and a run that meets a full disk resumes
from its last checkpoint exactly as if nothing had happened."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from runtime_helpers import ROOT, SMALL, VERDICT, lmspec_cli, losses
from safetensors.torch import load_file

from lmspec.runtime.cli.main import main


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody can write into, root included (root ignores permissions, not the immutable flag)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
            pytest.skip("running as root where the immutable flag cannot be set: no folder is read-only to root")
        yield folder
        subprocess.run(["chattr", "-i", folder], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


# Each verb that writes, with OUT where its output goes; the inputs it names need not exist: the output is
# checked first, so the mistake is found before any input is read or any model loaded.
VERBS = {
    "train": ["train", "specs/tiny.arch", "--data", str(VERDICT), "--steps", "1", "--out", "OUT"],
    "export": ["export", "no-such-run", "-o", "OUT/model.onnx"],
    "export hf": ["export", "hf", "no-such-run", "-o", "OUT"],
    "data prepare": ["data", "prepare", str(VERDICT), "-o", "OUT"],
    "data tokenize": ["data", "tokenize", str(VERDICT), "--tokenizer", "no-such.json", "-o", "OUT"],
    "tokenizer train": ["tokenizer", "train", str(VERDICT), "--vocab-size", "300", "-o", "OUT/tok.json"],
    "import hf": ["import", "hf", "no-such-dir", "--spec", "specs/tiny.arch", "-o", "OUT"],
    "finetune classify": ["finetune", "classify", "no-such-run", "--data", "x.tsv", "--labels", "a,b", "-o", "OUT"],
    "finetune instruct": ["finetune", "instruct", "no-such-run", "--data", "x.json", "-o", "OUT"],
    "finetune dpo": ["finetune", "dpo", "no-such-run", "--data", "x.json", "-o", "OUT"],
    "lora merge": ["lora", "merge", "no-such-run", "-o", "OUT"],
    "eval": ["eval", "no-such-run", "--data", str(VERDICT), "-o", "OUT/eval.json"],
    "info": ["info", "specs/tiny.arch", "--graph", "OUT/graph.dot"],
}


def _one_error_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lmspec {verb}: error: cannot write "), err
    assert "internal error" not in err[0] and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("verb", VERBS)
def test_every_writer_refuses_an_unwritable_place_first(verb, tmp_path, read_only, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    places = {  # where OUT is: under a read-only folder, under a file, and (for a folder) a file itself
        read_only / "out": "Operation not permitted" if os.geteuid() == 0 else "Permission denied",
        a_file / "out": f"{a_file} is a file, not a directory",
    }
    if VERBS[verb][-1] == "OUT":
        places[a_file] = "it is a file, not a directory"
    for out, reason in places.items():
        args = [arg.replace("OUT", str(out)) for arg in VERBS[verb]]
        assert main(args) == 1
        line = _one_error_line(capsys, "export" if verb == "export hf" else verb)
        assert reason in line and (str(out) in line), line
    assert sorted(p.name for p in read_only.iterdir()) == [] and a_file.read_text() == "not a folder\n"


def test_a_refused_train_costs_seconds_and_reads_nothing(tmp_path, read_only):
    out = lmspec_cli("train", "specs/tiny.arch", "--data", VERDICT, "--out", read_only / "run")
    assert out.returncode == 1 and out.stdout == ""  # no "vocab = …": the corpus was never read
    assert out.stderr.strip() == f"lmspec train: error: cannot write {read_only / 'run'}: {read_only}: " + (
        "Operation not permitted" if os.geteuid() == 0 else "Permission denied")


def _small_disk(limit: int):
    """In the child: no file may grow past `limit` bytes, and writing past it fails with EFBIG rather
    than killing the process (SIGXFSZ ignored), as a full disk fails a write with ENOSPC."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_mid_run_leaves_the_last_checkpoint_to_resume_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    train = ["train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--batch", "4", "--seq", "32",
             "--no-progress", "--sample-tokens", "0"]
    first = tmp_path / "first"
    assert main([*train, "--steps", "4", "--out", str(first)]) == 0
    model = first / "checkpoints" / "step_000004" / "model.safetensors"
    limit = model.stat().st_size // 2  # the next checkpoint's weights cannot be written; the metrics can
    calm, stormy = tmp_path / "calm", tmp_path / "stormy"
    shutil.copytree(first, calm)
    shutil.copytree(first, stormy)
    resume = [*train, "--steps", "8", "--resume"]
    assert main([*resume, "--out", str(calm)]) == 0

    full = subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", *resume, "--out", stormy], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=_small_disk(limit))
    checkpoints = stormy / "checkpoints"
    assert full.returncode == 1, full.stderr
    assert full.stderr.strip().splitlines()[-1] == (
        f"lmspec train: error: cannot write {checkpoints / 'step_000008'}: File too large; the last checkpoint, "
        f"{checkpoints / 'step_000004'}, is intact: free some space and resume with --resume")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000004"]  # no half of step 8

    assert main([*resume, "--out", str(stormy)]) == 0
    a = load_file(checkpoints / "step_000008" / "model.safetensors")
    b = load_file(calm / "checkpoints" / "step_000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-identical to the run without a fault
    assert losses(stormy) == losses(calm)


def test_a_full_disk_in_the_data_pipeline_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    shakespeare = VERDICT.parent / "tinyshakespeare.txt"
    cases = {  # the command, and the file the disk refuses
        "data prepare": (["data", "prepare", shakespeare, "-o", tmp_path / "prepared"],
                         tmp_path / "prepared" / "documents.jsonl"),
        "data tokenize": (["data", "tokenize", shakespeare, "--tokenizer", VERDICT.parent / "gpt2-tokenizer",
                           "-o", tmp_path / "shards"], tmp_path / "shards" / "train_000.bin"),
        "tokenizer train": (["tokenizer", "train", shakespeare, "--vocab-size", "3000", "-o", tmp_path / "tok.json"],
                            tmp_path / "tok.json"),
    }
    for verb, (args, refused) in cases.items():
        out = subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", *map(str, args), "--no-progress"]
                             if verb != "tokenizer train" else
                             [sys.executable, "-m", "lmspec.runtime.cli", *map(str, args)],
                             cwd=ROOT, capture_output=True, text=True, preexec_fn=_small_disk(20_000))
        assert out.returncode == 1
        assert out.stderr.strip().splitlines() == [f"lmspec {verb}: error: cannot write {refused}: File too large"]
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [], left  # no half of a file, no temporary, no folder the command made
