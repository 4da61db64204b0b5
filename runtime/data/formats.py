"""Reading documents out of the formats corpora come in: text, JSON Lines and JSON arrays (plain, gzip or
zstd), Parquet and Hugging Face `datasets` directories, each streamed rather than loaded whole.

    fmt = identify(path)   # by its name, checked against its first bytes: DataError if they disagree
    for doc in read_file(path, fmt, "text", problems): ...

A file's name says what it holds (`x.jsonl.zst`: zstd-compressed JSON Lines) and its first bytes must
agree, so a gzip file named `.txt` or random bytes named `.parquet` are refused by name before anything
is read. Inside a file, what cannot be read (a line that is not JSON, a record without the text field,
invalid UTF-8) goes to `problems`: prepare's `Tally` counts it for the report, `Strict` raises.

Memory: a JSON Lines file is read a line at a time, Parquet a record batch at a time
(ParquetFile.iter_batches), a `datasets` directory a batch at a time from its memory map, and a text file
in pieces of PIECE_BYTES (one document, its pieces marked `ends=False` but the last). Only a JSON array
is read whole: the standard library cannot stream one, and such files are small in practice.
"""
from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from lmspec.runtime.data.cleaning import drop_surrogates
from lmspec.runtime.data.sniff import HEAD_BYTES, not_text
from lmspec.runtime.errors import DataError

READS = ("lmspec reads text (.txt), JSON Lines (.jsonl), JSON arrays (.json), any of these gzip- or zstd-compressed "
         "(.jsonl.gz, .jsonl.zst), Parquet (.parquet) and Hugging Face datasets directories (Dataset.save_to_disk)")
PIECE_BYTES = 1 << 18  # a text file is read, and a long one tokenized, this much at a time (8 per batch)
BATCH_BYTES = 8 << 20  # of text per Parquet or datasets record batch, whatever the length of its rows
MAX_BATCH_ROWS = 8192

_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd", "parquet": b"PAR1"}
_NAMES = {"gzip": "gzip", "zstd": "zstd", "parquet": "Parquet"}
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
# what a directory search picks up (a file named on the command line is read whatever its name)
CORPUS_SUFFIXES = tuple(s + c for s in (".txt",) + _JSON_SUFFIXES for c in ("", *_COMPRESSIONS)) + (".parquet",)


@dataclass(frozen=True)
class Format:
    kind: str                       # "text", "json" (JSON Lines or a JSON array), "parquet" or "datasets"
    compression: str | None = None  # "gzip" or "zstd", around text or JSON


@dataclass
class Document:
    text: str     # decoded, not yet cleaned
    source: str   # "path", "path:line" (JSON Lines) or "path[index]" (a JSON array, Parquet, datasets row)
    size: int     # bytes of its file read for it (compressed bytes when compressed), for progress bars
    ends: bool = True  # False: a piece of a long text file, continued by the next Document


class Problems(Protocol):
    """Where readers put what they cannot read: report.Tally (counted for prepare's report) or Strict."""

    def skip(self, path: Path, reason: str) -> None: ...        # a file that yields no document
    def bad_json(self, source: str, reason: str) -> None: ...   # a record without usable text
    def invalid_utf8(self, path: Path, count: int) -> None: ...  # bytes dropped


class Strict:
    """Problems as errors, for the readers that have no report to put them in (`data tokenize`,
    `tokenizer train`, `train --data`): a corpus they read is expected to be clean already."""

    def __init__(self, field_hint: str = "--text-field names the field that holds the text"):
        self.field_hint = field_hint  # what to do about a missing or unusable text field

    def skip(self, path: Path, reason: str) -> None:
        raise DataError(f"{path}: {reason}{self._hint(reason)}")

    def bad_json(self, source: str, reason: str) -> None:
        raise DataError(f"{source}: {reason}{self._hint(reason)}")

    def invalid_utf8(self, path: Path, count: int) -> None:
        if count:
            raise DataError(f"{path}: not UTF-8 text ({count} invalid byte{'s' * (count > 1)}); "
                            f"convert it to UTF-8, or clean it with `lmspec data prepare`")

    def _hint(self, reason: str) -> str:
        return f"; {self.field_hint}" if "field" in reason else ""


# ----------------------------------------------------------------------------- what a path holds

