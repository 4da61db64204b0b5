"""Token shards: what write_shards writes, and ShardData reading it back through memmap."""
import hashlib
import json

import numpy as np
import pytest
import torch

from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.data.shards import SPLITS, ShardData, document_batches, read_meta, write_shards
from lmspec.runtime.data.tokenizer import CharTokenizer, FileTokenizer, TokenizerError
from lmspec.runtime.data.tokenizer_training import train_bpe
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.loop import train


@pytest.fixture(scope="module")
def gpt2(shared_data):
    directory = shared_data / "gpt2-tokenizer"
    if not (directory / "encoder.json").is_file():
        pytest.skip(f"GPT-2 vocabulary not found at {directory}")
    return FileTokenizer.from_path(directory)


@pytest.fixture(scope="module")
def docs(shared_data):
    """Tiny Shakespeare's speeches (paragraphs), one document each: 7,222 of them."""
    path = shared_data / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p]


@pytest.fixture(scope="module")
def written(tmp_path_factory, gpt2, docs):
    """The first 2,000 speeches in shards of 10,000 tokens: several train shards, a few val ones."""
    out = tmp_path_factory.mktemp("shards")
    return out, write_shards(docs[:2000], gpt2, out, shard_tokens=10_000, batch_docs=64)


def split_docs(docs, val_every=10):
    return {"train": [d for i, d in enumerate(docs) if i % val_every != val_every - 1],
            "val": [d for i, d in enumerate(docs) if i % val_every == val_every - 1]}


def all_tokens(directory, split) -> np.ndarray:
    data = ShardData(directory)
    shards = (data.train if split == "train" else data.val).shards
    return np.concatenate([np.asarray(s) for s in shards])


# ----------------------------------------------------------------------------------- writing

def test_memmap_reads_back_exactly_the_encoded_documents_each_ended_by_eot(written, gpt2, docs):
    out, meta = written
    expected = split_docs(docs[:2000])
    for split in SPLITS:
        ids = all_tokens(out, split)
        want = [tid for d in expected[split] for tid in gpt2.encode(d) + [50256]]
        assert ids.tolist() == want
        assert ids[-1] == 50256 and np.count_nonzero(ids == 50256) == len(expected[split])


def test_meta_counts_tokens_and_documents_per_split_and_shard(written, docs):
    out, meta = written
    assert meta == read_meta(out)
    assert meta["format"] == "lmspec-shards" and meta["version"] == 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257 and meta["eot_id"] == 50256
    assert meta["documents"] == 2000
    assert meta["splits"]["train"]["documents"] == 1800 and meta["splits"]["val"]["documents"] == 200
    assert meta["tokens"] == sum(meta["splits"][s]["tokens"] for s in SPLITS)
    train = meta["splits"]["train"]
    assert [s["file"] for s in train["shards"]] == [f"train_{i:03d}.bin" for i in range(len(train["shards"]))]
    assert len(train["shards"]) >= 5 and all(s["tokens"] == 10_000 for s in train["shards"][:-1])
    assert 0 < train["shards"][-1]["tokens"] <= 10_000
    for split in SPLITS:
        info = meta["splits"][split]
        assert sum(s["documents"] for s in info["shards"]) == info["documents"]
        assert info["text_bytes"] == sum(len(d.encode()) for d in split_docs(docs[:2000])[split])
        for shard in info["shards"]:  # a document is counted where its end-of-text token is
            ids = np.fromfile(out / shard["file"], dtype=np.uint16)
            assert len(ids) == shard["tokens"] and np.count_nonzero(ids == 50256) == shard["documents"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["meta.json", "tokenizer.json"] + [s["file"] for sp in SPLITS
                                                             for s in meta["splits"][sp]["shards"]])


