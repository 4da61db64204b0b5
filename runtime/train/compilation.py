"""`--compile`: torch.compile, with a compiler that cannot run where the model trains (no C++
compiler for the CPU, a broken Triton for the GPU) reported as one line rather than an internal error."""
from __future__ import annotations

import torch

from lmspec.runtime.errors import TrainingError


def compiled(fn):
    """torch.compile(fn), called through a function that names the compiler's failure. It surfaces at
    the first call of each new shape (torch.compile compiles lazily), so a run stops at its first
    step, or at a validation, with its last checkpoint as it was."""
    from torch._dynamo.exc import BackendCompilerFailed

    graph = torch.compile(fn)

    def run(*args, **kwargs):
        try:
            return graph(*args, **kwargs)
        except BackendCompilerFailed as err:
            reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise TrainingError(f"--compile: torch.compile cannot compile the model here ({reason}); "
                                f"train without --compile") from None

    return run
