"""Real dataset formats (issue 24): text, JSON Lines (plain, gzip, zstd), Parquet and saved `datasets`
directories all read as the same documents through the entry points `data prepare`, `data tokenize`,
`tokenizer train` and `train --data` use; `--text-field` picks the column; a long text file streams in
pieces that tokenize as the whole does; a file whose bytes are not what its name says, or not text,
is refused with one line and exit 1."""
from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from runtime_helpers import SHARED_DATA, lmspec_main

from lmspec.runtime.data import formats
from lmspec.runtime.data.corpus import read_text_data
from lmspec.runtime.data.documents import iter_input_documents, list_input_files, read_documents
from lmspec.runtime.data.prepare import iter_documents, prepare
from lmspec.runtime.data.report import Tally
from lmspec.runtime.data.shards import ShardData, write_shards
from lmspec.runtime.data.tokenizer import FileTokenizer
from lmspec.runtime.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
        "Café, naïve, 日本語 ✓ — and an emoji 👩‍👩‍👧",
        "  indented first line\n\nand a blank line inside\n",
        "a literal <|endoftext|> inside a document stays text"]
GPT2 = SHARED_DATA / "gpt2-tokenizer"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


def _jsonl(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


def _write(tmp_path, kind: str, docs=DOCS, field="text"):
    """`docs` in format `kind` under tmp_path; the path to give lmspec."""
    if kind == "txt":  # a text file is one document: a folder of them
        folder = tmp_path / "texts"
        folder.mkdir()
        for i, doc in enumerate(docs):
            (folder / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
        return folder
    path = tmp_path / f"corpus.{kind}"
    if kind == "jsonl":
        path.write_bytes(_jsonl(docs, field))
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress(_jsonl(docs, field)))
    elif kind == "jsonl.zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl(docs, field)))
    elif kind == "parquet":
        # small row groups and batches, so that reading crosses both
        pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=3)
    elif kind in ("datasets", "datasetdict"):
        datasets = pytest.importorskip("datasets")
        datasets.disable_progress_bars()
        dataset = datasets.Dataset.from_dict({field: docs, "id": list(range(len(docs)))})
        path = tmp_path / kind
        if kind == "datasets":
            dataset.save_to_disk(str(path))
        else:  # the train split is read; the others are for evaluation
            held_out = datasets.Dataset.from_dict({field: ["never read"], "id": [-1]})
            datasets.DatasetDict({"train": dataset, "test": held_out}).save_to_disk(str(path))
    return path


FORMATS = ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "datasets", "datasetdict"]


@pytest.fixture(scope="module")
def gpt2():
    if not (GPT2 / "encoder.json").is_file():
        pytest.skip(f"GPT-2 vocabulary not found at {GPT2}")
    return FileTokenizer.from_path(GPT2)


# ----------------------------------------------------------------------------- the same documents

@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_reads_the_same_documents_through_every_entry_point(tmp_path, kind):
    path = _write(tmp_path, kind)
    files = list_input_files([str(path)])
    # data tokenize and tokenizer train: streamed, problems raised
    assert [d.text for d in read_documents(files)] == DOCS
    # data prepare: whole documents, problems tallied
    tally = Tally()
    assert [d.text for d in iter_input_documents(files, "text", tally)] == DOCS
    assert tally.bad_json_count == 0 and not tally.skipped_files
    # train --data: documents joined by blank lines
    assert read_text_data(path) == "\n\n".join(DOCS)
    # and data prepare end to end
    report = prepare([str(path)], str(tmp_path / "prepared"), dedup_near=False)
    assert report["documents_in"] == len(DOCS)
    assert list(iter_documents(tmp_path / "prepared")) == [d.rstrip() for d in DOCS]


def test_a_folder_of_mixed_formats_is_read_in_path_order_and_a_dataset_inside_it_whole(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("from a text file")
    (root / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(["from gzip"])))
    _write(root, "datasets", docs=["from a dataset"])  # root/datasets/: state.json etc. are not documents
    (root / "e.parquet").write_bytes(b"")  # empty: no document, reported by prepare
    pq.write_table(pa.table({"text": ["from parquet"]}), root / "f.parquet")
    (root / "notes.md").write_text("not a corpus file")
    files = list_input_files([str(root)])
    assert [f.path.name for f in files] == ["a.txt", "b.jsonl.gz", "datasets", "e.parquet", "f.parquet"]
    assert [d.text for d in read_documents(files)] == ["from a text file", "from gzip", "from a dataset",
                                                       "from parquet"]
    report = prepare([str(root)], str(tmp_path / "out"))
    assert report["skipped_files"] == [{"path": str(root / "e.parquet"), "reason": "empty file"}]


