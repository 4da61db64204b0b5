"""Collectives over many tensors at once: one all-reduce per bucket, not one per tensor.

A model has hundreds of parameters, most of them small (biases, norms); reducing each gradient on its
own pays a collective's fixed cost hundreds of times per step. Flattening the small ones into buckets
(DDP's remedy) pays it a handful of times, and leaves every sum unchanged: each element is still summed
over the same ranks. Large gradients are reduced in place, which saves copying them in and out.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket_cap_mb
ALONE_BYTES = 2 ** 20  # gradients this large are all-reduced where they are, unbucketed


@torch.no_grad()
def all_reduce_in_buckets(tensors: Iterable[torch.Tensor], group, divide_by: int = 1,
                          bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum every tensor in place over `group` (then divide by `divide_by`: the mean of replicas).
    Returns how many collectives it took."""
    calls = 0
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket]) if len(bucket) > 1 else bucket[0].reshape(-1)
        dist.all_reduce(flat, group=group)
        if divide_by != 1:
            flat.div_(divide_by)
        if len(bucket) > 1 or flat.data_ptr() != bucket[0].data_ptr():
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view_as(t))
        calls += 1
    return calls


def _buckets(tensors: Iterable[torch.Tensor], bucket_bytes: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of tensors sharing dtype and device, each run cut at about bucket_bytes. A
    tensor of ALONE_BYTES or more is reduced by itself, in place: its collective's fixed cost is
    small beside its transfer, and copying it into a bucket and back would cost more than it saves."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if t.numel() * t.element_size() >= ALONE_BYTES and t.is_contiguous():
            yield [t]
            continue
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device
                       or size + t.numel() * t.element_size() > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket
