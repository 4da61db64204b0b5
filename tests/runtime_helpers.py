"""What the runtime tests (tests/runtime/<stage>/) import from one another: where the repository and
the shared data are, the real `lmspec` command line in a subprocess, a tiny base model and a spam
classifier finetuned from it, the two specs the parallel tests split, a spec whose layers differ, and a
running `lmspec serve`.

tests/ is on pytest's pythonpath (pyproject.toml), so every test imports this module by this one name,
whichever folder it sits in and whichever tests run before it. Fixtures are in conftest.py files
(tests/runtime/conftest.py for those the stage folders share), never imported by name."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent  # the repository: the CLI runs from here (specs/tiny.arch, tests/broken_specs/...)
# The shared data folder sits beside the repository: <repo>/../shared/data.
SHARED_DATA = ROOT.parent / "shared" / "data"
VERDICT = SHARED_DATA / "the-verdict.txt"
SMS = SHARED_DATA / "SMSSpamCollection.tsv"

# tiny.arch cut down further: a base that trains and finetunes in seconds
TINY_BASE_SETTINGS = ("--set", "layers=2", "--set", "dim=32", "--set", "heads=2", "--set", "context=32")
SMALL = list(TINY_BASE_SETTINGS)  # the same, as the `lmspec train` tests spell it


def lmspec_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real `lmspec` command line in a subprocess, from the repository unless `cwd` is given."""
    return subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)


def lmspec_main(*args) -> subprocess.CompletedProcess:
    """`lmspec ARGS` through the command line's main() in this process, from the repository: what
    lmspec_cli() returns (exit code, stdout, stderr) without an interpreter to start (2 s with torch).
    For tests of what a command says and writes; a test of the process itself (its exit at a signal,
    what it imports, its environment) starts one with lmspec_cli()."""
    import contextlib
    import io

    from lmspec.runtime.cli.main import main

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        finally:  # --threads N is the command's, not the rest of the tests'
            if threads is not None:
                torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["lmspec", *map(str, args)], code, out.getvalue(), err.getvalue())


def losses(run: Path) -> dict[int, float]:
    """A run's training loss by step, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def train_tiny_base(run: Path) -> Path:
    """A tiny character-level model, barely trained (3 steps on the-verdict): a base to finetune."""
    from lmspec.runtime.cli.main import main
    assert main(["train", "specs/tiny.arch", *TINY_BASE_SETTINGS, "--data", str(VERDICT),
                 "--steps", "3", "--no-progress", "--sample-tokens", "0", "--out", str(run)]) == 0
    return run


def train_bpe_lm(root: Path, context: int, steps: int = 3, eval_batches: int = 1, *extra: str) -> tuple[Path, Path]:
    """A byte-level BPE of 300 tokens (root/tok.json) and a 2-layer, 32-wide language model trained
    `steps` steps with it on the-verdict (root/lm): (tokenizer, run). Skips without the shared data."""
    import pytest

    from lmspec.runtime.cli.main import main
    from lmspec.runtime.data.tokenizer_training import train_bpe
    if not VERDICT.is_file():
        pytest.skip(f"shared data not found at {VERDICT}")
    tok, run = root / "tok.json", root / "lm"
    train_bpe(iter([VERDICT.read_text(encoding="utf-8")]), 300, tok)
    assert main(["train", "specs/tiny.arch", "--set", "layers=2", "--set", "dim=32", "--set", "heads=2",
                 "--set", f"context={context}", "--data", str(VERDICT), "--tokenizer", str(tok), "--steps", str(steps),
                 "--batch", "4", "--eval-batches", str(eval_batches), "--no-progress", "--sample-tokens", "0",
                 *extra, "--out", str(run)]) == 0
    return tok, run


def adapters_only_checkpoint(out: Path, base_run: Path) -> dict:
    """A LoRA run's checkpoint holds the adapters alone and names its base's checkpoint: its meta.json."""
    from safetensors.torch import load_file
    step = next((out / "checkpoints").glob("step_*"))
    saved = load_file(step / "model.safetensors")
    assert saved and all(name.endswith((".lora_a", ".lora_b")) for name in saved)
    meta = json.loads((step / "meta.json").read_text())
    assert meta["spec"]["base"]["checkpoint"] == str(next((base_run / "checkpoints").glob("step_*")).resolve())
    return meta


def a_past_peak() -> int:
    """This process's peak resident memory in bytes after it has held, and freed, 512 MiB more than
    now: a peak from before a run, which the run's own peak must not include."""
    import resource

    spent = bytearray(512 * 2 ** 20)
    spent[::4096] = b"x" * len(spent[::4096])  # touched, so resident
    del spent
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def finetune_spam(base: Path, out: Path, *extra: str, max_length: int = 24) -> int:
    """`lmspec finetune classify` on 48 balanced SMS texts, one epoch: its exit code."""
    from lmspec.runtime.cli.main import main
    return main(["finetune", "classify", str(base), "--data", str(SMS), "--labels", "ham,spam", "--balance",
                 "--limit", "48", "--epochs", "1", "--max-length", str(max_length), "--no-progress",
                 "--out", str(out), *extra])