def is_datasets_directory(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def format_of(path: Path) -> Format:
    """What `path`'s name says it holds; anything not named otherwise is text."""
    if path.is_dir():
        return Format("datasets")
    name = path.name.lower()
    if name.endswith(".parquet"):
        return Format("parquet")
    stem, compression = name, None
    for suffix, method in _COMPRESSIONS.items():
        if name.endswith(suffix):
            stem, compression = name.removesuffix(suffix), method
    return Format("json" if stem.endswith(_JSON_SUFFIXES) else "text", compression)


def identify(path: Path) -> Format:
    """`path`'s format, after checking that its first bytes are what its name says: DataError naming
    the file, what it looks like and what lmspec reads, when they are not."""
    fmt = format_of(path)
    if fmt.kind == "datasets":
        return fmt
    head = _head(path)
    if not head:
        return fmt  # an empty file: reported as such by whoever reads it
    container = fmt.compression or (fmt.kind if fmt.kind == "parquet" else None)
    if container is not None and not head.startswith(_MAGIC[container]):
        looks = not_text(head)
        looks = looks.partition(", not text")[0].partition(":")[0] if looks else "text"
        raise DataError(f"{path}: named {path.suffix} but not {_NAMES[container]} data (it looks like {looks}); "
                        f"{READS}")
    if fmt.kind == "parquet":
        return fmt
    if fmt.compression is not None:
        with _opened(path, fmt.compression) as (stream, _):
            head = stream.read(HEAD_BYTES)
    what = not_text(head)
    if what:
        inside = f"{fmt.compression}-compressed, holding " if fmt.compression else ""
        rename = next((f", or name it {path.name}{suffix} to read it as it is"
                       for suffix, method in _COMPRESSIONS.items()
                       if not fmt.compression and head.startswith(_MAGIC[method])), "")
        raise DataError(f"{path}: {inside}{what}{rename}; {READS}")
    return fmt


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES)
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None


# ----------------------------------------------------------------------------- reading

def read_file(path: Path, fmt: Format, text_field: str, problems: Problems) -> Iterator[Document]:
    """The documents of one file or `datasets` directory, in order."""
    if fmt.kind == "text":
        return _text_pieces(path, fmt.compression, problems)
    if fmt.kind == "json":
        return _json_documents(path, fmt.compression, text_field, problems)
    if fmt.kind == "parquet":
        return _parquet_documents(path, text_field, problems)
    return _datasets_documents(path, text_field, problems)


@contextmanager
def _opened(path: Path, compression: str | None):
    """(a binary stream of `path`'s decompressed bytes, a function giving how many bytes of the file
    have been read so far); corrupt compressed data becomes a DataError naming the file."""
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    with raw:
        if compression is None:
            yield raw, raw.tell
            return
        if compression == "gzip":
            stream, errors = gzip.GzipFile(fileobj=raw, mode="rb"), (EOFError, OSError, zlib.error)
        else:
            import zstandard

            stream, errors = io.BufferedReader(_ZstdFrames(raw), buffer_size=PIECE_BYTES), (zstandard.ZstdError,)
        try:
            yield stream, raw.tell
        except errors as err:
            raise DataError(f"{path}: corrupt or truncated {compression} data ({err})") from None


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame in `raw`, one after another (files written by pzstd,
    or appended to, hold several). zstandard's own stream_reader ends quietly where a file is cut off
    in the middle of a frame; this raises ZstdError there."""

    def __init__(self, raw):
        import zstandard

        self._zstd, self._raw = zstandard, raw
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._started = False  # whether the current frame has been fed any bytes
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._started:
                    raise self._zstd.ZstdError("the file ends inside a frame")
                return 0
            self._pending = memoryview(self._feed(chunk))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self._started = True
            out.append(self._frame.decompress(chunk))
            chunk = b""
            if self._frame.eof:  # the next frame starts in what this one left over
                chunk = self._frame.unused_data
                self._frame, self._started = self._zstd.ZstdDecompressor().decompressobj(), False
        return b"".join(out)


def _text_pieces(path: Path, compression: str | None, problems: Problems) -> Iterator[Document]:
    """A text file as one document, in pieces of about PIECE_BYTES cut where encoding the pieces one by
    one gives the same tokens as encoding the whole (`_cut`)."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    carry, read_before, first = "", 0, True
    with _opened(path, compression) as (stream, position):
        while True:
            raw = stream.read(PIECE_BYTES)
            text, invalid = drop_surrogates(decoder.decode(raw, final=not raw))
            problems.invalid_utf8(path, invalid)
            if first:
                first = False
                # A file mostly made of invalid bytes is binary or in another encoding: what would be
                # left of it after dropping those bytes is not text worth keeping.
                if raw and invalid * 2 > len(raw):
                    whole = len(raw) < PIECE_BYTES
                    problems.skip(path, f"not UTF-8 text ({invalid} of {'' if whole else 'its first '}{len(raw)} "
                                        f"bytes invalid)")
                    return
                text = text.removeprefix("\ufeff")
            carry += text
            if not raw:
                if carry:
                    yield Document(carry, str(path), position() - read_before)
                return
            cut = _cut(carry) if len(carry) > PIECE_BYTES else 0
            if cut:
                now = position()
                yield Document(carry[:cut], str(path), now - read_before, ends=False)
                carry, read_before = carry[cut:], now


