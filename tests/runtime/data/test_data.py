import pytest
import torch

from lmspec.runtime.data.corpus import DataError, default_corpus_text, read_text_data
from lmspec.runtime.data.token_data import TokenData


# --------------------------------------------------------------------------------------- corpus

def test_default_corpus_is_cpythons_documentation():
    from pydoc_data.topics import topics

    text = default_corpus_text()
    assert 300_000 < len(text) < 2_000_000
    first = sorted(topics)[0]
    assert text.startswith(topics[first])
    assert text == "\n\n".join(topics[k] for k in sorted(topics))


def test_read_text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo\n", encoding="utf-8")
    assert read_text_data(path) == "héllo\n"


def test_read_text_directory_recursively_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "ignored.md").write_text("not text data")
    assert read_text_data(tmp_path) == "first\n\nsecond\n\nthird"


def test_bad_data_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing.txt: no such file or directory"):
        read_text_data(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        read_text_data(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not UTF-8 text"):
        read_text_data(tmp_path / "latin1.txt")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="none: directory holds no .txt files"):
        read_text_data(tmp_path / "none")


# ---------------------------------------------------------------------------------- token data

def test_split_is_first_ninety_percent_then_last_ten():
    data = TokenData(torch.arange(1000))
    assert torch.equal(data.train, torch.arange(900))
    assert torch.equal(data.val, torch.arange(900, 1000))
    assert len(data) == 1000


def test_train_batch_windows_are_shifted_by_one_and_in_the_train_split():
    data = TokenData(torch.arange(1000))
    x, y = data.train_batch(16, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 8) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # arange data: the target is the next token
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
    assert int(y.max()) < 900


def test_train_batches_follow_the_generator():
    data = TokenData(torch.arange(1000))
    a = data.train_batch(4, 8, torch.Generator().manual_seed(5))
    b = data.train_batch(4, 8, torch.Generator().manual_seed(5))
    c = data.train_batch(4, 8, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    gen = torch.Generator().manual_seed(5)
    first, second = data.train_batch(4, 8, gen), data.train_batch(4, 8, gen)
    assert not torch.equal(first[0], second[0])  # the generator advances


def test_every_train_position_is_reachable():
    data = TokenData(torch.arange(20), val_fraction=0.5)  # train = 0..9
    gen = torch.Generator().manual_seed(0)
    starts = {int(data.train_batch(1, 4, gen)[0][0, 0]) for _ in range(300)}
    assert starts == set(range(10 - 4))  # the last window ends exactly at the split's end


def test_val_batches_are_fixed_and_leave_the_generator_alone():
    data = TokenData(torch.arange(1000))
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state()
    first = data.val_batches(4, 8, 3)
    assert torch.equal(gen.get_state(), before)
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, data.val_batches(4, 8, 3)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.shape == (4, 8) and torch.equal(y, x + 1)
        assert int(x.min()) >= 900 and int(y.max()) <= 999
    starts = torch.cat([x[:, 0] for x, _ in first])
    assert int(starts[0]) == 900 and int(starts[-1]) == 1000 - 8 - 1  # spread over the whole split


def test_too_short_data_is_a_clear_error():
    data = TokenData(torch.arange(50))  # train 45, val 5
    with pytest.raises(DataError, match="training split has 45 tokens, fewer than sequence length \\+ 1 = 65"):
        data.train_batch(2, 64, torch.Generator())
    with pytest.raises(DataError, match="validation split has 5 tokens"):
        data.val_batches(2, 8, 1)
    with pytest.raises(DataError, match="validation split"):
        data.check_seq(8)
    data.check_seq(8, validation=False)


def test_bad_arguments():
    with pytest.raises(DataError, match="one-dimensional"):
        TokenData(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(DataError, match="val_fraction"):
        TokenData(torch.arange(10), val_fraction=1.0)
