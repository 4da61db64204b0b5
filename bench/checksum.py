"""What verifying a checkpoint's checksums costs on load: a ~1 GB checkpoint of a GPT-2-shaped model
(250 M fp32 parameters) saved with save_checkpoint, then loaded with and without the check, in turns.

Three loads, each timed both ways in the same process (the check switched off by replacing
store.verify_file and store.verified_while_read, which every reader calls, with no-ops; the readers
of model and RNG files hash in a thread beside the copy):
  - rebuild:  checkpoint.models.load_model, what `lmspec sample`, `export` and `eval` do (build, fill)
  - fill:     Checkpoint.load_model into a model already built: the file read alone, the harshest ratio
  - cold:     `fill` with the file dropped from the page cache first (posix_fadvise DONTNEED), as after a
              copy from elsewhere or a reboot: the disk read dominates, and the hash reads it for the load
Also the hash of the files alone (integrity.verify_file on each), and the save: save_checkpoint's time
and the part of it spent taking the checksums. Prints the median and the fastest of the rounds and
their ratios (verified / unverified), in wall time and in CPU time; record them in bench/RESULTS.md.
On a shared machine the loads that allocate a new model (rebuild) vary by several times from round to
round: use many rounds.

    python bench/checksum.py [--set layers=16 --set dim=1024] [--rounds 5] [--dir /tmp]
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its tokenize.py would shadow the
# standard library's `tokenize` (which torch imports): drop the folder.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SET = ["layers=16", "dim=1024", "heads=16", "dropout=0.0"]  # 252 M parameters, 1.0 GB in fp32


@contextmanager
def unverified():
    """Loads as they were before checksums: every reader goes through store.verify_file."""
    from contextlib import nullcontext

    import lmspec.runtime.checkpoint.store as store
    real = store.verify_file, store.verified_while_read
    store.verify_file, store.verified_while_read = (lambda path: None), (lambda path: nullcontext())
    try:
        yield
    finally:
        store.verify_file, store.verified_while_read = real


def drop_from_cache(step_dir: Path) -> None:
    for path in step_dir.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time, the work done,
    varies less than the wall time, which includes waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=None, metavar="NAME=VALUE")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: the system's temp dir)")
    args = p.parse_args()

    import torch

    from lmspec.compiler import load_spec, parse_overrides
    from lmspec.compiler.lower import lower
    from lmspec.compiler.rewrites import spec_record
    from lmspec.runtime.checkpoint import integrity
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.checkpoint.store import load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    overrides = parse_overrides(args.set or DEFAULT_SET)
    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"), overrides)
    model = lower(graph, seed=0)
    params = sum(p.numel() for p in model.parameters())

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        hashing = []
        real_checksums = integrity.checksums_of

        def measured_checksums(directory):
            start = time.perf_counter()
            found = real_checksums(directory)
            hashing.append(time.perf_counter() - start)
            return found

        import lmspec.runtime.checkpoint.store as store
        store.checksums_of = measured_checksums
        fields = dict(optimizer=None, rng={"torch_cpu": torch.get_rng_state()}, train_config={}, metrics={},
                      tokenizer='{"kind": "char", "chars": "ab"}', spec=spec_record(graph, overrides))
        saves = [timed(lambda: save_checkpoint(tmp, step=1, model=model, **fields))[0] for _ in range(2)]
        store.checksums_of = real_checksums
        step_dir = load_checkpoint(tmp).path
        size = sum(f.stat().st_size for f in step_dir.iterdir())

        def rebuild():
            load_model(tmp)

        def fill():
            load_checkpoint(tmp).load_model(model)

        def cold():
            drop_from_cache(step_dir)
            fill()

        rebuild(), fill()  # warm-up: page cache, allocator, lazy imports
        files = [f for f in step_dir.iterdir() if f.name != "meta.json"]
        hash_only = [timed(lambda: [integrity.verify_file(f) for f in files])[0] for _ in range(args.rounds)]
        results = {}
        for name, fn in (("rebuild", rebuild), ("fill", fill), ("cold", cold)):
            off, on = [], []
            for _ in range(args.rounds):  # in turns, so drift in the machine's load hits both alike
                with unverified():
                    off.append(timed(fn))
                on.append(timed(fn))
            results[name] = (off, on)

    print(f"checkpoint: {params / 1e6:.0f} M parameters, {size / 2**30:.2f} GiB; torch {torch.__version__}, "
          f"{args.rounds} rounds, medians")
    print(f"save: {statistics.median(saves):.3f} s, of which checksums {statistics.median(hashing):.3f} s "
          f"({statistics.median(hashing) / statistics.median(saves):.1%})")
    verify = statistics.median(hash_only)
    print(f"verifying the files alone: {verify:.3f} s ({size / verify / 1e9:.1f} GB/s)")
    print("load       unverified   verified   ratio (medians, wall) | fastest: unverified verified ratio | "
          "CPU time ratio | 1 + verify/unverified")
    for name, (off, on) in results.items():
        wall_off, wall_on = [t[0] for t in off], [t[0] for t in on]
        cpu_off, cpu_on = [t[1] for t in off], [t[1] for t in on]
        a, b = statistics.median(wall_off), statistics.median(wall_on)
        print(f"{name:<8} {a:>10.3f}s {b:>9.3f}s {b / a:>6.2f}x                | {min(wall_off):>18.3f}s "
              f"{min(wall_on):>7.3f}s {min(wall_on) / min(wall_off):>4.2f}x | "
              f"{statistics.median(cpu_on) / statistics.median(cpu_off):>13.2f}x | {1 + verify / a:>20.2f}x")

if __name__ == "__main__":
    main()