# The specs the tensor-parallel and materialise tests split over 2 ranks: a GPT-2-style one (tied head,
# biases, learned positions) and a Llama/Qwen3-style one (RMSNorm, GQA, RoPE, QK-norm, SwiGLU, untied head).
LLAMA = """
model llama_tiny {
  vocab = 96; context = 32; dim = 64; layers = 2; heads = 4; kv_heads = 2; ffn = 96; eps = 1e-5

  input tokens: i64[batch, seq <= context]

  x = embedding(tokens, vocab, dim) as embed
  repeat layers as block {
    x = x + attention(rmsnorm(x, eps) as attn_norm, heads, kv_heads=kv_heads, bias=false, rope=true,
                      qk_norm=true) as attn
    x = x + mlp(rmsnorm(x, eps) as mlp_norm, ffn, act=silu, gated=true, bias=false) as mlp
  }
  logits = linear(rmsnorm(x, eps) as norm, vocab, bias=false) as lm_head
  output logits: f32[batch, seq, vocab]
}
"""
GPT = ("specs/tiny.arch", {"layers": 2, "dim": 64, "heads": 4, "context": 32})


@contextmanager
def running_server(*args, log_dir: Path):
    """`lmspec serve ... --port 0` in a subprocess; yields (base URL, process, stderr path) once it answers."""
    import httpx  # the serve tests' client: only they need it

    out, err = log_dir / "stdout.log", log_dir / "stderr.log"
    with open(out, "w") as out_file, open(err, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "lmspec.runtime.cli.main", "serve", *map(str, args), "--port", "0"],
                                cwd=ROOT, stdout=out_file, stderr=err_file)
    try:
        deadline = time.monotonic() + 60
        # It prints its URL once its socket listens; connections made before uvicorn runs wait for it.
        while not (found := re.search(r"at (http://\S+)/v1", out.read_text())):
            assert proc.poll() is None, f"the server exited: {err.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start: {err.read_text()}"
            time.sleep(0.1)
        url = found.group(1)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        yield url, proc, err
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


# Layers that differ (`repeat … as block, i`): a sliding window of 3 in the even layers, none in the odd
# ones, a RoPE base per parity of the layer, QK-norm in the last layer only.
ALTERNATING = """model alternating {
  vocab = 50; context = 32; dim = 32; heads = 4; layers = 4
  windows = [3, none, 3, none]
  thetas = [10000.0, 500000.0]
  input tokens: i64[batch, seq <= context]
  x = embedding(tokens, vocab, dim) as embed
  repeat layers as block, i {
    x = x + attention(rmsnorm(x) as attn_norm, heads, kv_heads=2, rope=true, bias=false, window=windows[i],
                      rope_theta=thetas[i % 2], qk_norm=true if i == layers - 1 else false) as attn
    x = x + mlp(rmsnorm(x) as mlp_norm, 64, act=silu, gated=true, bias=false) as mlp
  }
  logits = linear(rmsnorm(x) as norm, vocab, bias=false) as head
  output logits
}
"""