def test_the_tokenizer_is_stored_beside_the_shards_and_checked(written, gpt2):
    out, meta = written
    tok = ShardData(out).tokenizer()
    assert tok.to_json() == gpt2.to_json()  # exactly the tokenizer a checkpoint would record
    assert tok.eot_id == 50256 and FileTokenizer.from_path(out / "tokenizer.json").vocab_size == 50257
    assert meta["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()


def test_validation_documents_are_spread_evenly_for_any_fraction(tmp_path, gpt2):
    texts = [f"document {i}" for i in range(100)]
    meta = write_shards(texts, gpt2, tmp_path / "a", val_fraction=0.25)
    assert meta["splits"]["val"]["documents"] == 25
    val = ShardData(tmp_path / "a").tokenizer().decode(all_tokens(tmp_path / "a", "val").tolist())
    assert val.split("<|endoftext|>")[:3] == ["document 3", "document 7", "document 11"]
    assert write_shards(texts, gpt2, tmp_path / "b", val_fraction=0.57)["splits"]["val"]["documents"] == 57
    assert write_shards(texts, gpt2, tmp_path / "c", val_fraction=0)["splits"]["val"] == {
        "tokens": 0, "documents": 0, "text_bytes": 0, "shards": []}


def test_special_token_text_inside_a_document_is_plain_text_unless_allowed(tmp_path, gpt2):
    texts = ["a<|endoftext|>b", "c"] * 5
    write_shards(texts, gpt2, tmp_path / "plain")
    ids = all_tokens(tmp_path / "plain", "train").tolist()
    assert ids[:10] == [64, 27, 91, 437, 1659, 5239, 91, 29, 65, 50256]  # a < | end of text | > b, then EOT
    assert ids.count(50256) == 9  # only the separators
    assert gpt2.encode("<|endoftext|>") == [50256]  # the caller's tokenizer is left as it was
    write_shards(texts, gpt2, tmp_path / "special", allow_special=True)
    assert all_tokens(tmp_path / "special", "train").tolist()[:4] == [64, 50256, 65, 50256]


def test_uint32_for_vocabularies_over_65536_ids(tmp_path, gpt2):
    big = FileTokenizer.from_str(gpt2.tokenizer.to_str())
    big.tokenizer.add_tokens([f"zq{i}zq" for i in range(16_000)])
    assert big.vocab_size == 66_257
    texts = ["hello zq15999zq world", "zq0zq"] * 3
    meta = write_shards(texts, big, tmp_path / "big", val_fraction=0)
    assert meta["dtype"] == "uint32"
    ids = all_tokens(tmp_path / "big", "train")
    assert ids.dtype == np.uint32 and 66_256 in ids.tolist()  # an id past 65,535 survives
    assert ids.tolist() == [t for d in texts for t in big.encode(d) + [50256]]
    assert (tmp_path / "big" / "train_000.bin").stat().st_size == 4 * len(ids)
    forced = write_shards(texts[:2], gpt2, tmp_path / "forced", val_fraction=0, dtype="uint32")
    assert forced["dtype"] == "uint32" and all_tokens(tmp_path / "forced", "train").dtype == np.uint32
    with pytest.raises(DataError, match="uint16 cannot hold the ids of a vocabulary of 66,257"):
        write_shards(texts, big, tmp_path / "nope", dtype="uint16")


def test_a_trained_tokenizer_round_trips_through_shards(tmp_path, verdict_text):
    tok = train_bpe(iter([verdict_text]), 400, tmp_path / "tok.json")
    paragraphs = verdict_text.split("\n\n")
    write_shards(paragraphs + ["émoji 👩‍👩‍👧 ✓"], tok, tmp_path / "s", val_fraction=0)
    data = ShardData(tmp_path / "s")
    assert data.eot_id == 0 and data.meta["dtype"] == "uint16"
    text = data.tokenizer().decode(all_tokens(tmp_path / "s", "train").tolist())
    assert text.split("<|endoftext|>")[:-1] == [p for p in paragraphs if p] + ["émoji 👩‍👩‍👧 ✓"]


def test_batches_stream_and_skip_empty_documents():
    batches = list(document_batches(iter(["ab", "", "cde", "f", "ghij"]), max_docs=2, max_chars=4))
    assert batches == [["ab"], ["cde", "f"], ["ghij"]]
    with pytest.raises(DataError, match="document 1 is a bytes, not a str"):
        list(document_batches(["fine", b"bytes"], 10, 10))


def test_writing_refuses_what_it_cannot_do(tmp_path, gpt2, written):
    with pytest.raises(TokenizerError, match=r"the 'char' tokenizer has no end-of-text token \(<\|endoftext\|>, "):
        write_shards(["abc"], CharTokenizer.from_text("abc"), tmp_path / "char")
    with pytest.raises(DataError, match="val_fraction must be in"):
        write_shards(["abc"], gpt2, tmp_path / "x", val_fraction=1.0)
    with pytest.raises(DataError, match="shard_tokens must be an integer >= 1"):
        write_shards(["abc"], gpt2, tmp_path / "x", shard_tokens=0)
    out, meta = written
    with pytest.raises(DataError, match="already holds token shards"):
        write_shards(["abc"], gpt2, out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text('{"kind": "a checkpoint"}')
    (tmp_path / "other" / "train_000.bin").write_bytes(b"")
    with pytest.raises(DataError, match="is not a token shards index; not overwriting"):
        write_shards(["abc"], gpt2, tmp_path / "other", overwrite=True)


def test_overwrite_replaces_every_old_shard(tmp_path, gpt2, docs):
    write_shards(docs[:300], gpt2, tmp_path, shard_tokens=2_000)
    (tmp_path / ".tmp-train_007.bin-4242").write_bytes(b"left by a writer that was killed")
    meta = write_shards(docs[:20], gpt2, tmp_path, shard_tokens=2_000, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "tokenizer.json", "train_000.bin", "val_000.bin"]
    assert ShardData(tmp_path).meta == meta


def test_a_failure_while_writing_leaves_no_shards(tmp_path, gpt2, docs):
    def texts():
        yield from docs[:500]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(texts(), gpt2, tmp_path, shard_tokens=2_000, batch_docs=16)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- reading

def test_training_windows_are_valid_and_never_cross_a_shard(tmp_path, gpt2, docs):
    write_shards(docs[:400], gpt2, tmp_path, shard_tokens=300)
    data = ShardData(tmp_path)
    shards = [np.asarray(s) for s in data.train.shards]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = data.train_batch(8, 64, gen)
        assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            window = np.append(row_x, row_y[-1])
            assert any(_contains(s, window) for s in shards)


def _contains(shard: np.ndarray, window: np.ndarray) -> bool:
    starts = np.flatnonzero(shard[: len(shard) - len(window) + 1] == window[0])
    return any(np.array_equal(shard[i:i + len(window)], window) for i in starts)


def test_ranks_draw_different_slices_of_one_global_batch(written):
    out, _ = written
    ranks = [ShardData(out, rank=r, world_size=2) for r in (0, 1)]
    single = ShardData(out)
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]  # train.py seeds every rank alike
    for _ in range(3):
        (x0, y0), (x1, y1) = (d.train_batch(4, 32, g) for d, g in zip(ranks, gens))
        xg, yg = single.train_batch(8, 32, gens[2])
        assert not torch.equal(x0, x1)
        assert torch.equal(torch.cat([x0, x1]), xg) and torch.equal(torch.cat([y0, y1]), yg)
    assert torch.equal(gens[0].get_state(), gens[1].get_state())  # generators stay in step


def test_validation_set_is_fixed_and_the_same_on_every_rank(written):
    out, _ = written
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state()
    sets = [ShardData(out, rank=r, world_size=3).val_batches(4, 32, 5) for r in range(3)]
    sets.append(ShardData(out).val_batches(4, 32, 5))
    assert torch.equal(gen.get_state(), before)
    for other in sets[1:]:
        for (x, y), (x2, y2) in zip(sets[0], other):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    starts = torch.cat([x[:, 0] for x, _ in sets[0]])
    assert len(set(starts.tolist())) > 10  # spread over the split, not one window repeated
    val = all_tokens(out, "val")
    assert torch.equal(sets[0][0][0][0], torch.from_numpy(val[:32].astype(np.int64)))  # the first window


def test_validation_batches_stop_once_every_window_is_seen(written):
    # before: --eval-batches 1e12 listed 1e12 x batch window starts and ran out of memory, blamed on training
    from lmspec.runtime.data.token_data import TokenData

    out, _ = written
    shards = ShardData(out)
    windows = shards.val.check_fits(32)
    text = TokenData(torch.randperm(1000), val_fraction=0.1)  # 100 validation tokens: 68 windows of 32
    for data, distinct in ((shards, windows), (text, 68)):
        few = data.val_batches(4, 32, 2)
        assert len(few) == 2  # under the cap: as asked
        every = data.val_batches(4, 32, 10**12)
        assert len(every) == -(-distinct // 4) and sum(len(x) for x, _ in every) >= distinct
        assert len({tuple(w.tolist()) for x, _ in every for w in x}) >= distinct * 0.99


def test_train_py_trains_on_shards_unchanged(tmp_path, verdict_text, tiny_gpt):
    tok = train_bpe(iter([verdict_text]), 300, tmp_path / "tok.json")
    write_shards(verdict_text.split("\n\n"), tok, tmp_path / "shards", val_fraction=0.2)
    data = ShardData(tmp_path / "shards")
    model = tiny_gpt(data.vocab_size, context=16)
    cfg = TrainConfig(steps=4, batch=2, seq=16, warmup=1, eval_every=2, eval_batches=2, ckpt_every=0, log_every=1)
    summary = train(model, data.tokenizer(), data, cfg, tmp_path / "run", spec={"file": "x"}, progress=False)
    assert summary["steps"] == 4 and summary["val_loss"] is not None


def test_too_short_splits_and_bad_ranks_are_clear_errors(tmp_path, gpt2):
    write_shards(["a b c d e f g h"] * 3, gpt2, tmp_path, val_fraction=0.34, shard_tokens=10)
    data = ShardData(tmp_path)  # train: 2 documents of 9 tokens, in shards of 10 and 8; val: 1 document
    data.check_seq(8)
    with pytest.raises(DataError, match=r"training split has 18 tokens \(its longest shard has 10\), fewer than "
                                        r"sequence length \+ 1 = 65"):
        data.train_batch(1, 64, torch.Generator())
    with pytest.raises(DataError, match=r"validation split has 9 tokens, fewer than sequence length \+ 1 = 10"):
        data.check_seq(9)
    data.check_seq(9, validation=False)
    with pytest.raises(DataError, match="rank must be in"):
        ShardData(tmp_path, rank=2, world_size=2)


# ------------------------------------------------------------------------------------ damage

@pytest.fixture
def small(tmp_path, gpt2, docs):
    write_shards(docs[:100], gpt2, tmp_path, shard_tokens=1_000)
    return tmp_path


def test_missing_or_corrupt_meta_is_a_data_error(small, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match="meta.json: missing"):
        ShardData(empty)
    with pytest.raises(DataError, match="no such shards directory"):
        ShardData(empty / "nope")
    meta_path = small / "meta.json"
    good = json.loads(meta_path.read_text())
    meta_path.write_text('{"format": "lmspec-shards", "vers')
    with pytest.raises(DataError, match="meta.json: unreadable or not JSON"):
        ShardData(small)
    for damage, message in [
        (lambda m: m.update(version=99), "version 99 is not 1"),
        (lambda m: m.update(dtype="float32"), "dtype 'float32'"),
        (lambda m: m["splits"].pop("val"), "no train and val splits"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="../escape.bin"), "bad shard entry"),
        (lambda m: m["splits"]["train"].update(tokens=1), "is not the sum of its shards"),
    ]:
        meta = json.loads(json.dumps(good))
        damage(meta)
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(DataError, match=message):
            ShardData(small)


def test_a_shard_of_the_wrong_size_or_missing_is_a_data_error(small):
    shard = small / "train_001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])
    with pytest.raises(DataError, match="train_001.bin: 1,998 bytes, but meta.json says 1,000 uint16 tokens"):
        ShardData(small)
    shard.unlink()
    with pytest.raises(DataError, match="train_001.bin: missing"):
        ShardData(small)


def test_a_replaced_tokenizer_is_a_data_error(small, verdict_text):
    data = ShardData(small)
    (small / "tokenizer.json").write_text((small / "tokenizer.json").read_text().replace('"Ġt"', '"Ġq"'))
    with pytest.raises(DataError, match="does not match the sha256 in meta.json"):
        data.tokenizer()
