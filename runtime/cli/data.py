"""`lmspec data prepare|tokenize` and `lmspec tokenizer train|encode|decode`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.data.tokenizer import TokenizerError
from lmspec.runtime.errors import UsageError

USER_ERRORS = (DataError, TokenizerError)


def _fail(verb: str, err: Exception) -> int:
    print(f"lmspec {verb}: error: {err}", file=sys.stderr)
    return 1


def _documents(sources: list[str]):
    """The texts of a prepared corpus directory, or of text files and directories (one file, one document)."""
    from lmspec.runtime.data.corpus import read_text_data
    from lmspec.runtime.data.prepare import DOCUMENTS_FILE, iter_documents
    if len(sources) == 1 and (Path(sources[0]) / DOCUMENTS_FILE).is_file():
        return iter_documents(sources[0])
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise DataError(f"{path}: holds neither {DOCUMENTS_FILE} nor .txt files")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return (read_text_data(f) for f in files)


def cmd_data_prepare(args) -> int:
    from lmspec.runtime.data.prepare import format_report, prepare
    try:
        report = prepare(args.inputs, args.out, text_field=args.text_field, min_chars=args.min_chars,
                         max_chars=args.max_chars, near_dup_threshold=args.near_dup_threshold,
                         shingle=args.shingle, dedup_near=not args.no_near_dup, progress=not args.no_progress)
    except USER_ERRORS as err:
        return _fail("data prepare", err)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_data_tokenize(args) -> int:
    from lmspec.runtime.data.shards import write_shards
    from lmspec.runtime.data.tokenizer import FileTokenizer
    try:
        tokenizer = FileTokenizer.from_path(args.tokenizer)
        meta = write_shards(_documents(args.sources), tokenizer, args.out, val_fraction=args.val_fraction,
                            shard_tokens=args.shard_tokens, overwrite=args.overwrite, progress=not args.no_progress)
    except USER_ERRORS as err:
        return _fail("data tokenize", err)
    splits = ", ".join(f"{name}: {info['tokens']:,} tokens in {info['documents']:,} documents"
                       for name, info in meta["splits"].items())
    print(f"wrote {args.out} ({meta['dtype']}): {splits}")
    return 0


def cmd_tokenizer_train(args) -> int:
    from lmspec.runtime.data.tokenizer_training import DEFAULT_SPECIAL_TOKENS, train_bpe
    specials = list(DEFAULT_SPECIAL_TOKENS) + [s for s in args.special if s not in DEFAULT_SPECIAL_TOKENS]
    try:
        tok = train_bpe(_documents(args.corpus), args.vocab_size, args.out, special_tokens=specials,
                        min_frequency=args.min_frequency, progress=not args.no_progress)
    except USER_ERRORS as err:
        return _fail("tokenizer train", err)
    ids = {s: tok.tokenizer.token_to_id(s) for s in specials}
    print(f"wrote {args.out}: {tok.vocab_size:,} tokens; special: "
          + ", ".join(f"{s}={i}" for s, i in ids.items()))
    return 0


def _load(path: str):
    from lmspec.runtime.data.tokenizer import FileTokenizer
    return FileTokenizer.from_path(path)


def cmd_tokenizer_encode(args) -> int:
    if (args.text is None) == (args.file is None):
        raise UsageError("give the text to encode or --file, not both")
    try:
        tok = _load(args.tokenizer)
        text = args.text if args.text is not None else Path(args.file).read_text(encoding="utf-8")
        ids = tok.encode(text)
    except OSError as err:
        return _fail("tokenizer encode", f"{args.file}: {err.strerror}")
    except UnicodeDecodeError as err:
        return _fail("tokenizer encode", f"{args.file}: not UTF-8 text (byte {err.start})")
    except USER_ERRORS as err:
        return _fail("tokenizer encode", err)
    print(len(ids) if args.count else " ".join(map(str, ids)))
    return 0


def cmd_tokenizer_decode(args) -> int:
    try:
        ids = [int(i) for i in " ".join(args.ids).replace(",", " ").split()]
    except ValueError:
        raise UsageError("token ids must be integers") from None
    try:
        tok = _load(args.tokenizer)
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary of {tok.vocab_size:,}")
        sys.stdout.write(tok.decode(ids) + "\n")
    except USER_ERRORS as err:
        return _fail("tokenizer decode", err)
    return 0
