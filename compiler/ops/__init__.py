"""Importing this package registers every op (see compiler/registry.py)."""
from . import attention, core, layers, moe  # noqa: F401