def _cut(text: str) -> int:
    """Where to end a piece of a long text, 0 for nowhere yet. Byte-level BPE pre-tokenizers (GPT-2's,
    Llama 3's, those lmspec trains) always split before a line that follows a non-blank character, and
    before a space between two words; a cut there gives the ids of the whole text."""
    end = len(text) - 1
    i = text.rfind("\n", 1, end)
    while i > 0 and (text[i - 1].isspace() or text[i + 1].isspace()):
        i = text.rfind("\n", 1, i)
    if i > 0:
        return i + 1
    i = text.rfind(" ", 1, end)
    while i > 0 and (text[i - 1].isspace() or text[i + 1].isspace()):
        i = text.rfind(" ", 1, i)
    if i > 0:
        return i
    # No such place in a long stretch: cut anyway, so that memory stays bounded; only the tokens at
    # the cut may differ.
    return len(text) if len(text) > 8 * PIECE_BYTES else 0


def _json_documents(path: Path, compression: str | None, text_field: str, problems: Problems) -> Iterator[Document]:
    count = 0
    with _opened(path, compression) as (stream, position):
        head = stream.peek(HEAD_BYTES) if hasattr(stream, "peek") else b""
        if head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"[":
            documents = _json_array(path, stream, text_field, problems)
        else:
            documents = _json_lines(path, stream, position, text_field, problems)
        for doc in documents:
            count += 1
            yield doc
    if count == 0:
        problems.skip(path, f"no records with a string {text_field!r} field")


def _json_lines(path: Path, lines, position, text_field: str, problems: Problems) -> Iterator[Document]:
    before = 0
    for number, raw in enumerate(lines, start=1):
        text, invalid = drop_surrogates(raw.decode("utf-8", errors="surrogateescape"))
        problems.invalid_utf8(path, invalid)
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue  # blank lines (a trailing newline, spacing) hold no record
        source = f"{path}:{number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            problems.bad_json(source, f"not valid JSON ({err.msg} at column {err.colno})")
            continue
        text = _text_of(record, text_field, path, source, problems)
        if text is not None:
            now = position()
            yield Document(text, source, now - before)
            before = now


def _json_array(path: Path, stream, text_field: str, problems: Problems) -> Iterator[Document]:
    raw = stream.read()
    text, invalid = drop_surrogates(raw.decode("utf-8", errors="surrogateescape"))
    problems.invalid_utf8(path, invalid)
    try:
        records = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as err:
        problems.bad_json(f"{path}:{err.lineno}", f"not valid JSON ({err.msg} at column {err.colno})")
        return
    if not isinstance(records, list):
        problems.bad_json(f"{path}:1", "not an array of records")
        return
    share = _Share(path.stat().st_size, len(records))
    for index, record in enumerate(records):
        source = f"{path}[{index}]"
        text = _text_of(record, text_field, path, source, problems)
        if text is not None:
            yield Document(text, source, share.of(index + 1))


def _text_of(record, text_field: str, path: Path, source: str, problems: Problems) -> str | None:
    if not isinstance(record, dict):
        problems.bad_json(source, f"not a JSON object but {type(record).__name__}")
        return None
    if text_field not in record:
        problems.bad_json(source, f"no {text_field!r} field")
        return None
    text = record[text_field]
    if not isinstance(text, str):
        problems.bad_json(source, f"field {text_field!r} is {type(text).__name__}, not a string")
        return None
    # JSON escapes can spell lone surrogates ("\ud800"), which cannot be written as UTF-8.
    text, surrogates = drop_surrogates(text)
    problems.invalid_utf8(path, surrogates)
    return text


