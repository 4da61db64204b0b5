"""Byte-level BPE: GPT-2's own tokenizer from its released files, and tokenizers trained by train_bpe."""
import json
import shutil
from functools import lru_cache

import pytest

from lmspec.runtime.data.tokenizer import FileTokenizer, TokenizerError, load_tokenizer
from lmspec.runtime.data.tokenizer_training import DEFAULT_SPECIAL_TOKENS, train_bpe

HELLO = "Hello, world. Is this-- a test?"
HELLO_IDS = [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]
# Characters a byte-level tokenizer must carry through untouched: emoji with joiners and skin tones,
# flags, CJK, combining accents, no-break and zero-width spaces, CRLF, tabs, a NUL, an unpaired-looking
# but valid astral character, and text that looks like a special token.
TRICKY = ("naïve café ✓ 👩‍👩‍👧‍👦 👍🏽 🇫🇷 日本語のテキスト e\u0301 \u00a0x\u200by\r\n\tz\x00 𝔘𝔫𝔦 "
          "<|endoftext|> <|im_start|> \ufeff end")


def gpt2_dir(shared_data):
    directory = shared_data / "gpt2-tokenizer"
    if not (directory / "encoder.json").is_file():
        pytest.skip(f"GPT-2 vocabulary not found at {directory}")
    return directory


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return FileTokenizer.from_path(gpt2_dir(shared_data))


@pytest.fixture(scope="module")
def shared_texts(shared_data):
    """Every shared text file whole, and each text field of the instruction data on its own."""
    texts = {}
    for name in ("tinyshakespeare.txt", "the-verdict.txt", "SMSSpamCollection.tsv",
                 "instruction-data.json", "instruction-data-with-preference.json"):
        path = shared_data / name
        if not path.is_file():
            pytest.skip(f"shared data not found at {path}")
        texts[name] = path.read_text(encoding="utf-8")
    for name in ("instruction-data.json", "instruction-data-with-preference.json"):
        for i, entry in enumerate(json.loads(texts[name])):
            for field, value in entry.items():
                if isinstance(value, str) and value:
                    texts[f"{name}[{i}].{field}"] = value
    texts["tricky"] = TRICKY
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return train_bpe(shared_data / "tinyshakespeare.txt", 1000, path), path


# ------------------------------------------------------------------------------------- GPT-2

def test_gpt2_from_its_released_files_gives_gpt2_ids(gpt2, verdict_text):
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.encode(HELLO) == HELLO_IDS
    assert gpt2.decode(HELLO_IDS) == HELLO
    ids = gpt2.encode(verdict_text)
    assert len(ids) == 5145  # the figure "Build a Large Language Model (From Scratch)" gives
    assert gpt2.decode(ids) == verdict_text
    assert gpt2.encode("<|endoftext|>") == [50256]  # one special token, not its pieces


def test_gpt2_matches_openais_reference_encoder(gpt2, shared_texts, shared_data):
    """The ids equal those of OpenAI's own algorithm (gpt-2/src/encoder.py), on prose, code-like
    text, SMS slang and non-ASCII text."""
    reference = _openai_encoder(gpt2_dir(shared_data))
    for name in ("the-verdict.txt", "SMSSpamCollection.tsv", "instruction-data.json", "tricky"):
        text = shared_texts[name].replace("<|endoftext|>", "")  # OpenAI's encoder knows no specials
        assert gpt2.encode(text) == reference(text), name


def test_from_path_takes_a_json_file_a_directory_or_hugging_face_file_names(gpt2, tmp_path, shared_data):
    (tmp_path / "json").mkdir()
    gpt2.tokenizer.save(str(tmp_path / "json" / "tokenizer.json"))
    from_file = FileTokenizer.from_path(tmp_path / "json" / "tokenizer.json")
    from_dir = FileTokenizer.from_path(tmp_path / "json")
    assert FileTokenizer.from_file(tmp_path / "json" / "tokenizer.json").encode(HELLO) == HELLO_IDS
    (tmp_path / "hf").mkdir()  # Hugging Face's gpt2 repository names the same files vocab.json, merges.txt
    shutil.copy(gpt2_dir(shared_data) / "encoder.json", tmp_path / "hf" / "vocab.json")
    shutil.copy(gpt2_dir(shared_data) / "vocab.bpe", tmp_path / "hf" / "merges.txt")
    hf_names = FileTokenizer.from_path(tmp_path / "hf")
    for tok in (from_file, from_dir, hf_names):
        assert tok.encode(HELLO) == HELLO_IDS and tok.eot_id == 50256 and tok.vocab_size == 50257
    again = load_tokenizer(gpt2.to_json())  # what a checkpoint keeps
    assert again.encode(TRICKY) == gpt2.encode(TRICKY) and again.eot_id == 50256


