"""Whether a training run has diverged: a loss, a gradient norm or a validation loss that is not finite,
said in the same words by every training loop, before the weights it spoiled are checkpointed."""
from __future__ import annotations

import math


def divergence(step: int, loss: float | None = None, grad_norm: float | None = None,
               val_loss: float | None = None, scaled: bool = False, evaluated: str = "validation loss") -> str | None:
    """Why step `step`'s numbers show the run going wrong, or None. A gradient norm that is not finite
    spoils the weights its update writes, unless a GradScaler (`scaled`: fp16) skips that update and
    lowers its scale, as it does by design. `evaluated` names what `val_loss` is."""
    if loss is not None and not math.isfinite(loss):
        return f"the loss became {loss} at step {step}"
    if grad_norm is not None and not scaled and not math.isfinite(grad_norm):
        return f"the gradient norm became {grad_norm} at step {step}, so its update left weights that are not finite"
    if val_loss is not None and not math.isfinite(val_loss):
        return f"the {evaluated} became {val_loss} at step {step}: the weights are no longer finite"
    return None
