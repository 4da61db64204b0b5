"""Tensor and pipeline parallelism on CPU: TP=2 and PP=2 (1F1B, GPipe) against one process, step time
and the bytes each rank sends per step, measured and as `lmspec plan`'s model predicts them.

One training step (forward + backward + AdamW step, as `lmspec train` makes the optimizer) of the same
model on the same global batch, in fresh processes (torch.multiprocessing, gloo over the loopback)
with ONE CPU thread per process: the single-process baseline has 1 thread too, so the 2-rank layouts
use 2 cores where it uses 1 (the ratio says whether splitting the model pays on CPU); a 1-process,
2-thread run is shown as the other way to use the same cores. Tensor parallelism runs DTensor
(runtime/distributed/tensor_parallel.py; both ranks see the whole batch), pipeline parallelism
torch.distributed.pipelining over `--micro-batches` slices of it (runtime/distributed/pipeline.py).
Step time: per step the slower rank's wall time, median over `--steps` after `--warmup`; layouts take
turns, `--rounds` times, and the median of the rounds is shown. Each round first measures how many
cores' worth of work two concurrent 1-thread processes get (a shared or hyperthreaded 2-vCPU machine
gives well under 2, which caps what any 2-rank layout can gain).

Communication is counted, not assumed: one more step runs under a TorchDispatchMode that sees every
c10d op (dist.all_reduce, broadcast, send/recv, what batch_isend_irecv issues) and every functional
collective DTensor issues (it steps aside for DTensor arguments, as CommDebugMode does, so the
collectives DTensor desugars into are seen). Bytes *sent* per rank follow the ring accounting that
compiler/plan.py uses: all-reduce of S bytes 2(n-1)/n x S, all-gather (n-1) x its input,
reduce-scatter (n-1)/n x its input, send S, broadcast (n-1) x S from the root. The prediction is
`make_plan(...).grid`'s layout with the same tp / pp, micro-batch and global batch (fp32): its
`comm["tp"] + comm["pp"]`, bytes the busiest GPU sends per step.

    python bench/parallel.py [--layers 4 --dim 256 --batch 8 --seq 128 --micro-batches 4 --steps 10]
"""
from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "tiny.arch"
WORLD = 2
# name: (processes, threads per process, kind, schedule)
LAYOUTS = {
    "1 process, 1 thread": (1, 1, "one", None),
    "1 process, 2 threads": (1, 2, "one", None),
    "TP=2": (2, 1, "tp", None),
    "PP=2, 1F1B": (2, 1, "pp", "1f1b"),
    "PP=2, GPipe": (2, 1, "pp", "gpipe"),
}
BASELINE = "1 process, 1 thread"