def test_from_path_errors_say_what_is_missing(tmp_path, shared_data):
    with pytest.raises(TokenizerError, match="nowhere: no such tokenizer file or directory"):
        FileTokenizer.from_path(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match=r"directory holds no tokenizer \(expected tokenizer.json, "
                                             r"encoder.json \+ vocab.bpe"):
        FileTokenizer.from_path(tmp_path)
    (tmp_path / "encoder.json").write_text('{"a": 0}')
    with pytest.raises(TokenizerError, match="vocab.bpe: no such vocabulary file"):
        FileTokenizer.from_path(tmp_path)
    (tmp_path / "encoder.json").write_text("{broken")
    shutil.copy(gpt2_dir(shared_data) / "vocab.bpe", tmp_path / "vocab.bpe")
    with pytest.raises(TokenizerError, match="not a BPE vocabulary and merges list"):
        FileTokenizer.from_path(tmp_path)


@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_every_shared_text_round_trips_byte_exactly(which, gpt2, trained, shared_texts):
    tok = gpt2 if which == "gpt2" else trained[0]
    for name, text in shared_texts.items():
        assert tok.decode(tok.encode(text)) == text, name


# ----------------------------------------------------------------------------------- training

def test_trained_bpe_has_special_tokens_first_with_stable_ids(trained):
    tok, path = trained
    assert tok.vocab_size == 1000
    assert [tok.tokenizer.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eot_id == 0
    assert sorted(tok.tokenizer.get_added_tokens_decoder()) == [0, 1, 2, 3]
    assert all(t.special for t in tok.tokenizer.get_added_tokens_decoder().values())
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 2 and tok.encode("<|im_end|>") == [3]
    reloaded = FileTokenizer.from_path(path)
    assert reloaded.encode(TRICKY) == tok.encode(TRICKY)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left behind


def test_trained_bpe_compresses_and_is_deterministic(trained, shared_data, tmp_path):
    tok, path = trained
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2  # merges really merge
    again = train_bpe([shared_data / "tinyshakespeare.txt"], 1000, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()
    assert again.encode(text) == tok.encode(text)


def test_train_from_an_iterator_of_texts_with_own_special_tokens(tmp_path, shared_data):
    lines = (shared_data / "the-verdict.txt").read_text(encoding="utf-8").split("\n\n")
    tok = train_bpe(iter(lines), 400, tmp_path / "sub" / "tok.json", special_tokens=["<eos>", "<pad>"],
                    min_frequency=3)
    assert tok.tokenizer.token_to_id("<eos>") == 0 and tok.tokenizer.token_to_id("<pad>") == 1
    assert tok.eot_id == 0 and tok.vocab_size <= 400
    assert tok.decode(tok.encode(TRICKY)) == TRICKY  # bytes never seen in training still encode


def test_train_from_a_directory_of_text_files(tmp_path, verdict_text):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text(verdict_text[:10_000], encoding="utf-8")
    (tmp_path / "corpus" / "sub" / "b.txt").write_text(verdict_text[10_000:], encoding="utf-8")
    tok = train_bpe(tmp_path / "corpus", 300, tmp_path / "tok.json")
    assert tok.decode(tok.encode(verdict_text)) == verdict_text


def test_training_errors_are_clear(tmp_path, verdict_text):
    out = tmp_path / "tok.json"
    with pytest.raises(TokenizerError, match=r"vocab_size must be at least 260 \(256 bytes \+ 4 special tokens\), "
                                             r"got 259"):
        train_bpe(iter([verdict_text]), 259, out)
    # before: the Rust trainer aborted the process (SIGABRT, a Rust backtrace) on 2^31 - 1
    with pytest.raises(TokenizerError, match=r"vocab_size must be at most 16,777,216 \(2\^24\), got 2,147,483,647"):
        train_bpe(iter([verdict_text]), 2**31 - 1, out)
    with pytest.raises(TokenizerError, match="missing.txt: no such training file"):
        train_bpe([tmp_path / "missing.txt"], 500, out)
    with pytest.raises(TokenizerError, match=r"no such training file \(to train on texts, pass an iterator"):
        train_bpe(["a text\nnot a path"], 500, out)
    with pytest.raises(TokenizerError, match="training text 1 is a int"):
        train_bpe(iter(["fine", 7]), 500, out)
    with pytest.raises(TokenizerError, match="special tokens must be distinct"):
        train_bpe(iter(["x"]), 500, out, special_tokens=["<a>", "<a>"])
    with pytest.raises(TokenizerError, match="directory holds no .txt files"):
        train_bpe(tmp_path, 500, out)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(TokenizerError, match="training the BPE tokenizer failed"):
        train_bpe(tmp_path / "latin1.txt", 500, out)
    assert not out.exists()


# ---------------------------------------------------------------------- OpenAI's reference BPE

def _openai_encoder(directory):
    """GPT-2's encoder as OpenAI released it (gpt-2/src/encoder.py), reading the released files itself."""
    regex = pytest.importorskip("regex")
    encoder = json.loads((directory / "encoder.json").read_text(encoding="utf-8"))
    lines = (directory / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]  # after the #version line
    ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_encoder = dict(zip(bs, map(chr, cs)))
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    @lru_cache(maxsize=None)
    def bpe(token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(text: str) -> list[int]:
        ids = []
        for piece in pattern.findall(text):
            ids.extend(encoder[t] for t in bpe("".join(byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    return encode
