"""`lmspec data prepare|tokenize|verify` and `lmspec tokenizer train|encode|decode`."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from lmspec.runtime.cli.numbers import AT_LEAST_0, AT_LEAST_1, SHARE, STRICT_FRACTION
from lmspec.runtime.cli.verb import Verb, option_output
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.errors import TokenizerError, UsageError


def _documents(sources: list[str], text_field: str):
    """(the documents of a prepared corpus directory, or of corpus files and directories in any format
    runtime/data/formats.py reads, streamed; their size in bytes, None when unknown)."""
    from lmspec.runtime.data.documents import list_input_files, no_corpus_files, read_documents
    from lmspec.runtime.data.prepare import DOCUMENTS_FILE, iter_documents
    if len(sources) == 1 and (Path(sources[0]) / DOCUMENTS_FILE).is_file():
        return iter_documents(sources[0]), None
    files = list_input_files(sources)
    for source in sources:
        if Path(source).is_dir() and not any(f.path.is_relative_to(source) for f in files):
            raise DataError(no_corpus_files(source) + f"; nor is it a prepared folder ({DOCUMENTS_FILE})")
    return read_documents(files, text_field), sum(f.size for f in files)


def _texts(documents):
    return (doc if isinstance(doc, str) else doc.text for doc in documents)


def data_prepare_options(p) -> None:
    """`lmspec data prepare`'s options."""
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text, JSONL, JSON, .jsonl.gz, .jsonl.zst or Parquet files, datasets directories, directories")
    p.add_argument("-o", "--out", required=True, help="directory for documents.jsonl and report.json")
    p.add_argument("--text-field", default="text",
                   help="the field holding the text in JSON records, Parquet and datasets rows (default: text)")
    p.add_argument("--min-chars", type=AT_LEAST_0, default=1, help="drop shorter documents")
    p.add_argument("--max-chars", type=AT_LEAST_1, help="drop longer documents")
    p.add_argument("--near-dup-threshold", type=STRICT_FRACTION, default=0.8,
                    help="estimated Jaccard similarity of word shingles above which a document is a near-duplicate")
    p.add_argument("--shingle", type=AT_LEAST_1, default=5, help="words per shingle")
    p.add_argument("--no-near-dup", action="store_true", help="drop exact duplicates only")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true")


def cmd_data_prepare(args) -> int:
    from lmspec.runtime.data.prepare import prepare
    from lmspec.runtime.data.report import format_report
    report = prepare(args.inputs, args.out, text_field=args.text_field, min_chars=args.min_chars,
                     max_chars=args.max_chars, near_dup_threshold=args.near_dup_threshold,
                     shingle=args.shingle, dedup_near=not args.no_near_dup, progress=not args.no_progress)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


DATA_PREPARE = Verb(
    "data prepare",
    "Normalise, clean, deduplicate (exact and near) and filter documents; write a report.",
    data_prepare_options, cmd_data_prepare, outputs=(option_output("out", directory=True),),
    examples="""examples:
  lmspec data prepare corpus/ extra.jsonl --out prepared/
  lmspec data prepare crawl.jsonl.zst wiki.parquet saved_dataset/ --out prepared/
  lmspec data prepare dump.jsonl --text-field content --min-chars 200 --near-dup-threshold 0.7 --out prepared/""",
)


