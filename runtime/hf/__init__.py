"""Hugging Face model directories in and out: model families as tables (data, not code), config
checks, name maps, safetensors streaming. May import: errors, atomic, data, checkpoint."""