def test_sources_say_where_each_document_came_from(tmp_path):
    files = list_input_files([str(_write(tmp_path, "jsonl.zst")), str(_write(tmp_path, "parquet"))])
    sources = [d.source for d in read_documents(files)]
    assert sources[:2] == [f"{tmp_path / 'corpus.jsonl.zst'}:1", f"{tmp_path / 'corpus.jsonl.zst'}:2"]
    assert sources[-1] == f"{tmp_path / 'corpus.parquet'}[{len(DOCS) - 1}]"


# ----------------------------------------------------------------------------- --text-field

@pytest.mark.parametrize("kind", ["jsonl", "jsonl.zst", "parquet", "datasets"])
def test_text_field_picks_the_column_and_a_missing_one_is_a_clear_error(tmp_path, kind):
    path = _write(tmp_path, kind, field="body")
    files = list_input_files([str(path)])
    assert [d.text for d in read_documents(files, text_field="body")] == DOCS
    with pytest.raises(DataError, match=r"no 'text' field.*; --text-field names the field that holds the text$"):
        list(read_documents(files))
    with pytest.raises(DataError, match=r"--data reads the 'text' field; --text-field names another"):
        read_text_data(path)
    assert read_text_data(path, "body") == "\n\n".join(DOCS)  # what `train --data --text-field body` trains on
    with pytest.raises(DataError, match=r"no document is left .*no 'text' field.*; try --text-field"):
        prepare([str(path)], str(tmp_path / "out"))
    assert prepare([str(path)], str(tmp_path / "out"), text_field="body")["documents_out"] == len(DOCS)


def test_a_column_that_is_not_text_and_null_texts_are_reported(tmp_path):
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["one", None, "three"]}), path)
    files = list_input_files([str(path)])
    with pytest.raises(DataError, match=r"mixed.parquet: field 'id' holds int64, not strings"):
        list(read_documents(files, text_field="id"))
    with pytest.raises(DataError, match=r"mixed.parquet\[1\]: field 'text' is null, not a string"):
        list(read_documents(files))
    report = prepare([str(path)], str(tmp_path / "out"))
    assert report["documents_out"] == 2
    assert report["bad_json_lines"]["examples"] == [f"{path}[1]: field 'text' is null, not a string"]


# ----------------------------------------------------------------------------- refused

def test_a_file_is_what_its_name_says_or_is_refused_before_anything_is_read(tmp_path):
    noise = random.Random(0).randbytes(4000)
    cases = {
        "noise.bin": (noise, "binary data ("),
        "noise.parquet": (noise, "named .parquet but not Parquet data (it looks like binary data ("),
        "text.parquet": (b"just some text\n", "named .parquet but not Parquet data (it looks like text)"),
        "plain.jsonl.gz": (_jsonl(DOCS), "named .gz but not gzip data (it looks like text)"),
        "gzip.jsonl": (gzip.compress(_jsonl(DOCS)), "gzip-compressed, not text: decompress it first (gunzip), "
                                                    "or name it gzip.jsonl.gz to read it as it is"),
        "noise.jsonl.zst": (zstandard.ZstdCompressor().compress(noise), "zstd-compressed, holding binary data ("),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as refused:
            list_input_files([str(tmp_path / name)])
        message = str(refused.value)
        assert message.startswith(f"{tmp_path / name}: {expected}"), message
        assert message.endswith(formats.READS)


def test_corrupt_compressed_data_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(DOCS * 50))[:300])  # found reading its head, before any document
    with pytest.raises(DataError, match=rf"^{path}: corrupt or truncated gzip data"):
        list_input_files([str(path)])
    path.write_bytes(gzip.compress(_jsonl(DOCS * 2000))[:-100])  # found reading its end
    files = list_input_files([str(path)])
    with pytest.raises(DataError, match=rf"^{path}: corrupt or truncated gzip data"):
        list(read_documents(files))
    # zstd: two frames (as pzstd writes) read whole; cut inside the second, an error, not a quiet end
    path = tmp_path / "cut.jsonl.zst"
    frames = zstandard.ZstdCompressor().compress(_jsonl(DOCS * 1000)) * 2
    path.write_bytes(frames)
    assert len(list(read_documents(list_input_files([str(path)])))) == len(DOCS) * 2000
    path.write_bytes(frames[:-100])
    with pytest.raises(DataError, match=rf"^{path}: corrupt or truncated zstd data \(the file ends inside a frame\)"):
        list(read_documents(list_input_files([str(path)])))


def test_a_datasetdict_without_a_train_split_names_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    path = tmp_path / "dd"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"a DatasetDict without a 'train' split \(its splits: validation\); give one "
                                        r"split's folder instead, e.g. .*dd/validation"):
        read_text_data(path)
    assert read_text_data(path / "validation") == "x"  # as the message says


