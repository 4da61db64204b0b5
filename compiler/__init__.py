"""lmspec's compiler: spec -> checked graph (no torch needed) -> torch.fx module.

`lmspec.compiler.lower.lower(graph)` lowers a graph (it imports torch, so it is not imported here:
checking a spec stays fast). It is not re-exported under the package either, since importing the
submodule `lmspec.compiler.lower` would then replace that name with the module.
"""
from .loader import check_file, load_spec, parse_override, parse_overrides

__all__ = ["check_file", "load_spec", "parse_override", "parse_overrides"]
