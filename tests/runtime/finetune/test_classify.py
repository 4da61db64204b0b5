"""Classification finetuning: reading, balancing and splitting labelled texts, characters a
vocabulary lacks, frozen weights that stay bit-identical, `lmspec finetune classify` and `lmspec
classify` end to end (with and without LoRA), their errors as one clear line, and (slow) the book's
SMS spam result from a model lmspec pretrained."""
import json
import re
import sys

import pytest
import torch

from diverging import GoesBad
from runtime_helpers import SMS, a_past_peak, finetune_spam, lmspec_cli, train_tiny_base
from lmspec.compiler import load_spec
from lmspec.compiler.classify_head import classification_head
from lmspec.compiler.lower import lower
from lmspec.runtime.checkpoint.store import load_checkpoint, read_tensors
from lmspec.runtime.finetune.classifier import trainable_names
from lmspec.runtime.finetune.classify_data import Example, balance, make_batch, parse_split, read_examples, split
from lmspec.runtime.finetune.classify_train import Encoded, train_classifier
from lmspec.runtime.cli.main import main
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.data.text_encoder import TextEncoder
from lmspec.runtime.data.tokenizer import CharTokenizer
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.metrics import read_metrics
from lmspec.runtime.errors import TrainingError, UsageError



def test_sms_data_balanced_and_split_as_the_book():
    examples = read_examples(str(SMS), ["ham", "spam"])
    assert [sum(e.label == i for e in examples) for i in (0, 1)] == [4827, 747]
    balanced = balance(examples, seed=123)
    assert [sum(e.label == i for e in balanced) for i in (0, 1)] == [747, 747]
    parts = split(balanced, parse_split("0.7,0.1,0.2"), seed=123)
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [1045, 149, 300]
    assert split(balanced, (0.7, 0.1, 0.2), seed=123) == parts  # the seed fixes it
    assert any('"' in e.text for e in examples)  # quotes are text in a .tsv, not csv quoting


def test_csv_with_header_and_jsonl_fields(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('id,text,label\n1,"hello, there",pos\n2,bad,neg\n')
    assert read_examples(str(csv_file), ["neg", "pos"]) == [Example("hello, there", 1), Example("bad", 0)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "fine", "y": "pos"}\n\n{"body": "awful", "y": "neg"}\n')
    assert read_examples(str(jsonl), ["neg", "pos"], text_field="body", label_field="y") == \
        [Example("fine", 1), Example("awful", 0)]
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\tok\nspan\toops\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: label 'span' is not one of --labels ham,spam"):
        read_examples(str(bad), ["ham", "spam"])
    for text in ("0.7,0.3", "0.5,0.5,0.5", "0,0.5,0.5", "a,b,c"):
        with pytest.raises(UsageError, match="--split"):
            parse_split(text)


def test_characters_the_vocabulary_lacks():
    encoder = TextEncoder(CharTokenizer("?abcef "), max_length=6, pad_id=0)
    assert encoder.encode("café £5 abc") == encoder.tokenizer.encode("cafe ?")  # folded, replaced, cut at 6
    assert encoder.replaced == 3  # é, £, 5 (counted while encoding)
    assert encoder.encode("£") == encoder.tokenizer.encode("?")
    tokens, lengths = make_batch([[1, 2, 3], [4]], pad_id=9)
    assert tokens.tolist() == [[1, 2, 3], [4, 9, 9]] and lengths.tolist() == [3, 1]


def test_frozen_weights_stay_bit_identical(tmp_path):
    graph = classification_head(load_spec("specs/tiny.arch", {"layers": 3, "dim": 32, "heads": 2, "context": 32}),
                                classes=2)
    model = lower(graph, seed=0)
    names = set(trainable_names(graph, 1))
    assert names == {n for n in graph.params if n.startswith(("block.2.", "ln_f.", "classifier."))}
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (int(n),), generator=gen).tolist() for n in torch.randint(1, 20, (16,), generator=gen)]
    data = Encoded(ids, [i % 2 for i in range(16)])
    cfg = TrainConfig(steps=4, batch=8, lr=1e-2, warmup=0).resolved(32)
    train_classifier(model, data, Encoded(ids[:4], data.labels[:4]), cfg, epochs=2, pad_id=0, run_dir=tmp_path,
                     progress=False)
    for name, p in model.named_parameters():
        if name in names:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("part, message", [
    ("loss", "the loss became nan at step 3; try a lower --lr"),
    # before: a NaN gradient norm went unread, and AdamW's update left NaN weights to be saved
    ("gradient", "the gradient norm became nan at step 3, so its update left weights that are not finite"),
])
def test_a_diverging_loss_is_named_by_its_step(tmp_path, part, message):
    """An epoch's losses are read at its end: step 3 (the first of epoch 2) goes bad and is named."""
    graph = classification_head(load_spec("specs/tiny.arch", {"layers": 1, "dim": 16, "heads": 2, "context": 32}),
                                classes=2)
    data = Encoded([[1, 2, 3]] * 16, [i % 2 for i in range(16)])
    cfg = TrainConfig(steps=4, batch=8, lr=1e-2, warmup=0).resolved(32)
    with pytest.raises(TrainingError, match=message):
        train_classifier(GoesBad(lower(graph, seed=0), after=2, part=part), data, Encoded([], []), cfg, epochs=2, pad_id=0,
                         run_dir=tmp_path, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2]  # epoch 1's record


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return train_tiny_base(tmp_path_factory.mktemp("classify") / "base")


