"""Text in: corpora read from files, cleaned and deduplicated, tokenizers trained and used, token
shards written and read, chat templates. May import: errors, atomic."""
