"""The GPU tests are a package: they import their helpers relatively (`from .gpu_helpers import ...`),
and their conftest is imported as `gpu.conftest`, apart from the top-level `conftest` modules of the
runtime folders (which no test imports by name: what the runtime tests share is in runtime_helpers.py)."""