finetune = finetune_spam


def test_finetune_and_classify_end_to_end(base_run, tmp_path, capsys):
    out = tmp_path / "spam"
    peak_before = a_past_peak()
    assert finetune(base_run, out, "--trainable-blocks", "1") == 0
    printed = capsys.readouterr().out
    [epoch] = read_metrics(out / "metrics.jsonl")
    assert epoch["tokens_per_s"] > 0 and epoch["peak_memory_bytes"] > 0
    if sys.platform == "linux":  # the run's own peak: the high-water mark was reset as it started
        assert epoch["peak_memory_bytes"] < peak_before - 256 * 2 ** 20
    confusion = json.loads((out / "confusion.json").read_text())
    assert confusion["labels"] == ["ham", "spam"] and (out / "confusion.png").is_file()
    for name, count in (("train", 33), ("validation", 4), ("test", 11)):
        s = confusion["splits"][name]
        assert sum(map(sum, s["matrix"])) == s["count"] == count
        diagonal = s["matrix"][0][0] + s["matrix"][1][1]
        assert s["accuracy"] == pytest.approx(diagonal / count)
        shown = re.search(rf"^{name} accuracy: ([\d.]+)% \({count} texts\)$", printed, re.M)
        assert shown and float(shown.group(1)) == pytest.approx(100 * diagonal / count, abs=0.006)
    assert "predicted:" in printed and "true spam" in printed
    ckpt = load_checkpoint(out)
    assert ckpt.spec["rewrites"] == [{"kind": "classify", "classes": 2, "labels": ["ham", "spam"]}]
    assert "base" not in ckpt.spec and "classifier.weight" in read_tensors(ckpt.path / "model.safetensors")
    assert ckpt.metrics["test_accuracy"] == confusion["splits"]["test"]["accuracy"]

    assert main(["classify", str(out), "WINNER!! claim your prize", "ok see you soon"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].endswith("ok see you soon")
    for line in lines:
        label, prob, _ = line.split(maxsplit=2)
        assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0


def test_lora_classifier_saves_only_what_it_trained(base_run, tmp_path, capsys):
    pytest.importorskip("lmspec.compiler.lora")
    out = tmp_path / "spam-lora"
    assert finetune(base_run, out, "--lora", "4") == 0
    printed = capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert [r["kind"] for r in ckpt.spec["rewrites"]] == ["classify", "lora"] and ckpt.spec["base"]
    saved = read_tensors(ckpt.path / "model.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= set(saved)
    assert all(n.startswith("classifier.") or n.endswith((".lora_a", ".lora_b")) for n in saved)
    assert "LoRA" in printed
    assert main(["classify", str(out), "free entry"]) == 0
    assert capsys.readouterr().out.split()[0] in ("ham", "spam")


def test_errors_are_one_clear_line(base_run, tmp_path, capsys):
    one_class = tmp_path / "one.tsv"
    one_class.write_text("ham\thello\nham\tthere\n")
    unknown = tmp_path / "unknown.tsv"
    unknown.write_text("ham\thello\nspan\tthere\n")
    cases = [
        (["--data", str(tmp_path / "missing.tsv")], "no such file"),
        (["--data", str(unknown)], "unknown.tsv:2: label 'span'"),
        (["--data", str(one_class)], "no example of spam"),
        (["--labels", "spam"], "at least two labels"),
        (["--split", "0.8,0.3,0.1"], "--split"),
        (["--trainable-blocks", "7"], "the model has 2 blocks"),
    ]
    for extra, message in cases:
        args = ["finetune", "classify", str(base_run), "--data", str(SMS), "--labels", "ham,spam",
                "--out", str(tmp_path / "never"), "--no-progress", *extra]
        assert main(args) != 0, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert main(["classify", str(base_run), "hello"]) != 0
    err = capsys.readouterr().err
    assert "not a classifier" in err and len(err.strip().splitlines()) == 1
    proc = lmspec_cli("classify", tmp_path / "nothing", "hi")  # the real command line too
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "no such file" in proc.stderr


# ---------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_pretrained_then_finetuned_reaches_the_books_accuracy(tmp_path, capsys):
    """lmspec pretrains tiny.arch on its built-in corpus, then finetunes it on balanced SMS spam:
    test accuracy >= 95% (the book's GPT-2 small: 95.67%)."""
    base = tmp_path / "base"
    assert main(["train", "specs/tiny.arch", "--steps", "600", "--no-progress", "--sample-tokens", "0",
                 "--out", str(base)]) == 0
    out = tmp_path / "spam"
    assert main(["finetune", "classify", str(base), "--data", str(SMS), "--labels", "ham,spam", "--balance",
                 "--epochs", "4", "--no-progress", "--out", str(out)]) == 0
    accuracy = json.loads((out / "confusion.json").read_text())["splits"]["test"]["accuracy"]
    print(capsys.readouterr().out)
    assert accuracy >= 0.95
