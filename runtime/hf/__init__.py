"""Hugging Face model directories in and out: model families as tables (data, not code), config
checks, name maps, safetensors streaming. May import: errors, atomic, data, checkpoint.

    families.py     the tables: parameter names, config keys, spec templates, per family
    config.py       config.json read, checked against a family and a spec, and written for a spec
    expressions.py  the arithmetic of the tables' hyper-parameter expressions
    names.py        the name plan: the HF tensors (pieces, transposes) of each lmspec parameter
    streaming.py    safetensors read and written one tensor at a time
    directories.py  output directories written whole or not at all
    chat_files.py   the chat template in tokenizer_config.json / chat_template.jinja, read and written back
    convert.py      the steps: import_hf, export_hf, the spec emitted from config.json
"""
