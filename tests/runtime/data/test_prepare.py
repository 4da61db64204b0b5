"""The collect / clean / deduplicate stage (`lmspec.runtime.data.prepare`), on real text from the shared
data folder with duplicates planted into it, and on small hand-made files for the edge cases."""
from __future__ import annotations

import json
import random
import re
import unicodedata
from pathlib import Path

import pytest

from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.data.dedupe import shingle_size_for, words_of
from lmspec.runtime.data.prepare import DOCUMENTS_FILE, REPORT_FILE, iter_documents, prepare
from lmspec.runtime.data.report import format_report

# Words that occur in neither Shakespeare nor the SMS messages, so an edit always changes a word.
REPLACEMENTS = ["zeppelin", "quasar", "photon", "laptop", "kilobyte", "voltmeter", "algorithm"]


# ----------------------------------------------------------------------------- helpers

def write_jsonl(path: Path, records: list[dict]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def texts_of(out_dir: Path) -> list[str]:
    return list(iter_documents(out_dir))


def change_words(text: str, count: int, rng: random.Random) -> str:
    """`text` with `count` of its words (runs of letters and digits) replaced by other words."""
    spans = [match.span() for match in re.finditer(r"\w+", text)]
    for start, end in sorted(rng.sample(spans, count), reverse=True):
        text = text[:start] + rng.choice(REPLACEMENTS) + text[end:]
    return text


def word_jaccard(a: str, b: str) -> float:
    wa, wb = set(words_of(a)), set(words_of(b))
    return len(wa & wb) / len(wa | wb)


def sms_messages(shared_data: Path) -> list[tuple[str, str]]:
    path = shared_data / "SMSSpamCollection.tsv"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    lines = path.read_text(encoding="utf-8").split("\n")
    return [tuple(line.split("\t", 1)) for line in lines if line]


def shakespeare_chunks(shared_data: Path, min_chars: int = 400) -> list[str]:
    """Consecutive paragraphs (speeches) of Tiny Shakespeare joined until each chunk has
    `min_chars` characters: about 1,850 scene fragments of 60 to 700 words."""
    path = shared_data / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    chunks, current = [], []
    for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
        current.append(paragraph.strip())
        if sum(map(len, current)) >= min_chars:
            chunks.append("\n\n".join(current))
            current = []
    return chunks


# ----------------------------------------------------------------------------- real data

def test_sms_duplicates_planted_are_removed_and_the_rest_is_untouched(shared_data, tmp_path):
    messages = sms_messages(shared_data)
    records = [{"label": label, "message": text} for label, text in messages]
    clean_dir = tmp_path / "clean"
    clean = prepare([str(write_jsonl(tmp_path / "sms.jsonl", records))], str(clean_dir),
                    text_field="message")
    kept = texts_of(clean_dir)

    # The SMS set has genuine exact duplicates: 403 as given, 414 once trailing spaces (which
    # cleaning trims) are ignored. No two messages differ only by a control character.
    true_exact = len(messages) - len({text.rstrip() for _, text in messages})
    assert true_exact == 414
    assert clean["removed"]["exact_duplicates"] == true_exact
    assert clean["documents_in"] == len(messages) == clean["documents_out"] + sum(clean["removed"].values())
    assert len(kept) == clean["documents_out"] == len(set(kept))
    # It also holds templated spam sent with a different phone number or a word changed; every
    # message dropped as a near duplicate must really have a near twin among the kept ones, and
    # they are few (about 2%): distinct messages are kept.
    # (Messages as cleaning leaves them: no C0/C1 controls, no trailing spaces.)
    cleaned = {re.sub("[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text).rstrip() for _, text in messages}
    dropped = cleaned - set(kept)
    assert len(dropped) == clean["removed"]["near_duplicates"] < 0.03 * len(messages)
    kept_words = [set(words_of(text)) for text in kept]
    for text in dropped:
        words = set(words_of(text))
        assert max(len(words & other) / len(words | other) for other in kept_words) >= 0.7, text
    # Control characters: the set has cp1252 quotes stored as C1 controls ("that\x92s").
    assert clean["control_chars_removed"] == sum(
        1 for _, text in messages for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\n\t")

    # Now plant copies after the real messages: exact ones, and ones with words changed.
    rng = random.Random(0)
    long_kept = [text for text in kept if len(words_of(text)) >= 18]
    exact_copies = rng.sample(kept, 100)
    # One changed word in 18 or more, two in 40 or more: similarity 0.85 and up, which the
    # 128-permutation MinHash estimate (standard error 0.03) does not put under 0.8.
    near_copies = []
    for text in rng.sample(long_kept, 100):
        n_words = len(words_of(text))
        near_copies.append(change_words(text, 2 if n_words >= 40 else 1, rng))
    planted = exact_copies + near_copies
    rng.shuffle(planted)
    planted_dir = tmp_path / "planted"
    report = prepare([str(tmp_path / "sms.jsonl"),
                      str(write_jsonl(tmp_path / "planted.jsonl", [{"message": t} for t in planted]))],
                     str(planted_dir), text_field="message")

    assert texts_of(planted_dir) == kept  # every planted copy removed, nothing else changed
    assert report["removed"]["exact_duplicates"] == true_exact + len(exact_copies)
    assert report["removed"]["near_duplicates"] == clean["removed"]["near_duplicates"] + len(near_copies)
    assert report["near_duplicate_examples"], "examples of near duplicates for inspection"
    for example in report["near_duplicate_examples"]:
        assert example["kept"]["index"] < example["dropped"]["index"]
        assert example["similarity"] >= 0.8
        assert word_jaccard(example["kept"]["text"], example["dropped"]["text"]) > 0.6


def test_shakespeare_scenes_all_kept_and_planted_duplicates_removed(shared_data, tmp_path):
    chunks = shakespeare_chunks(shared_data)
    assert len(chunks) > 1800 and len(set(chunks)) == len(chunks)
    rng = random.Random(1)
    documents = list(chunks)
    planted = 0
    # Insert each copy somewhere after its original, so the original is the one kept.
    for index in sorted(rng.sample(range(len(chunks)), 150), reverse=True):
        original = chunks[index]
        n_words = len(words_of(original))
        # a few words changed: one in every hundred, at least one
        copy = original if planted % 3 == 0 else change_words(original, max(1, n_words // 100), rng)
        documents.insert(rng.randint(index + 1, len(documents)), copy)
        planted += 1
    # One copy reflowed: different line breaks and spacing, same words.
    documents.append(" ".join(chunks[5].split()))
    planted += 1

    for position in range(0, len(documents), 400):  # several files: one document per line each
        write_jsonl(tmp_path / f"part-{position // 400:02d}.jsonl",
                    [{"text": text} for text in documents[position:position + 400]])
    report = prepare([str(tmp_path)], str(tmp_path / "out"))

    assert texts_of(tmp_path / "out") == chunks
    assert report["removed"]["exact_duplicates"] + report["removed"]["near_duplicates"] == planted
    assert report["removed"]["exact_duplicates"] == 50
    assert report["documents_in"] == len(documents)


def test_instruction_data_json_array(shared_data, tmp_path):
    path = shared_data / "instruction-data.json"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    records = json.loads(path.read_text(encoding="utf-8"))
    report = prepare([str(path)], str(tmp_path / "out"), text_field="output", dedup_near=False)
    distinct = len({record["output"].strip() for record in records})
    assert report["documents_in"] == len(records) == 1100
    assert report["documents_out"] == distinct
    assert report["bad_json_lines"]["count"] == 0


# ----------------------------------------------------------------------------- short documents

def test_short_messages_are_matched_exactly_only(tmp_path):
    documents = [
        "I love you so much",
        "I hate you so much",          # one word of five changed: a different message
        "Ok.",
        "ok!!",                        # same word, other punctuation: kept, too short to judge
        "I love you so much",          # an exact copy: dropped
        "Sorry, I'll call you later tonight when I get back from the meeting",
        "Sorry, I'll call you later tonight when I get back from the office",  # 1 of 14 words
    ]
    write_jsonl(tmp_path / "short.jsonl", [{"text": t} for t in documents])
    report = prepare([str(tmp_path / "short.jsonl")], str(tmp_path / "out"))
    assert texts_of(tmp_path / "out") == documents[:4] + documents[5:6]
    assert report["removed"]["exact_duplicates"] == 1
    assert report["removed"]["near_duplicates"] == 1


def test_shingle_size_shrinks_for_short_documents():
    assert shingle_size_for(8, 5, 0.8) == 0       # exact matching only
    assert shingle_size_for(9, 5, 0.8) == 1       # single words: one changed word tolerated
    assert shingle_size_for(58, 5, 0.8) == 1
    assert shingle_size_for(59, 5, 0.8) == 2
    assert shingle_size_for(149, 5, 0.8) == 5
    assert shingle_size_for(5000, 5, 0.8) == 5    # `shingle` is the cap
    sizes = [shingle_size_for(n, 5, 0.8) for n in range(300)]
    assert sizes == sorted(sizes)


def test_near_duplicate_found_across_shingle_sizes(shared_data, tmp_path):
    """A truncated copy can have a shorter shingle size than its original (60 words: 2-word
    shingles, 56 words: single words); the two must still be compared."""
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    word_ends = [match.end() for match in re.finditer(r"\w+", text)]
    original, truncated = text[:word_ends[59]], text[:word_ends[55]]
    assert shingle_size_for(len(words_of(original)), 5, 0.8) == 2
    assert shingle_size_for(len(words_of(truncated)), 5, 0.8) == 1
    assert word_jaccard(original, truncated) > 0.85
    write_jsonl(tmp_path / "a.jsonl", [{"text": original}, {"text": truncated}])
    report = prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"))
    assert report["removed"]["near_duplicates"] == 1
    assert texts_of(tmp_path / "out") == [original]
    # and with near-duplicate removal off, both stay
    report = prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out2"), dedup_near=False)
    assert report["documents_out"] == 2 and report["near_duplicate_examples"] == []


def test_exact_copy_of_a_dropped_near_duplicate_counts_as_exact(tmp_path):
    base = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun all day"
    near = base.replace("lazy", "sleepy")
    write_jsonl(tmp_path / "a.jsonl", [{"text": base}, {"text": near}, {"text": near}])
    report = prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"))
    assert report["removed"]["near_duplicates"] == 1
    assert report["removed"]["exact_duplicates"] == 1


# ----------------------------------------------------------------------------- reading and cleaning

def test_invalid_utf8_and_empty_files_are_reported_not_fatal(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_good.txt").write_bytes("caf\u00e9 ok\n".encode())
    (folder / "b_bad_bytes.txt").write_bytes(b"half \xff\xfe good \xc3 text\n")
    (folder / "c_empty.txt").write_bytes(b"")
    (folder / "d_binary.txt").write_bytes(bytes(range(128, 256)) * 4)
    (folder / "e_blank.txt").write_bytes(b"  \n\t\n")
    report = prepare([str(folder)], str(tmp_path / "out"))

    assert texts_of(tmp_path / "out") == ["café ok", "half  good  text"]
    assert report["invalid_utf8"]["files"] == {str(folder / "b_bad_bytes.txt"): 3,
                                               str(folder / "d_binary.txt"): 512}
    assert report["invalid_utf8"]["count"] == 515
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped_files"]}
    assert skipped == {"c_empty.txt": "empty file",
                       "d_binary.txt": "not UTF-8 text (512 of 512 bytes invalid)"}
    assert report["removed"]["empty"] == 1       # the whitespace-only file
    assert report["documents_in"] == 3
    text = format_report(report)
    assert "b_bad_bytes.txt: 3 invalid UTF-8 bytes dropped" in text
    assert "skipped" in text and "c_empty.txt: empty file" in text


def test_genuine_replacement_characters_are_kept(tmp_path):
    (tmp_path / "a.txt").write_text("a \ufffd in the source is text", encoding="utf-8")
    report = prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"))
    assert texts_of(tmp_path / "out") == ["a \ufffd in the source is text"]
    assert report["invalid_utf8"]["count"] == 0


def test_jsonl_text_field_and_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"body": "first document", "id": 1}),
        "{not json",
        json.dumps({"title": "no body"}),
        "",
        json.dumps({"body": 42}),
        json.dumps(["a", "list"]),
        json.dumps({"body": "lone surrogate \ud800 here"}),  # written as the escape \\ud800
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"body": "bad \xff byte"}\n')
    report = prepare([str(path)], str(tmp_path / "out"), text_field="body")

    assert texts_of(tmp_path / "out") == ["first document", "lone surrogate  here", "bad  byte"]
    bad = report["bad_json_lines"]
    assert bad["count"] == 4
    assert bad["examples"][0].startswith(f"{path}:2: not valid JSON")
    assert bad["examples"][1] == f"{path}:3: no 'body' field"
    assert bad["examples"][2] == f"{path}:5: field 'body' is int, not a string"
    assert bad["examples"][3] == f"{path}:6: not a JSON object but list"
    assert report["invalid_utf8"]["files"] == {str(path): 2}
    assert "4 JSON records without usable text" in format_report(report)


def test_jsonl_without_the_field_leaves_no_corpus_and_says_which_option_fixes_it(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"content": "x"}, {"content": "y"}])
    with pytest.raises(DataError, match=rf"no document is left of 1 file\(s\) \({re.escape(str(path))}: no records "
                                        r"with a string 'text' field.*nothing was written; try --text-field"):
        prepare([str(path)], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # made for the run, removed with it
    report = prepare([str(path)], str(tmp_path / "out"), text_field="content")
    assert report["documents_out"] == 2


def test_directories_are_searched_recursively_in_path_order(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    (root / "a" / "one.txt").write_text("document one\n")
    (root / "b" / "deep" / "three.TXT").write_text("document three\n")
    write_jsonl(root / "b" / "two.jsonl", [{"text": "document two a"}, {"text": "document two b"}])
    (root / "b" / "notes.md").write_text("not an input\n")
    (root / ".hidden" / "x.txt").write_text("hidden\n")
    (root / "four.json").write_text(json.dumps({"text": "document four"}) + "\n")
    single = tmp_path / "five.txt"
    single.write_text("document five\n")

    report = prepare([str(root), str(single)], str(tmp_path / "out"))
    assert texts_of(tmp_path / "out") == [
        "document one", "document three", "document two a", "document two b", "document four",
        "document five"]
    assert report["files"] == 5

    # Running again with the output folder inside an input folder does not read the output.
    report = prepare([str(root)], str(root / "prepared"))
    assert report["documents_in"] == 5
    report = prepare([str(root)], str(root / "prepared"))
    assert report["documents_in"] == 5


def test_cleaning_nfc_control_characters_and_line_endings(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeff\n\n  Cafe\u0301 au lait\r\nbell\x07 tab\there\rend\x00  \n".encode())
    report = prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"))
    [text] = texts_of(tmp_path / "out")
    assert text == "  Caf\u00e9 au lait\nbell tab\there\nend"
    assert unicodedata.is_normalized("NFC", text)
    assert report["control_chars_removed"] == 2
    assert report["line_endings_normalised"] == 2
    assert report["nfc_normalised_documents"] == 1


def test_length_filters(tmp_path):
    texts = ["x" * n for n in (3, 10, 50, 200)]
    (tmp_path / "d").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "d" / f"{i}.txt").write_text(t)
    report = prepare([str(tmp_path / "d")], str(tmp_path / "out"), min_chars=10, max_chars=100)
    assert texts_of(tmp_path / "out") == texts[1:3]
    assert report["removed"]["too_short"] == 1
    assert report["removed"]["too_long"] == 1


def test_outputs_are_complete_and_match_the_returned_report(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha é 🎉"}, {"text": "beta"}, {"text": "alpha é 🎉"}])
    out = tmp_path / "out"
    report = prepare([str(tmp_path / "a.jsonl")], str(out))
    assert sorted(p.name for p in out.iterdir()) == [DOCUMENTS_FILE, REPORT_FILE]  # no temp files
    assert json.loads((out / REPORT_FILE).read_text(encoding="utf-8")) == report
    assert (out / DOCUMENTS_FILE).read_text(encoding="utf-8") == (
        '{"text": "alpha é 🎉"}\n{"text": "beta"}\n')
    assert report["bytes_out"] == (out / DOCUMENTS_FILE).stat().st_size
    assert report["bytes_in"] == (tmp_path / "a.jsonl").stat().st_size
    assert report["inputs"] == [str(tmp_path / "a.jsonl")]
    for key in ("near_dup_threshold", "documents_in", "documents_out", "removed", "bad_json_lines",
                "invalid_utf8", "control_chars_removed", "bytes_in", "bytes_out",
                "near_duplicate_examples"):
        assert key in report
    assert "3 documents in 1 file(s)" in format_report(report)


def test_missing_inputs_and_bad_settings_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere.txt: no such file or directory"):
        prepare([str(tmp_path / "nowhere.txt")], str(tmp_path / "out"))
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match="near_dup_threshold"):
        prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"), near_dup_threshold=1.0)
    with pytest.raises(DataError, match="not a directory"):
        prepare([str(tmp_path / "a.txt")], str(tmp_path / "a.txt"))
    with pytest.raises(DataError, match="run `lmspec data prepare` first"):
        list(iter_documents(tmp_path / "empty"))
