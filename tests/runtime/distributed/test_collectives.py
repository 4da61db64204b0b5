"""Bucketed all-reduce: the same sums as one all-reduce per tensor, in far fewer collectives."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmspec.runtime.distributed.collectives import all_reduce_in_buckets


def _tensors(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    shapes = [(7, 5), (3,), (64, 64), (2, 3, 4), (1,), (512, 512), (300,)]  # 512 x 512: 1 MiB, reduced alone
    tensors = [torch.randn(s, generator=g) for s in shapes]
    tensors.insert(3, torch.randn(6, 4, generator=g).t())  # not contiguous: written back through copy_
    tensors.append(torch.randn(10, generator=g, dtype=torch.float64))  # another dtype: its own bucket
    return tensors


def _worker(rank: int, store_path: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        bucketed = _tensors(rank)
        views = list(bucketed)  # the same objects: the reduction must land in them
        calls = all_reduce_in_buckets(bucketed, None, divide_by=2, bucket_bytes=1024)
        reference = _tensors(rank)
        for t in reference:
            dist.all_reduce(t)
            t.div_(2)
        results[rank] = (calls, [t.clone() for t in views], reference)
    finally:
        dist.destroy_process_group()


def test_bucketed_all_reduce_equals_one_per_tensor(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    expected = [(a + b) / 2 for a, b in zip(_tensors(0), _tensors(1))]
    for rank in (0, 1):
        calls, bucketed, reference = results[rank]
        for got, ref, want in zip(bucketed, reference, expected):
            assert torch.equal(got, ref)  # bit for bit: each element is the same sum over the same ranks
            torch.testing.assert_close(got, want)
        # 1 KiB buckets: [7x5, 3], [64x64] (too big to share), [512x512] (in place), [the transposed
        # 6x4, 2x3x4, 1], [300] (would overflow the last), [float64 10]: 6 collectives for 9 tensors
        assert calls == 6