def data_tokenize_options(p) -> None:
    """`lmspec data tokenize`'s options."""
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                    help="a prepared directory, or corpus files and directories as `data prepare` reads them "
                         "(a text file is one document; a JSONL, JSON, Parquet or datasets record is one)")
    p.add_argument("--text-field", default="text",
                   help="the field holding the text in JSON records, Parquet and datasets rows (default: text)")
    p.add_argument("--tokenizer", required=True,
                    help="a tokenizers JSON file, or a directory with tokenizer.json or encoder.json + vocab.bpe")
    p.add_argument("-o", "--out", required=True, help="directory for the shards and meta.json")
    p.add_argument("--val-fraction", type=SHARE, default=0.1, help="share of documents for validation")
    p.add_argument("--shard-tokens", type=AT_LEAST_1, default=64 * 2**20, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true")


def cmd_data_tokenize(args) -> int:
    from lmspec.runtime.data.shards import write_shards
    from lmspec.runtime.data.tokenizer import FileTokenizer
    tokenizer = FileTokenizer.from_path(args.tokenizer)
    documents, size = _documents(args.sources, args.text_field)
    meta = write_shards(documents, tokenizer, args.out, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                        overwrite=args.overwrite, progress=not args.no_progress, total_bytes=size)
    splits = ", ".join(f"{name}: {info['tokens']:,} tokens in {info['documents']:,} documents"
                       for name, info in meta["splits"].items())
    print(f"wrote {args.out} ({meta['dtype']}): {splits}")
    return 0


DATA_TOKENIZE = Verb(
    "data tokenize",
    "Tokenize a prepared corpus into binary shards for `lmspec train --data`.",
    data_tokenize_options, cmd_data_tokenize, outputs=(option_output("out", directory=True),),
    examples="""examples:
  lmspec data tokenize prepared/ --tokenizer tok.json --out shards/
  lmspec data tokenize prepared/ --tokenizer ../shared/data/gpt2-tokenizer --out shards/ --val-fraction 0.05
  lmspec data tokenize dump.parquet --text-field content --tokenizer tok.json --out shards/""",
)


def data_verify_options(p) -> None:
    """`lmspec data verify`'s options."""
    p.add_argument("paths", nargs="+", metavar="DIR",
                   help="a shards directory (from `lmspec data tokenize`), or a run, its checkpoints directory or "
                        "one step directory")


def cmd_data_verify(args) -> int:
    from lmspec.runtime.checkpoint.integrity import check_run, run_advice
    from lmspec.runtime.data.shards import is_shards_directory, verify_shards
    from lmspec.runtime.errors import CheckpointError
    damaged, advice, shards_damaged = [], [], False
    for path in args.paths:
        if not Path(path).exists():
            raise DataError(f"{path}: no such file or directory")
        if is_shards_directory(path):
            reports = [verify_shards(path)]
            shards_damaged = shards_damaged or bool(reports[0].problems)
        else:
            reports = check_run(path)
            advice += filter(None, [run_advice(reports)])
        for report in reports:
            for file, problem in report.problems:
                print(f"damaged   {file}: {problem}")
                damaged.append(str(file))
            if report.checked and not report.problems:
                print(f"ok        {report.path} ({report.checked} files verified)")
            if report.unchecked:
                print(f"unchecked {report.path}: {report.unchecked}")
    if damaged:
        error = DataError if shards_damaged else CheckpointError
        raise error(f"{len(damaged)} damaged file{'s' * (len(damaged) > 1)}: {', '.join(damaged)}"
                    + "".join(f"; {a}" for a in advice))
    return 0


DATA_VERIFY = Verb(
    "data verify",
    "Check token shards and checkpoints against the checksums recorded when they were written.",
    data_verify_options, cmd_data_verify,
    examples="""examples:
  lmspec data verify shards/                  # every shard and tokenizer.json; exit 1 naming each damaged file
  lmspec data verify runs/tiny                # every checkpoint of a run
  lmspec data verify runs/tiny/checkpoints/step_000500 shards/""",
)


def tokenizer_train_options(p) -> None:
    """`lmspec tokenizer train`'s options."""
    p.add_argument("corpus", nargs="+", help="a prepared directory, or corpus files and directories")
    p.add_argument("--text-field", default="text",
                   help="the field holding the text in JSON records, Parquet and datasets rows (default: text)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("-o", "--out", required=True, help="the tokenizer JSON file to write")
    p.add_argument("--special", action="append", default=[], metavar="TOKEN",
                    help="another special token (beside <|endoftext|>, <|pad|>, <|im_start|>, <|im_end|>)")
    p.add_argument("--min-frequency", type=AT_LEAST_1, default=2)
    p.add_argument("--no-progress", action="store_true")


def cmd_tokenizer_train(args) -> int:
    from lmspec.runtime.data.tokenizer_training import DEFAULT_SPECIAL_TOKENS, train_bpe
    specials = list(DEFAULT_SPECIAL_TOKENS) + [s for s in args.special if s not in DEFAULT_SPECIAL_TOKENS]
    documents, _ = _documents(args.corpus, args.text_field)
    texts = _texts(documents)
    first = next((text for text in texts if text.strip()), None)  # blank texts teach a tokenizer nothing
    if first is None:  # else a tokenizer of bytes alone would be written, and trained on nothing
        raise DataError(f"{' '.join(args.corpus)}: no text to train on")
    tok = train_bpe(itertools.chain([first], texts), args.vocab_size, args.out, special_tokens=specials,
                    min_frequency=args.min_frequency, progress=not args.no_progress)
    ids = {s: tok.tokenizer.token_to_id(s) for s in specials}
    print(f"wrote {args.out}: {tok.vocab_size:,} tokens; special: "
          + ", ".join(f"{s}={i}" for s, i in ids.items()))
    return 0


TOKENIZER_TRAIN = Verb(
    "tokenizer train",
    "Train a byte-level BPE tokenizer with special tokens (Hugging Face tokenizers).",
    tokenizer_train_options, cmd_tokenizer_train, outputs=(option_output("out", directory=False),),
    examples="""examples:
  lmspec tokenizer train prepared/ --vocab-size 8192 --out tok.json
  lmspec tokenizer train ../shared/data/tinyshakespeare.txt --vocab-size 1024 --out shakespeare.json""",
)


def _load(path: str):
    from lmspec.runtime.data.tokenizer import FileTokenizer
    return FileTokenizer.from_path(path)


def tokenizer_encode_options(p) -> None:
    """`lmspec tokenizer encode`'s options."""
    p.add_argument("tokenizer")
    p.add_argument("text", nargs="?")
    p.add_argument("--file", help="encode this file instead")
    p.add_argument("--count", action="store_true", help="print only how many tokens")


def cmd_tokenizer_encode(args) -> int:
    if (args.text is None) == (args.file is None):
        raise UsageError("give the text to encode or --file, not both")
    try:
        tok = _load(args.tokenizer)
        text = args.text if args.text is not None else Path(args.file).read_text(encoding="utf-8")
        ids = tok.encode(text)
    except OSError as err:
        raise DataError(f"{args.file}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{args.file}: not UTF-8 text (byte {err.start})") from None
    print(len(ids) if args.count else " ".join(map(str, ids)))
    return 0


TOKENIZER_ENCODE = Verb(
    "tokenizer encode",
    "Print the token ids of a text.",
    tokenizer_encode_options, cmd_tokenizer_encode,
    examples="""examples:
  lmspec tokenizer encode ../shared/data/gpt2-tokenizer "Hello, world."
  lmspec tokenizer encode tok.json --file ../shared/data/the-verdict.txt --count""",
)


def tokenizer_decode_options(p) -> None:
    """`lmspec tokenizer decode`'s options."""
    p.add_argument("tokenizer")
    p.add_argument("ids", nargs="+")


def cmd_tokenizer_decode(args) -> int:
    try:
        ids = [int(i) for i in " ".join(args.ids).replace(",", " ").split()]
    except ValueError:
        raise UsageError("token ids must be integers") from None
    tok = _load(args.tokenizer)
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise TokenizerError(f"token id {bad[0]} is outside the vocabulary of {tok.vocab_size:,}")
    sys.stdout.write(tok.decode(ids) + "\n")
    return 0


TOKENIZER_DECODE = Verb(
    "tokenizer decode",
    "Print the text of token ids.",
    tokenizer_decode_options, cmd_tokenizer_decode,
    examples="""examples:
  lmspec tokenizer decode ../shared/data/gpt2-tokenizer 15496 11 995 13""",
)
