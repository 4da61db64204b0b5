"""Input that is not text: `data prepare`, `train --data` and `tokenizer train` refuse compressed,
archived, binary or UTF-16 files by name instead of ingesting them as a document; an empty corpus or an
empty validation split is an error naming the option that fixes it."""
from __future__ import annotations

import gzip
import io
import random
import tarfile
import zipfile

import pytest
from runtime_helpers import ROOT, VERDICT

from lmspec.runtime.cli.main import main
from lmspec.runtime.data.sniff import not_text

TEXT = VERDICT.read_text(encoding="utf-8")[:3000]


def _tar() -> bytes:
    data, buffer = TEXT.encode(), io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("a.txt", TEXT)
    return buffer.getvalue()


NOT_TEXT = {
    "gzip-compressed, not text: decompress it first (gunzip)": gzip.compress(TEXT.encode()),
    "a ZIP archive, not text": _zip(),
    "a tar archive, not text": _tar(),
    "a PDF document, not text": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj",
    "a PNG image, not text": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "an executable, not text": b"\x7fELF\x02\x01\x01" + bytes(100),
    "UTF-16 text, not UTF-8: convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)": TEXT.encode("utf-16"),
    "UTF-16 text without a byte-order mark": TEXT.encode("utf-16-le"),
    "binary data (": random.Random(0).randbytes(5000),
}
TEXTS = {
    "English": TEXT.encode(),
    "UTF-8 with a byte-order mark": "\ufeff".encode() + TEXT.encode(),
    "a stray NUL and bell, which cleaning drops": "Cafe\u0301 bell\x07 tab\there\rend\x00  \n".encode(),
    "a log with colour codes": b"\x1b[31merror\x1b[0m: disk full\n" * 50,
    "Japanese": "日本語のテキストです。".encode() * 100,
}


@pytest.mark.parametrize("expected", NOT_TEXT)
def test_what_is_not_text_is_named(expected):
    assert not_text(NOT_TEXT[expected]).startswith(expected)


@pytest.mark.parametrize("kind", TEXTS)
def test_text_is_text(kind):
    assert not_text(TEXTS[kind]) is None


def test_every_reader_of_text_refuses_a_compressed_file_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.txt").write_bytes(gzip.compress(TEXT.encode()))  # named .txt, but gzip inside
    packed = corpus / "b.txt"
    for args in (["train", "specs/tiny.arch", "--data", str(corpus), "--steps", "1", "--out", str(tmp_path / "run")],
                 ["data", "prepare", str(corpus), "-o", str(tmp_path / "prepared"), "--no-progress"],
                 ["data", "prepare", str(packed), "-o", str(tmp_path / "prepared"), "--no-progress"],
                 ["tokenizer", "train", str(corpus), "--vocab-size", "300", "-o", str(tmp_path / "tok.json")]):
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{packed}: gzip-compressed, not text: decompress it first (gunzip)" in err[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no run, no prepared folder, no tokenizer


def test_an_empty_corpus_or_validation_split_names_the_option_that_fixes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n")
    assert main(["data", "prepare", str(short), "-o", str(tmp_path / "p"), "--min-chars", "100", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == (
        "lmspec data prepare: error: no document is left of 1 document(s) in 1 file(s) (1 too short); nothing was "
        "written; try a lower --min-chars")
    assert not (tmp_path / "p").exists()

    assert main(["tokenizer", "train", str(VERDICT), "--vocab-size", "300", "-o", str(tmp_path / "tok.json")]) == 0
    capsys.readouterr()
    assert main(["data", "tokenize", str(short), "--tokenizer", str(tmp_path / "tok.json"),
                 "-o", str(tmp_path / "shards"), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == (
        "lmspec data tokenize: error: no document goes to validation: 1 document(s) x --val-fraction 0.1 < 1; give "
        "more documents, a larger --val-fraction, or --val-fraction 0 for none")
    assert not (tmp_path / "shards").exists()  # nor an empty folder that would stand in the way of the rerun
    (tmp_path / "kept").mkdir()  # a folder the user made stays
    assert main(["data", "tokenize", str(short), "--tokenizer", str(tmp_path / "tok.json"),
                 "-o", str(tmp_path / "kept"), "--no-progress"]) == 1
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    capsys.readouterr()

    small = tmp_path / "small.txt"
    small.write_text(TEXT[:1000])  # 900 characters train, 100 validate: too few for --seq 128
    assert main(["train", "specs/tiny.arch", "--data", str(small), "--steps", "1", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "error: the validation split has 100 tokens, fewer than sequence length + 1 = 129; use more data or a "
        "shorter --seq")
