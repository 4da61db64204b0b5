import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmspec.runtime.data.tokenizer import CharTokenizer, FileTokenizer, TokenizerError, load_tokenizer


# ----------------------------------------------------------------------------------- characters

def test_char_vocab_is_the_sorted_characters_of_the_text(verdict_text):
    tok = CharTokenizer.from_text(verdict_text)
    assert tok.chars == "".join(sorted(set(verdict_text)))
    assert tok.vocab_size == len(set(verdict_text))
    assert tok.eot_id is None
    assert tok.encode(" ") == [tok.chars.index(" ")]


def test_char_round_trip(verdict_text):
    tok = CharTokenizer.from_text(verdict_text)
    ids = tok.encode(verdict_text)
    assert len(ids) == len(verdict_text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == verdict_text


def test_char_unknown_character_is_a_clear_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"'z' \(U\+007A\) at line 1, column 3 is not in the tokenizer's "
                                             r"vocabulary of 3"):
        tok.encode("abz")
    with pytest.raises(TokenizerError, match=r"'z' \(U\+007A\) at line 3, column 2 is"):
        CharTokenizer.from_text("abc\n").encode("ab\nc\naz")
    with pytest.raises(TokenizerError, match="token id 7 is outside the vocabulary of 3"):
        tok.decode([0, 7])


def test_char_serialises_and_reloads(verdict_text):
    tok = CharTokenizer.from_text(verdict_text)
    data = json.loads(tok.to_json())
    assert data["kind"] == "char"
    again = load_tokenizer(tok.to_json())
    assert isinstance(again, CharTokenizer)
    assert again.encode(verdict_text[:500]) == tok.encode(verdict_text[:500])


# ------------------------------------------------------------------------ Hugging Face tokenizers

@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory, verdict_text):
    """A small byte-level BPE trained on the spot, saved as tokenizers JSON."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([verdict_text], trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_file_tokenizer_round_trip(bpe_file, verdict_text):
    tok = FileTokenizer.from_file(bpe_file)
    assert tok.vocab_size == 1000
    assert tok.eot_id == 0  # the special token is added first
    ids = tok.encode(verdict_text)
    assert len(ids) < len(verdict_text) / 2  # merges really compress
    assert tok.decode(ids) == verdict_text
    assert tok.decode(tok.encode("naïve café ✓")) == "naïve café ✓"  # bytes outside the training text


def test_file_tokenizer_serialises_and_reloads(bpe_file, verdict_text):
    tok = FileTokenizer.from_file(bpe_file)
    again = load_tokenizer(tok.to_json())
    assert isinstance(again, FileTokenizer)
    assert again.vocab_size == tok.vocab_size and again.eot_id == tok.eot_id
    assert again.encode(verdict_text) == tok.encode(verdict_text)


def test_gpt2_vocabulary_gives_gpt2_ids(shared_data):
    directory = shared_data / "gpt2-tokenizer"
    if not (directory / "encoder.json").is_file():
        pytest.skip("GPT-2 vocabulary not in shared data")
    tok = FileTokenizer.from_path(directory)
    assert tok.vocab_size == 50257
    assert tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 11, 995, 0]) == "Hello, world!"


def test_file_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="nope.json: no such tokenizer file"):
        FileTokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json: not a Hugging Face tokenizers JSON file"):
        FileTokenizer.from_file(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerError, match="binary.json: cannot read tokenizer file"):
        FileTokenizer.from_file(binary)


@pytest.mark.parametrize("text, message", [
    ("not json", "not valid JSON"),
    ('{"kind": "sentencepiece"}', "unknown kind 'sentencepiece'"),
    ('[1, 2]', "unknown kind None"),
    ('{"kind": "char"}', "no 'chars' string"),
    ('{"kind": "hf", "tokenizer": "{}"}', "not a Hugging Face tokenizers JSON"),
])
def test_load_tokenizer_rejects_bad_input(text, message):
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(text)
