"""The training loss: chunked above a size, F.cross_entropy's numbers, and what it keeps for backward."""
import pytest
import torch
import torch.nn.functional as F

from lmspec.runtime.train.loss import next_token_loss


def _reference(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_chunked_loss_and_gradient_equal_cross_entropy(dtype, tolerance):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 37, 101, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 101, (3, 37), generator=gen)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    chunked = next_token_loss(a, targets, chunk_elements=1000)  # 9 rows a chunk: 13 chunks, the last short
    plain = _reference(b, targets)
    chunked.backward()
    plain.backward()
    assert chunked.dtype == torch.float32
    assert abs(chunked.item() - plain.item()) <= 1e-5 * plain.item()
    assert a.grad.dtype == dtype  # the gradient comes back in the logits' own dtype
    assert torch.equal(a.detach(), logits)  # the backward works on copies, also of fp32 logits
    assert (a.grad.float() - b.grad.float()).abs().max().item() <= tolerance * b.grad.float().abs().max().item()


def test_small_logits_take_cross_entropy_itself():
    logits = torch.randn(2, 8, 50, requires_grad=True)
    targets = torch.randint(0, 50, (2, 8))
    assert torch.equal(next_token_loss(logits, targets), _reference(logits, targets))


def _saved_bytes(loss_fn, logits, targets) -> int:
    """Bytes of the tensors autograd keeps for the loss's backward, beyond the logits themselves."""
    saved = {}

    def pack(t):
        if t.data_ptr() != logits.data_ptr():
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(logits, targets)
    return sum(saved.values())


def test_bf16_logits_keep_no_fp32_copy_of_the_vocabulary():
    logits = torch.randn(64, 4096, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 4096, (64,))
    whole = 64 * 4096 * 4  # one fp32 copy of the logits
    plain = _saved_bytes(_reference, logits, targets)
    chunked = _saved_bytes(lambda x, y: next_token_loss(x, y, chunk_elements=4096 * 8), logits, targets)
    assert plain >= whole  # log-softmax's fp32 output
    assert chunked < whole / 100  # one fp32 log-sum-exp per row, and the targets


def test_the_compiled_loss_equals_cross_entropy_and_keeps_no_fp32_copy():
    from lmspec.runtime.train.loss import compiled_next_token_loss

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 32, 4096, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 4096, (2, 32), generator=gen)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    compiled, plain = compiled_next_token_loss()(a, targets), _reference(b, targets)
    compiled.backward()
    plain.backward()
    assert compiled.dtype == torch.float32 and abs(compiled.item() - plain.item()) <= 1e-5 * plain.item()
    assert a.grad.dtype == torch.bfloat16
    assert (a.grad.float() - b.grad.float()).abs().max().item() <= 1e-2 * b.grad.float().abs().max().item()
    whole = 64 * 4096 * 4  # one fp32 copy of the logits
    # what it keeps: a max and a log-sum-exp per row (fp32), the targets and the logits themselves
    assert 0 < _saved_bytes(compiled_next_token_loss(), logits.clone().requires_grad_(), targets) < whole / 100
