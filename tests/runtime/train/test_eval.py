"""`lmspec eval`: a language model's perplexity equals exp of the mean cross-entropy computed
directly on the same windows (and the scoring reproduces training's logged val loss), text and
shards of the same tokens agree, a classifier's accuracy is what finetuning printed for the same
split, an instruction-tuned model's answers and loss match finetuning's, and errors are one line."""
import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from runtime_helpers import SHARED_DATA, lmspec_cli, train_bpe_lm, train_tiny_base
from lmspec.runtime.checkpoint.store import load_checkpoint
from lmspec.runtime.cli.main import main
from lmspec.runtime.data.token_data import TokenData
from lmspec.runtime.train.perplexity import score_batches
from lmspec.runtime.checkpoint.models import load_model
from lmspec.runtime.train.metrics import read_metrics
from lmspec.runtime.data.tokenizer import load_tokenizer

VERDICT = SHARED_DATA / "the-verdict.txt"
SMS = SHARED_DATA / "SMSSpamCollection.tsv"
INSTRUCTIONS = SHARED_DATA / "instruction-data.json"
CONTEXT = 128


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A small byte-level BPE, a language model trained 3 steps with it, a classifier and an
    instruction-tuned model finetuned from that model (what each finetuning printed is kept)."""
    root = tmp_path_factory.mktemp("eval")
    tok, lm = train_bpe_lm(root, CONTEXT, eval_batches=3)
    return {"root": root, "tok": tok, "lm": lm}


@pytest.fixture(scope="module")
def classifier(runs):
    out = runs["root"] / "spam"
    printed = _printed(["finetune", "classify", str(runs["lm"]), "--data", str(SMS), "--labels", "ham,spam",
                        "--balance", "--limit", "48", "--epochs", "1", "--max-length", "24", "--no-progress",
                        "--out", str(out)])
    return out, printed


@pytest.fixture(scope="module")
def instruct(runs):
    out = runs["root"] / "instruct"
    answers = runs["root"] / "finetune-answers.jsonl"
    data = runs["root"] / "short.jsonl"  # records whose answers fit the small context
    records = json.loads(INSTRUCTIONS.read_text(encoding="utf-8"))
    data.write_text("".join(json.dumps(r) + "\n" for r in records if len(json.dumps(r)) < 110), encoding="utf-8")
    printed = _printed(["finetune", "instruct", str(runs["lm"]), "--data", str(data), "--limit", "40",
                        "--epochs", "1", "--batch", "8", "--no-progress", "--responses", str(answers),
                        "--response-tokens", "6", "--out", str(out)])
    return out, answers, printed


def _printed(argv: list[str]) -> str:
    """What the command printed; it must succeed. (capsys is function-scoped, so capture here.)"""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()


def _eval_json(*argv) -> dict:
    return json.loads(_printed(["eval", *map(str, argv), "--format", "json"]))


# ------------------------------------------------------------------------------------ language model

def test_perplexity_is_exp_of_the_mean_cross_entropy_over_non_overlapping_windows(runs):
    seq = 32
    result = _eval_json(runs["lm"], "--data", VERDICT, "--seq", seq, "--batch", "5")
    loaded = load_model(runs["lm"])
    ids = torch.tensor(load_tokenizer(loaded.checkpoint.tokenizer).encode(VERDICT.read_text(encoding="utf-8")))
    total, count = 0.0, 0
    with torch.no_grad():  # one window at a time, the last one shorter: every token but the first, once
        for start in range(0, len(ids) - 1, seq):
            window = ids[start:start + seq + 1]
            logits = loaded.model(window[None, :-1])
            total += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
            count += len(window) - 1
    assert result["kind"] == "language-model" and result["split"] == "all" and result["seq"] == seq
    assert result["tokens"] == count == len(ids) - 1
    assert result["windows"] == math.ceil((len(ids) - 1) / seq)
    assert result["cross_entropy"] == pytest.approx(total / count, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_scoring_reproduces_the_val_loss_training_logged(runs):
    """On training's own validation windows, eval's scoring gives the logged val loss."""
    loaded = load_model(runs["lm"])
    cfg = loaded.checkpoint.train_config
    ids = load_tokenizer(loaded.checkpoint.tokenizer).encode(VERDICT.read_text(encoding="utf-8"))
    windows = TokenData(torch.tensor(ids)).val_batches(cfg["batch"], CONTEXT, cfg["eval_batches"])
    logged = [r["val_loss"] for r in read_metrics(runs["lm"] / "metrics.jsonl") if "val_loss" in r][-1]
    assert score_batches(loaded.model, windows).mean == pytest.approx(logged, rel=1e-5)


def test_text_and_shards_of_the_same_tokens_give_the_same_number(runs):
    shards = runs["root"] / "shards"
    assert main(["data", "tokenize", str(VERDICT), "--tokenizer", str(runs["tok"]), "--out", str(shards),
                 "--val-fraction", "0", "--no-progress"]) == 0
    text = runs["root"] / "verdict-eot.txt"  # a shard document ends with <|endoftext|>; so does this text
    text.write_text(VERDICT.read_text(encoding="utf-8") + "<|endoftext|>", encoding="utf-8")
    from_text = _eval_json(runs["lm"], "--data", text, "--max-tokens", "700")
    from_shards = _eval_json(runs["lm"], "--data", shards, "--max-tokens", "700", "--batch", "3")
    assert from_text["tokens"] == from_shards["tokens"] == 700
    assert from_shards["cross_entropy"] == pytest.approx(from_text["cross_entropy"], rel=1e-6)


def test_splits_follow_training_and_the_human_output(runs, capsys):
    loaded = load_model(runs["lm"])
    ids = load_tokenizer(loaded.checkpoint.tokenizer).encode(VERDICT.read_text(encoding="utf-8"))
    val = _eval_json(runs["lm"], "--data", VERDICT, "--split", "validation")
    assert val["tokens"] == len(TokenData(torch.tensor(ids)).val) - 1 and val["seq"] == CONTEXT
    assert main(["eval", str(runs["lm"]), "--data", str(VERDICT), "--max-tokens", "50"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r": 50 tokens in 1 windows of 128\ncross-entropy [\d.]+ nats/token, perplexity [\d.]+$",
                     printed.strip()), printed


# ---------------------------------------------------------------------------------------- classifier

def test_classifier_accuracy_is_what_finetuning_printed_for_its_test_split(classifier, tmp_path, capsys):
    out, printed = classifier
    shown = re.search(r"^test accuracy: ([\d.]+)% \((\d+) texts\)$", printed, re.M)
    saved = json.loads((out / "confusion.json").read_text())["splits"]["test"]
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--out", str(report)]) == 0  # the data and split come from the checkpoint
    human = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["kind"] == "classifier" and result["split"] == "test" and result["labels"] == ["ham", "spam"]
    assert result["count"] == saved["count"] == int(shown.group(2)) == 11
    assert result["accuracy"] == saved["accuracy"] and result["matrix"] == saved["matrix"]
    assert f"accuracy {float(shown.group(1)):.2f}% (11 texts)" in human and "true spam" in human
    whole = _eval_json(out, "--data", SMS, "--split", "all")  # the whole file: every row
    assert whole["count"] == sum(1 for line in SMS.read_text(encoding="utf-8").splitlines() if line.strip())


# ------------------------------------------------------------------------------------------ instruct

def test_instruct_answers_the_test_split_and_scores_its_loss(instruct, runs, tmp_path):
    out, finetune_answers, printed = instruct
    answers = tmp_path / "answers.jsonl"
    result = _eval_json(out, "--responses", answers, "--response-tokens", "6")
    records = re.search(r"(\d+) records: (\d+) train, (\d+) validation, (\d+) test", printed).groups()
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert result["kind"] == "instruct" and result["split"] == "test" and result["records"] == int(records[3])
    assert len(lines) == int(records[3]) and all(isinstance(a["model_response"], str) for a in lines)
    assert answers.read_text() == finetune_answers.read_text()  # the same records, the same greedy answers
    assert result["loss"] > 0 and result["answer_tokens"] > 0
    val = _eval_json(out, "--split", "validation")
    assert val["loss"] == pytest.approx(load_checkpoint(out).metrics["val_loss"], rel=1e-5)


# -------------------------------------------------------------------------------------------- errors

def test_errors_are_one_clear_line(runs, classifier, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(load_checkpoint(runs["lm"]).path, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    unlabelled = tmp_path / "plain.tsv"
    unlabelled.write_text("just some text without a label\n")
    characters = train_tiny_base(tmp_path / "char")  # a character vocabulary, from the-verdict
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("the verdict\nwas na\u00efve\n")
    cases = [
        ([str(characters), "--data", str(foreign)],
         f"{foreign}: character '\u00ef' (U+00EF) at line 2, column 7 is not in the tokenizer's vocabulary"),
        ([str(tmp_path / "nothing"), "--data", str(VERDICT)], "no such file"),
        ([str(corrupt), "--data", str(VERDICT)], "model.safetensors"),
        ([str(runs["lm"]), "--data", str(VERDICT), "--seq", "256"], "longer than the model's context 128"),
        ([str(runs["lm"]), "--data", str(tmp_path / "missing.txt")], "no such file"),
        ([str(runs["lm"])], "--data is required"),
        ([str(runs["lm"]), "--data", str(VERDICT), "--responses", str(tmp_path / "r.jsonl")], "instruction-tuned"),
        ([str(classifier[0]), "--data", str(VERDICT)], "expected a .tsv, .csv or .jsonl file"),
        ([str(classifier[0]), "--data", str(unlabelled)], "plain.tsv:1: expected a label and a text"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv]) != 0, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    proc = lmspec_cli("eval", corrupt, "--data", VERDICT, "--format", "json")  # the real command line
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lmspec eval: error:") and len(proc.stderr.strip().splitlines()) == 1
