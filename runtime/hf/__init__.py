"""Hugging Face model directories in and out: model families as TOML maps (data, not code), config
checks, name maps, safetensors streaming. May import: errors, atomic, data, checkpoint.

    families.py     what a family is: parameter names, config keys, spec templates (and template filling)
    map_file.py     a family read from a TOML map file, every mistake located (`--map`)
    maps/           the families lmspec ships, as maps: gpt2, llama (mistral, qwen2), qwen3, qwen3_moe, phi3,
                    granite, starcoder2, stablelm, gemma, olmo, gemma3, smollm3
    shipped.py      those maps, loaded once, found by model_type
    config.py       config.json read, checked against a family and a spec, and written for a spec
    expressions.py  the arithmetic of the tables' hyper-parameter expressions
    names.py        the name plan: the HF tensors (pieces, transposes) of each lmspec parameter
    streaming.py    safetensors read and written one tensor at a time
    directories.py  output directories written whole or not at all
    chat_files.py   the chat template in tokenizer_config.json / chat_template.jinja, read and written back
    convert.py      the steps: import_hf, export_hf, the spec emitted from config.json
"""
