"""The GPU tests are a package so that their conftest is imported as `gpu.conftest`: a second
top-level `conftest` module would shadow tests/runtime/conftest.py, which the runtime tests import
by that name, whenever pytest loads both before collecting (`pytest tests/runtime/x.py tests/gpu`)."""