def test_without_the_datasets_package_a_datasets_directory_is_one_line(tmp_path, monkeypatch):
    path = _write(tmp_path, "datasets")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(DataError, match=r"datasets: a Hugging Face datasets directory; reading it needs the datasets "
                                        r"package, which is not installed: pip install datasets$"):
        read_text_data(path)


@pytest.mark.parametrize("name", ["noise.bin", "noise.parquet"])
@pytest.mark.parametrize("verb", ["data prepare", "data tokenize"])
def test_the_cli_refuses_a_binary_file_in_one_line_and_writes_nothing(tmp_path, name, verb):
    (tmp_path / name).write_bytes(random.Random(1).randbytes(4000))
    extra = ["--tokenizer", GPT2] if verb == "data tokenize" else []
    done = lmspec_main(*verb.split(), tmp_path / name, *extra, "--out", tmp_path / "out", "--no-progress")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"lmspec {verb}: error: {tmp_path / name}: ")
    assert "binary data (" in lines[0] and lines[0].endswith(formats.READS)
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_binary_parquet_in_one_line(tmp_path):
    (tmp_path / "noise.parquet").write_bytes(random.Random(2).randbytes(4000))
    done = lmspec_main("train", "specs/tiny.arch", "--data", tmp_path / "noise.parquet", "--steps", "1",
                      "--out", tmp_path / "run", "--no-progress")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{tmp_path / 'noise.parquet'}: named .parquet but not Parquet data" in done.stderr


# ----------------------------------------------------------------------------- tokenizing

def test_data_tokenize_of_a_parquet_file_writes_the_tokens_of_its_texts(tmp_path, gpt2):
    path = _write(tmp_path, "parquet", field="body")
    done = lmspec_main("data", "tokenize", path, "--text-field", "body", "--tokenizer", GPT2, "--out",
                      tmp_path / "shards", "--val-fraction", "0", "--no-progress")
    assert done.returncode == 0, done.stderr
    data = ShardData(tmp_path / "shards")
    written = np.concatenate([np.asarray(s) for s in data.train.shards]).tolist()
    assert written == [i for doc in DOCS for i in _plain_ids(gpt2, doc) + [gpt2.eot_id]]
    assert data.meta["documents"] == len(DOCS)


def _plain_ids(tok, text: str) -> list[int]:
    """The ids of `text` straight from the tokenizer, special-token text encoded as plain text (as
    write_shards does by default: "<|endoftext|>" inside DOCS[3] is not a separator)."""
    import tokenizers

    hf = tokenizers.Tokenizer.from_str(tok.tokenizer.to_str())
    hf.encode_special_tokens = True
    return hf.encode(text, add_special_tokens=False).ids


def test_a_long_text_file_streams_in_pieces_that_tokenize_as_the_whole(tmp_path, gpt2, monkeypatch, capsys):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared data not found at {SHAKESPEARE}")
    monkeypatch.setattr(formats, "PIECE_BYTES", 16_384)  # 68 pieces of the 1.1 MB
    files = list_input_files([str(SHAKESPEARE)])
    pieces = list(read_documents(files))
    assert len(pieces) > 50 and [p.ends for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.text for p in pieces) == SHAKESPEARE.read_text(encoding="utf-8")
    assert sum(p.size for p in pieces) == SHAKESPEARE.stat().st_size
    meta = write_shards(read_documents(files), gpt2, tmp_path / "shards", val_fraction=0, progress=True,
                        total_bytes=files[0].size)
    assert meta["documents"] == 1
    written = np.asarray(ShardData(tmp_path / "shards").train.shards[0]).tolist()
    assert written == _plain_ids(gpt2, SHAKESPEARE.read_text(encoding="utf-8")) + [gpt2.eot_id]
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in bar and "1.06M/1.06M" in bar and "tokens/s" in bar, bar


@pytest.mark.slow
def test_tokenizing_streams_the_peak_does_not_grow_with_the_corpus(tmp_path):
    """`lmspec data tokenize` of 25 MB and of 100 MB of text: the same peak memory, give or take."""
    if not (SHAKESPEARE.is_file() and (GPT2 / "encoder.json").is_file()):
        pytest.skip("shared data not found")
    script = ("import resource, sys; from lmspec.runtime.cli.main import main; rc = main(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    peaks = []
    for copies in (23, 90):
        text = tmp_path / f"{copies}.txt"
        text.write_bytes(SHAKESPEARE.read_bytes() * copies)
        done = subprocess.run([sys.executable, "-c", script, "data", "tokenize", str(text), "--tokenizer", str(GPT2),
                               "--out", str(tmp_path / f"s{copies}"), "--val-fraction", "0", "--no-progress"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        peaks.append(int(done.stdout.strip().splitlines()[-1]) / 1024)
    assert peaks[1] < 1024 and peaks[1] - peaks[0] < 64, peaks
