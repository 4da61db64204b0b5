"""Token shards' checksums: taken as each shard is written, verified the first time a window is read
from it, and all of them by `lmspec data verify`; a flipped byte a DataError naming the shard."""
import json

import pytest
import torch

from lmspec.runtime.checksum import file_checksum
from lmspec.runtime.cli.main import main
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.data.shards import SPLITS, ShardData, verify_shards, write_shards
from lmspec.runtime.data.tokenizer import FileTokenizer
from runtime_helpers import ROOT, SHARED_DATA, SMALL, lmspec_cli


def flip(path, offset=10):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def gpt2():
    directory = SHARED_DATA / "gpt2-tokenizer"
    if not (directory / "encoder.json").is_file():
        pytest.skip(f"GPT-2 vocabulary not found at {directory}")
    return FileTokenizer.from_path(directory)


@pytest.fixture
def shards(tmp_path, gpt2):
    """200 speeches of Tiny Shakespeare in shards of 2,000 tokens: several train shards, a few val ones."""
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs = [p for p in text.split("\n\n") if p][:200]
    write_shards(docs, gpt2, tmp_path / "shards", shard_tokens=2_000)
    return tmp_path / "shards"


def entries(directory):
    meta = json.loads((directory / "meta.json").read_text())
    return [shard for split in SPLITS for shard in meta["splits"][split]["shards"]]


def test_each_shard_records_the_checksum_of_its_bytes(shards):
    found = entries(shards)
    assert len(found) >= 4
    for shard in found:
        assert shard["checksum"].startswith("xxh3_128:") and shard["checksum"] == file_checksum(shards / shard["file"])
    report = verify_shards(shards)
    assert (report.checked, report.problems, report.unrecorded) == (len(found) + 1, [], 0)  # and tokenizer.json


def test_a_flipped_byte_fails_the_first_window_read_from_that_shard_only(shards):
    data = ShardData(shards)  # opening reads no shard whole
    seq = 16
    counts = data.train.window_counts(seq)
    in_shard = [torch.tensor([int(counts[:i].sum())]) for i in range(len(counts))]  # a window of each shard
    flip(shards / "train_001.bin")
    data.train.windows(in_shard[0], seq)  # shard 0 is intact: read, and verified once
    message = (f"{shards / 'train_001.bin'}: checksum mismatch (the shard is corrupt); tokenize the corpus again "
               f"(`lmspec data tokenize … --overwrite`) or restore the file from a copy")
    for _ in range(2):  # and again: a shard that failed is never taken as verified
        with pytest.raises(DataError) as caught:
            data.train.windows(in_shard[1], seq)
        assert str(caught.value) == message
    x, y = data.train.windows(in_shard[2], seq)
    assert torch.equal(x[0, 1:], y[0, :-1])


def test_shards_from_before_checksums_still_read(shards):
    meta = json.loads((shards / "meta.json").read_text())
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            del shard["checksum"]
    (shards / "meta.json").write_text(json.dumps(meta))
    flip(shards / "train_000.bin")  # goes unnoticed: there is nothing to compare it with
    data = ShardData(shards)
    data.train.windows(torch.tensor([0]), 16)
    report = verify_shards(shards)
    assert report.problems == [] and report.unrecorded == len(entries(shards))


def test_data_verify_names_each_damaged_shard_and_train_refuses_them(shards, gpt2, tmp_path, capsys):
    ok = lmspec_cli("data", "verify", shards)  # a process of its own: the real exit status
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"ok        {shards} ({len(entries(shards)) + 1} files verified)\n"

    flip(shards / "train_002.bin")
    flip(shards / "val_000.bin")
    (shards / "train_000.bin").write_bytes((shards / "train_000.bin").read_bytes()[:-2])
    bad = lmspec_cli("data", "verify", shards)
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        f"damaged   {shards / 'train_000.bin'}: 3,998 bytes, but meta.json says 4,000",
        f"damaged   {shards / 'train_002.bin'}: checksum mismatch (the shard is corrupt)",
        f"damaged   {shards / 'val_000.bin'}: checksum mismatch (the shard is corrupt)"]
    assert bad.stderr == (f"lmspec data verify: error: 3 damaged files: {shards / 'train_000.bin'}, "
                          f"{shards / 'train_002.bin'}, {shards / 'val_000.bin'}\n")

    (shards / "train_000.bin").unlink()
    capsys.readouterr()
    args = ["train", str(ROOT / "specs" / "tiny.arch"), *SMALL, "--data", str(shards), "--steps", "2", "--no-progress",
            "--sample-tokens", "0", "--out", str(tmp_path / "run")]
    assert main(args) == 1
    assert capsys.readouterr().err == (f"lmspec train: error: {shards / 'train_000.bin'}: missing; meta.json lists "
                                       f"it with 2,000 tokens\n")
    write_shards([(SHARED_DATA / "the-verdict.txt").read_text()] * 3, gpt2, shards, shard_tokens=2_000,
                 overwrite=True, val_fraction=0.34)  # one document in three validates
    flip(shards / "val_000.bin")  # the validation windows are read before the first step
    assert main(args) == 1
    assert capsys.readouterr().err.startswith(
        f"lmspec train: error: {shards / 'val_000.bin'}: checksum mismatch (the shard is corrupt); ")
    assert not (tmp_path / "run" / "checkpoints").exists()
