"""lmspec's compiler: spec -> checked graph (no torch needed) -> torch.fx module."""
from .loader import check_file, load_spec, parse_override, parse_overrides

__all__ = ["check_file", "load_spec", "parse_override", "parse_overrides", "lower"]


def lower(graph, seed: int = 0):
    """Lower a checked graph to a torch.fx GraphModule (imports torch)."""
    from .lower import lower as _lower
    return _lower(graph, seed)