class _Share:
    """A file's bytes spread over its records, for progress: of(n) is what the n-th record adds, so
    that the records of a file add up to its size exactly."""

    def __init__(self, size: int, count: int):
        self.size, self.count, self.given = size, max(count, 1), 0

    def of(self, done: int) -> int:
        upto = self.size * done // self.count
        part, self.given = upto - self.given, upto
        return part


# ----------------------------------------------------------------------------- columnar: Parquet, datasets

def _parquet_documents(path: Path, text_field: str, problems: Problems) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # buffer_size: column chunks are read in pieces of this size, not whole (row groups can be large)
        parquet = pq.ParquetFile(path, buffer_size=PIECE_BYTES)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if not _has_text_column(path, schema, text_field, problems):
        return
    meta = parquet.metadata
    leaf = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == text_field), None)
    text_bytes = 0 if leaf is None else sum(meta.row_group(g).column(leaf).total_uncompressed_size
                                            for g in range(meta.num_row_groups))
    batches = parquet.iter_batches(batch_size=_rows_per_batch(text_bytes, meta.num_rows), columns=[text_field])
    yield from _rows(path, _guard(path, batches, (pa.ArrowException, OSError)), text_field, problems,
                     path.stat().st_size, meta.num_rows)


def _datasets_documents(path: Path, text_field: str, problems: Problems) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a Hugging Face datasets directory; reading it needs the datasets package, "
                        f"which is not installed: pip install datasets") from None
    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its "Loading dataset from disk" bar is not this command's progress
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:  # what a damaged directory raises
        raise DataError(f"{path}: not a readable datasets directory ({err})") from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if isinstance(loaded, datasets.DatasetDict):
        # Its train split only: the others are for evaluation, which pretraining text must not include.
        if "train" not in loaded:
            splits = ", ".join(loaded)
            raise DataError(f"{path}: a DatasetDict without a 'train' split (its splits: {splits}); give one "
                            f"split's folder instead, e.g. {path / next(iter(loaded), 'SPLIT')}")
        loaded, path = loaded["train"], path / "train"
    import pyarrow as pa

    if not _has_text_column(path, loaded.data.schema, text_field, problems):
        return
    size = sum(f.stat().st_size for f in path.glob("*.arrow"))
    rows = _rows_per_batch(loaded.data.column(text_field).nbytes, loaded.num_rows)
    tables = loaded.with_format("arrow", columns=[text_field]).iter(batch_size=rows)
    yield from _rows(path, _guard(path, tables, (pa.ArrowException, OSError)), text_field, problems, size,
                     loaded.num_rows)


def _has_text_column(path: Path, schema, text_field: str, problems: Problems) -> bool:
    """Whether `schema` has a column of strings named `text_field`; the reason it has not goes to `problems`."""
    import pyarrow as pa

    if text_field not in schema.names:
        problems.skip(path, f"no {text_field!r} field (its columns: {', '.join(schema.names)})")
        return False
    kind = schema.field(text_field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        problems.skip(path, f"field {text_field!r} holds {kind}, not strings")
        return False
    return True


def _rows_per_batch(text_bytes: int, rows: int) -> int:
    """Rows per record batch: about BATCH_BYTES of text, so that long documents do not fill memory."""
    per_row = text_bytes / rows if text_bytes and rows else 4096
    return max(1, min(MAX_BATCH_ROWS, int(BATCH_BYTES / max(per_row, 1))))


def _guard(path: Path, batches, errors) -> Iterator:
    """`batches`, with a read error on the way (a damaged page) as a DataError naming the file."""
    try:
        yield from batches
    except errors as err:
        raise DataError(f"{path}: damaged columnar data ({err})") from None


def _rows(path: Path, batches, text_field: str, problems: Problems, size: int, rows: int) -> Iterator[Document]:
    share, row = _Share(size, rows), 0
    for batch in batches:
        for text in batch.column(0).to_pylist():
            source = f"{path}[{row}]"
            row += 1
            if text is None:
                problems.bad_json(source, f"field {text_field!r} is null, not a string")
                continue
            yield Document(text, source, share.of(row))
