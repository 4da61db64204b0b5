"""`--device` on the verbs that finetune, measure and talk to a checkpoint (finetune classify,
instruct and dpo, eval, chat): each builds every model it needs on the device it resolved, a device
that is not there is one line before any work, and `--device cpu` is exactly what no flag gives."""
import io
import json

import pytest
import torch
from safetensors.torch import load_file

from runtime_helpers import SHARED_DATA, finetune_spam, lmspec_cli
from lmspec.runtime.cli.main import main
from lmspec.runtime.distributed.device import resolve_device
from lmspec.runtime.data.tokenizer_training import train_bpe

VERDICT = SHARED_DATA / "the-verdict.txt"
SMS = SHARED_DATA / "SMSSpamCollection.tsv"
PREFERENCES = SHARED_DATA / "instruction-data-with-preference.json"
VERBS = ("finetune classify", "finetune instruct", "finetune dpo", "eval", "chat")
# the models each verb builds: dpo a policy and its frozen reference, classify the base and the
# base with its new head
BUILDS = {"finetune classify": 2, "finetune instruct": 1, "finetune dpo": 2, "eval": 1, "chat": 1}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
# where CUDA is, no flag means the GPU: comparing it with the CPU bit for bit would be wrong
auto_is_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="no flag means the GPU here")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model with a small BPE, trained 3 steps: every verb here can start from it. Its
    context holds the short preference records below, which serve instruct (their output) and dpo."""
    if not VERDICT.is_file():
        pytest.skip(f"shared data not found at {VERDICT}")
    root = tmp_path_factory.mktemp("verbs")  # no "device" in the paths meta.json records
    tok = root / "tok.json"
    train_bpe(iter([VERDICT.read_text(encoding="utf-8")]), 300, tok)
    run = root / "base"
    assert main(["train", "specs/tiny.arch", "--set", "layers=2", "--set", "dim=32", "--set", "heads=2",
                 "--set", "context=256", "--data", str(VERDICT), "--tokenizer", str(tok), "--steps", "3",
                 "--batch", "4", "--eval-batches", "2", "--no-progress", "--sample-tokens", "0",
                 "--out", str(run)]) == 0
    records = [r for r in json.loads(PREFERENCES.read_text(encoding="utf-8")) if len(json.dumps(r)) < 200]
    (root / "short.json").write_text(json.dumps(records[:8]), encoding="utf-8")
    return run


def _argv(verb: str, base, out) -> list[str]:
    """A cheap run of `verb` from `base`, writing only under the directory `out`."""
    records = str(base.parent / "short.json")
    quick = ["--limit", "8", "--epochs", "1", "--no-progress"]
    return {
        "finetune classify": ["finetune", "classify", str(base), "--data", str(SMS), "--labels", "ham,spam",
                              "--balance", "--max-length", "16", "--out", str(out / "run"), *quick],
        "finetune instruct": ["finetune", "instruct", str(base), "--data", records, "--out", str(out / "run"), *quick],
        "finetune dpo": ["finetune", "dpo", str(base), "--data", records, "--out", str(out / "run"), *quick],
        "eval": ["eval", str(base), "--data", str(VERDICT), "--max-tokens", "100", "--format", "json",
                 "--out", str(out / "eval.json")],
        "chat": ["chat", str(base), "--max-tokens", "3"],
    }[verb]


def _one_line_error(err: str, verb: str) -> str:
    assert err.startswith(f"lmspec {verb}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@no_cuda
@pytest.mark.parametrize("verb", VERBS)
def test_cuda_where_there_is_none_is_one_line_before_any_work(verb, base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(_argv(verb, base, tmp_path) + ["--device", "cuda"]) == 2
    out, err = capsys.readouterr()
    assert "CUDA is not available" in _one_line_error(err, verb) and "--device cpu" in err
    assert out == "" and list(tmp_path.iterdir()) == []  # no run directory, no report: nothing was done


@pytest.mark.parametrize("verb", VERBS)
def test_a_malformed_device_is_a_usage_error(verb, base, tmp_path, capsys):
    assert main(_argv(verb, base, tmp_path) + ["--device", "gpu7"]) == 2
    assert "--device gpu7: expected auto, cpu, cuda or cuda:N" in _one_line_error(capsys.readouterr().err, verb)
    assert list(tmp_path.iterdir()) == []


@no_cuda
def test_the_real_command_line_prints_the_one_line_only(base, tmp_path):
    """In a process of its own: no warning from torch's CUDA probing adds to the line."""
    proc = lmspec_cli(*_argv("finetune classify", base, tmp_path), "--device", "cuda", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "CUDA is not available" in _one_line_error(proc.stderr, "finetune classify")


@pytest.mark.parametrize("verb", VERBS)
def test_every_model_a_verb_builds_is_on_the_device_it_resolved(verb, base, tmp_path, monkeypatch):
    """With no flag (auto: the CPU here) every build is given the resolved device, not left to
    lower's default: on a GPU machine the same code puts them all on the GPU."""
    import lmspec.compiler.lower as lowering

    built, real_lower = [], lowering.lower

    def recording_lower(graph, seed=0, device=None):
        built.append(device)
        return real_lower(graph, seed=seed, device=device)

    monkeypatch.setattr(lowering, "lower", recording_lower)
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a colour.\n"))
    assert main(_argv(verb, base, tmp_path)) == 0
    assert built == [resolve_device("auto")] * BUILDS[verb]


@auto_is_cpu
def test_device_cpu_finetunes_the_same_classifier_bit_for_bit(base, tmp_path):
    runs = {"auto": tmp_path / "auto", "cpu": tmp_path / "cpu"}
    assert finetune_spam(base, runs["auto"]) == 0 and finetune_spam(base, runs["cpu"], "--device", "cpu") == 0
    steps = {name: next((run / "checkpoints").glob("step_*")) for name, run in runs.items()}
    weights = {name: load_file(step / "model.safetensors") for name, step in steps.items()}
    assert weights["auto"].keys() == weights["cpu"].keys()
    assert all(torch.equal(weights["auto"][n], weights["cpu"][n]) for n in weights["auto"])
    meta = {name: (step / "meta.json").read_text() for name, step in steps.items()}
    # the same record, and no device in it: a checkpoint finetuned on a GPU loads anywhere
    assert meta["auto"] == meta["cpu"] and "cuda" not in meta["cpu"] and "device" not in meta["cpu"]


@auto_is_cpu
def test_device_cpu_measures_the_same_perplexity(base, tmp_path, capsys):
    results = []
    for extra in ([], ["--device", "cpu"]):
        assert main(["eval", str(base), "--data", str(VERDICT), "--max-tokens", "300", "--format", "json", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["perplexity"] == results[1]["perplexity"] and results[0]["tokens"] == 300