def _overrides(args) -> dict:
    return {"layers": args.layers, "dim": args.dim, "heads": args.heads or max(2, args.dim // 32),
            "context": args.seq, "dropout": 0.0}


def _graph(args):
    from lmspec.compiler.loader import load_spec
    return load_spec(str(SPEC), _overrides(args))


# ------------------------------------------------------------------------------ counting the bytes

def _comm_counter(world: int):
    """A TorchDispatchMode that adds up, per collective / p2p op, the calls and the bytes this rank sends."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    def nbytes(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(nbytes(t) for t in x)
        return 0

    def group_rank(pg) -> int:
        try:
            return pg.rank()
        except Exception:  # noqa: BLE001 - a ScriptObject without rank(): the world is the group
            return torch.distributed.get_rank()

    n = world
    ring_ar, ring_rs = 2 * (n - 1) / n, (n - 1) / n
    rules = {  # op name -> bytes this rank sends, from the op's arguments
        ("_c10d_functional", "all_reduce"): lambda a: ring_ar * nbytes(a[0]),
        ("_c10d_functional", "all_reduce_"): lambda a: ring_ar * nbytes(a[0]),
        ("_c10d_functional", "all_reduce_coalesced"): lambda a: ring_ar * nbytes(a[0]),
        ("_c10d_functional", "all_gather_into_tensor"): lambda a: (n - 1) * nbytes(a[0]),
        ("_c10d_functional", "all_gather_into_tensor_coalesced"): lambda a: (n - 1) * nbytes(a[0]),
        ("_c10d_functional", "reduce_scatter_tensor"): lambda a: ring_rs * nbytes(a[0]),
        ("_c10d_functional", "reduce_scatter_tensor_coalesced"): lambda a: ring_rs * nbytes(a[0]),
        ("_c10d_functional", "all_to_all_single"): lambda a: ring_rs * nbytes(a[0]),
        ("_c10d_functional", "broadcast"): lambda a: (n - 1) * nbytes(a[0]) * (a[1] == torch.distributed.get_rank()),
        ("c10d", "allreduce_"): lambda a: ring_ar * nbytes(a[0]),
        ("c10d", "allreduce_coalesced_"): lambda a: ring_ar * nbytes(a[0]),
        ("c10d", "broadcast_"): lambda a: (n - 1) * nbytes(a[0]) * (a[2] == group_rank(a[1])),
        ("c10d", "allgather_"): lambda a: (n - 1) * nbytes(a[1]),
        ("c10d", "_allgather_base_"): lambda a: (n - 1) * nbytes(a[1]),
        ("c10d", "allgather_into_tensor_coalesced_"): lambda a: (n - 1) * nbytes(a[1]),
        ("c10d", "reduce_scatter_"): lambda a: ring_rs * nbytes(a[1]),
        ("c10d", "_reduce_scatter_base_"): lambda a: ring_rs * nbytes(a[1]),
        ("c10d", "reduce_scatter_tensor_coalesced_"): lambda a: ring_rs * nbytes(a[1]),
        ("c10d", "alltoall_base_"): lambda a: ring_rs * nbytes(a[1]),
        ("c10d", "send"): lambda a: nbytes(a[0]),
        ("c10d", "recv_"): lambda a: 0,
        ("c10d", "recv_any_source_"): lambda a: 0,
        ("c10d", "gather_"): lambda a: nbytes(a[1]),
        ("c10d", "scatter_"): lambda a: ring_rs * nbytes(a[1]),
        ("c10d", "reduce_"): lambda a: nbytes(a[0]),
    }

    class CommCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: Counter = Counter()
            self.sent: Counter = Counter()
            self.unknown: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if isinstance(func, torch._ops.HigherOrderOperator):
                return func(*args, **(kwargs or {}))
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented  # let DTensor run and desugar into the collectives counted below
            name = func.overloadpacket.__name__
            key = (func.namespace, name)
            if key in rules:
                self.calls[name] += 1
                self.sent[name] += rules[key](args)
            elif func.namespace in ("c10d", "_c10d_functional") and name not in ("wait_tensor", "barrier",
                                                                                 "_wrap_tensor_autograd"):
                self.unknown.add(f"{func.namespace}.{name}")
            return func(*args, **(kwargs or {}))

    return CommCounter()


# ------------------------------------------------------------------------------ one layout, one rank

def _worker(rank: int, world: int, kind: str, schedule: str | None, threads: int, args, tmp: str) -> None:
    import time

    import torch
    import torch.distributed as dist

    from lmspec.compiler.lower import lower
    from lmspec.runtime.train.config import TrainConfig
    from lmspec.runtime.train.steps import make_optimizer, training_loss as _loss

    torch.set_num_threads(threads)
    graph = _graph(args)
    model = lower(graph, seed=0)
    cfg = TrainConfig()
    vocab = graph.params["wte.weight"].shape[0]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    if kind == "tp":
        from lmspec.compiler.tensor_parallel import tensor_parallel_plan
        from lmspec.runtime.distributed.tensor_parallel import apply_tensor_parallel, tensor_parallel_mesh
        apply_tensor_parallel(model, tensor_parallel_plan(graph, world), tensor_parallel_mesh(world, "cpu"))
    if kind == "pp":
        from lmspec.compiler.pipeline_stages import pipeline_stages
        from lmspec.runtime.distributed.pipeline import build_pipeline
        pipe = build_pipeline(model, graph, pipeline_stages(graph, world, seq=args.seq), rank, world,
                              n_microbatches=args.micro_batches, schedule=schedule, loss_fn=_loss)
        del model
        model = pipe.module
    optimizer = make_optimizer(model, cfg)

    def batch(i: int):
        gen = torch.Generator().manual_seed(1000 + i)  # the same batches on every rank and in every layout
        tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]

    def step(i: int) -> float:
        x, y = batch(i)
        optimizer.zero_grad(set_to_none=True)
        if kind == "pp":
            loss = pipe.step(x, y)
        else:
            out = _loss(model(x), y)
            out.backward()
            loss = out.item()
        optimizer.step()
        return loss

    if world > 1:
        dist.barrier()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    counter = _comm_counter(world)
    with counter:  # one more step, not timed, with every collective and p2p op counted
        losses.append(step(args.warmup + args.steps))
    if world > 1:
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step lasts as long as its slower rank
        times = slowest.tolist()
        dist.destroy_process_group()
    torch.save({"times": times, "losses": losses, "calls": dict(counter.calls), "sent": dict(counter.sent),
                "unknown": sorted(counter.unknown)}, f"{tmp}/rank{rank}.pt")


def _burn(rank: int, tmp: str) -> None:
    """A fixed amount of 1-thread matrix products, timed (how much two processes get done at once)."""
    import time

    import torch
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    a @ a
    t0 = time.perf_counter()
    for _ in range(150):
        a @ a
    Path(f"{tmp}/burn{rank}").write_text(str(time.perf_counter() - t0))


def cores(procs: int = WORLD) -> float:
    """How many cores' worth of work `procs` concurrent 1-thread processes do (2.0: two free cores;
    nearer 1 when the cores are shared with other jobs or are one core's hyperthreads)."""
    import torch.multiprocessing as mp
    os.environ["OMP_NUM_THREADS"] = "1"
    times = {}
    for n in (1, procs):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_burn, args=(tmp,), nprocs=n, join=True)
            times[n] = max(float(Path(f"{tmp}/burn{r}").read_text()) for r in range(n))
    return procs * times[1] / times[procs]


