"""The data pipeline from the command line: prepare -> tokenizer train -> tokenize -> train -> sample."""
import json

import pytest

from runtime_helpers import SHARED_DATA as DATA, lmspec_cli, lmspec_main

GPT2 = DATA / "gpt2-tokenizer"


def test_gpt2_tokenizer_from_the_cli():
    out = lmspec_cli("tokenizer", "encode", GPT2, "Hello, world. Is this-- a test?")  # the one real process
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == "15496 11 995 13 1148 428 438 257 1332 30".split()
    count = lmspec_main("tokenizer", "encode", GPT2, "--file", DATA / "the-verdict.txt", "--count")
    assert count.stdout.strip() == "5145"
    back = lmspec_main("tokenizer", "decode", GPT2, *out.stdout.split())
    assert back.stdout == "Hello, world. Is this-- a test?\n"


@pytest.mark.slow  # the README tour (tests/test_readme_tour.py) runs the same pipeline end to end
def test_prepare_tokenize_train_sample(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    scenes = (DATA / "tinyshakespeare.txt").read_text().split("\n\n")[:600]
    for i, scene in enumerate(scenes):
        (corpus / f"{i:04d}.txt").write_text(scene)
    (corpus / "copy.txt").write_text(scenes[10])  # an exact duplicate
    (corpus / "sub").mkdir()
    (corpus / "sub" / "near.txt").write_text(scenes[20].replace("the", "thy", 1) if "the" in scenes[20] else scenes[20])

    prepared = tmp_path / "prepared"
    out = lmspec_main("data", "prepare", corpus, "--out", prepared, "--no-progress", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["documents_in"] == 602
    assert report["removed"]["exact_duplicates"] >= 1
    assert json.loads((prepared / "report.json").read_text())["documents_out"] == report["documents_out"]

    tok = tmp_path / "tok.json"
    out = lmspec_main("tokenizer", "train", prepared, "--vocab-size", "400", "--out", tok, "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "<|endoftext|>=0" in out.stdout and "<|im_end|>=3" in out.stdout

    shards = tmp_path / "shards"
    out = lmspec_main("data", "tokenize", prepared, "--tokenizer", tok, "--out", shards, "--no-progress")
    assert out.returncode == 0, out.stderr
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["splits"]["val"]["tokens"] > 0

    run = tmp_path / "run"
    out = lmspec_main("train", "specs/tiny.arch", "--set", "layers=1", "--set", "dim=32", "--set", "heads=2",
                      "--set", "context=32", "--data", shards, "--out", run, "--steps", "4", "--eval-every", "2",
                      "--eval-batches", "2", "--no-progress", "--sample-tokens", "0")
    assert out.returncode == 0, out.stderr
    assert "vocab = 400" in out.stdout
    sample = lmspec_main("sample", run, "--prompt", "ROMEO:", "--max-tokens", "5", "--seed", "0")
    assert sample.returncode == 0 and sample.stdout.startswith("ROMEO:")

    other = lmspec_main("train", "specs/tiny.arch", "--data", shards, "--tokenizer", GPT2, "--out", tmp_path / "r2")
    assert other.returncode != 0 and "another tokenizer" in other.stderr


def test_bad_data_inputs_are_clear_errors(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    cases = [
        (["tokenizer", "train", tmp_path / "blank.txt", "--vocab-size", "300", "--out", tmp_path / "t.json"],
         "blank.txt: no text to train on"),
        (["data", "prepare", tmp_path / "missing", "--out", tmp_path / "p"], "missing"),
        (["data", "tokenize", tmp_path / "missing", "--tokenizer", GPT2, "--out", tmp_path / "s"], "missing"),
        (["tokenizer", "train", DATA / "the-verdict.txt", "--vocab-size", "10", "--out", tmp_path / "t.json"],
         "vocab"),
        (["tokenizer", "decode", GPT2, "x1"], "integers"),
    ]
    for args, words in cases:
        out = lmspec_main(*args)
        assert out.returncode != 0, args
        assert words in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "t.json").exists()  # a tokenizer of bytes alone, trained on nothing, is not written
