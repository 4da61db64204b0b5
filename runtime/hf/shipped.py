"""The Hugging Face families lmspec ships: the TOML maps in runtime/hf/maps/, read once."""
from __future__ import annotations

import functools
from pathlib import Path

from lmspec.runtime.hf.families import Family
from lmspec.runtime.hf.map_file import load_map

MAPS = Path(__file__).with_name("maps")
# In this order `export hf` tries the families on a checkpoint that was not imported.
ORDER = ("gpt2", "llama", "qwen3", "qwen3_moe", "phi3", "granite", "starcoder2", "stablelm", "gemma", "olmo", "gemma3", "smollm3")


@functools.cache
def shipped_families() -> dict[str, Family]:
    """Family name -> family, in ORDER."""
    return {name: load_map(MAPS / f"{name}.toml") for name in ORDER}


def family_for_model_type(model_type: str) -> Family | None:
    return next((f for f in shipped_families().values() if model_type in f.model_types), None)


def shipped_model_types() -> list[str]:
    return [t for f in shipped_families().values() for t in f.model_types]