def run(args, name: str) -> dict:
    import torch
    import torch.multiprocessing as mp

    procs, threads, kind, schedule = LAYOUTS[name]
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the spawned processes inherit it
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(procs, kind, schedule, threads, args, tmp), nprocs=procs, join=True)
        ranks = [torch.load(f"{tmp}/rank{r}.pt") for r in range(procs)]
    return {"time": statistics.median(ranks[0]["times"]), "losses": ranks[0]["losses"],
            "sent": [sum(r["sent"].values()) for r in ranks],
            "calls": [r["calls"] for r in ranks], "by_op": [r["sent"] for r in ranks],
            "unknown": sorted({u for r in ranks for u in r["unknown"]})}


# ------------------------------------------------------------------------------ the model's prediction

def predicted(args, graph, name: str) -> float | None:
    """Bytes the busiest GPU sends per step in `lmspec plan`'s 3-D layout model (fp32, no checkpointing)."""
    from lmspec.compiler.plan import make_plan
    procs, _, kind, schedule = LAYOUTS[name]
    if procs == 1:
        return 0.0
    tp, pp = (WORLD, 1) if kind == "tp" else (1, WORLD)
    micro = args.batch if kind == "tp" else args.batch // args.micro_batches
    plan = make_plan(graph, gpus=WORLD, seq=args.seq, micro_batch=micro, global_batch=args.batch,
                     schedule=schedule or "1f1b", strategies=("ddp",), checkpointing=(False,))
    found = [x for x in plan.grid.layouts if (x.dp, x.tp, x.pp) == (1, tp, pp)]
    return found[0].comm["tp"] + found[0].comm["pp"] if found else None


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=None, help="default: dim / 32")
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (also the context)")
    ap.add_argument("--micro-batches", type=int, default=4, help="pipeline micro-batches per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.batch % args.micro_batches:
        ap.error(f"--batch {args.batch} does not split into {args.micro_batches} micro-batches")

    graph = _graph(args)
    from lmspec.compiler.analysis import parameter_count
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    capacity = []
    for _ in range(args.rounds):
        capacity.append(cores())
        for name in LAYOUTS:
            results[name].append(run(args, name))

    o = _overrides(args)
    print(f"machine: {os.cpu_count()} CPUs, torch gloo; model: specs/tiny.arch (GPT-2 style, tied head), "
          f"{o['layers']} layers, dim {o['dim']}, {o['heads']} heads, vocab {graph.params['wte.weight'].shape[0]}, "
          f"{parameter_count(graph) / 1e6:.2f}M parameters, fp32")
    print(f"cores: 2 concurrent 1-thread processes did {', '.join(f'{c:.2f}' for c in capacity)} x the matmul work "
          f"of one (per round; 2.00 = two free cores)")
    print(f"global batch {args.batch} x {args.seq} tokens per step, {args.micro_batches} micro-batches for PP; "
          f"median of {args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds; "
          f"1 thread per process unless said")
    base = statistics.median(r["time"] for r in results[BASELINE])
    header = f"{'layout':22s} {'step ms':>8s} {'vs 1 proc':>9s} {'MB sent/step/rank':>19s} {'plan predicts':>13s}"
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        t = statistics.median(r["time"] for r in runs)
        sent = runs[-1]["sent"]
        measured = "/".join(_mb(s) for s in sent) if len(set(round(s) for s in sent)) > 1 else _mb(sent[0])
        pred = predicted(args, graph, name)
        print(f"{name:22s} {1e3 * t:8.0f} {base / t:8.2f}x {measured:>19s} {_mb(pred) if pred is not None else '-':>13s}")
    print("what was sent, per rank (calls x op: MB sent), one step:")
    for name, runs in results.items():
        last = runs[-1]
        if not any(last["calls"]):
            continue
        for rank, (calls, by_op) in enumerate(zip(last["calls"], last["by_op"])):
            parts = ", ".join(f"{calls[op]} x {op}: {_mb(by_op[op])}" for op in sorted(calls, key=lambda k: -by_op[k]))
            print(f"  {name}, rank {rank}: {parts}")
        if last["unknown"]:
            print(f"  {name}: uncounted ops seen: {', '.join(last['unknown'])}")
    ref = results[BASELINE][-1]["losses"]
    drift = {name: max(abs(a - b) for a, b in zip(runs[-1]["losses"], ref)) for name, runs in results.items()}
    print(f"same training: largest loss difference to 1 process over {len(ref)} steps: "
          + "; ".join(f"{name}: {d:.1e}" for name, d in drift.items() if name != BASELINE))


if __name__ == "__main__":
    main()
