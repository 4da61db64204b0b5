"""Next-token cross-entropy that never holds fp32 logits for the whole vocabulary twice.

`F.cross_entropy(logits.float(), …)` keeps an fp32 copy of the logits and its log-softmax (another
fp32 [tokens, vocab]) for the backward pass, and the backward makes a third: for GPT-2 at 16 x 1024
tokens that is 3.3 GB each. Above CHUNK_ELEMENTS logits, this loss works through the rows in chunks
instead: the forward keeps only the logits as the model made them (bf16 under autocast) and one fp32
log-sum-exp per row; the backward recomputes each chunk's softmax in fp32 and writes the gradient
in the logits' own dtype. At or below the threshold it is F.cross_entropy itself, so small models
(every CPU run of the tests) compute exactly what they always did.

A `--compile` run trains with `compiled_next_token_loss()` instead: the same cross-entropy compiled, so
that Inductor fuses the cast to fp32, the log-sum-exp and the target's pick into one pass over the
logits, and the backward into one more. It keeps what the chunked loss keeps (the logits and one fp32
number per row) without the chunked loop's eight eager passes per chunk: on a GPU those are memory
traffic that the step waits for (bench/cross_entropy.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 25  # 32 Mi logits: 128 MB of fp32 per chunk
_compiled_loss = None


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of logits [..., vocab] against targets [...] (every target counts)."""
    flat, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if flat.numel() <= chunk_elements:
        return _cross_entropy(flat, flat_targets)
    rows = max(1, chunk_elements // flat.size(-1))
    return _ChunkedCrossEntropy.apply(flat, flat_targets, rows)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def compiled_next_token_loss():
    """next_token_loss as one compiled function (made once per process; torch.compile caches its
    graphs per shape)."""
    from lmspec.runtime.train.compilation import compiled

    global _compiled_loss
    if _compiled_loss is None:
        _compiled_loss = compiled(_cross_entropy)
    return _compiled_loss


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        n = logits.size(0)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, n, rows):
            part = logits[start:start + rows].float()
            lse[start:start + rows] = torch.logsumexp(part, dim=-1)
            picked = part.gather(1, targets[start:start + rows, None]).squeeze(1)
            total += (lse[start:start + rows] - picked).sum()
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        n, rows = logits.size(0), ctx.rows
        grad = torch.empty_like(logits)
        scale = grad_output.float() / n
        for start in range(0, n, rows):
            # in place on the chunk's one fp32 copy (a copy also of fp32 logits, which autograd keeps): the
            # same operations as exp(x - lse) * scale, without a new [rows, vocab] tensor for each
            probs = logits[start:start + rows].to(torch.float32, copy=True).sub_(lse[start:start + rows, None]).exp_()
            probs.scatter_add_(1, targets[start:start + rows, None],
                               torch.full_like(probs[:, :1], -1.0))  # softmax - one-hot
            grad[start:start + rows] = probs.mul_(scale)
        return grad, None, None
