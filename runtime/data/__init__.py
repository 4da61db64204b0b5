"""Text in: corpora read from files, cleaned and deduplicated, tokenizers trained and used, token
shards written and read, chat templates. May import: errors, atomic.

`lmspec data prepare` is prepare.py, which streams documents.py (reading the inputs) through
cleaning.py and dedupe.py and tallies what happened in report.py."""
