"""Text in: corpora read from files, cleaned and deduplicated, tokenizers trained and used, token
shards written and read, chat templates. May import: errors, atomic.

`lmspec data prepare` is prepare.py, which streams documents.py (finding the inputs; formats.py reads
each: text, JSON Lines, JSON, gzip, zstd, Parquet, datasets) through cleaning.py and dedupe.py and
tallies what happened in report.py; `lmspec data tokenize` streams the same documents into shards.py."""
