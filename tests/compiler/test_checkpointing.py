"""Activation checkpointing per block: the same losses and gradients, the same parameter names,
less memory, and a located error for a policy that names no block."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmspec.compiler import load_spec
from lmspec.compiler.checkpointing import checkpoint_blocks
from lmspec.compiler.kv_cache import KVCache
from lmspec.compiler.lower import lower

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"layers": 3, "dim": 64, "heads": 4, "vocab": 100, "context": 32, "dropout": 0.1}


def loss_and_grads(model, ids):
    torch.manual_seed(5)  # the same dropout masks for both models
    model.train()
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy, expect", [("all", ["block.0", "block.1", "block.2"]),
                                            ("block.0, block.2", ["block.0", "block.2"]),
                                            ("block.[12]", ["block.1", "block.2"])])
def test_losses_gradients_and_names_are_unchanged(policy, expect):
    graph = load_spec(str(ROOT / "specs" / "gpt2.arch"), SMALL)
    plain, checkpointed = lower(graph, seed=0), lower(graph, seed=0)
    assert checkpoint_blocks(checkpointed, policy) == expect
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    for block in expect:
        assert f"checkpointed_{block.replace('.', '_')}(" in checkpointed.code
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    loss_a, grads_a = loss_and_grads(plain, ids)
    loss_b, grads_b = loss_and_grads(checkpointed, ids)
    assert loss_a == loss_b
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_generation_with_the_kv_cache_still_works():
    graph = load_spec(str(ROOT / "specs" / "llama3.2-1b.arch"),
                      {"layers": 2, "dim": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "ffn": 64, "vocab": 50,
                       "context": 32, "rope_original": 8})
    plain, checkpointed = lower(graph, seed=0).eval(), lower(graph, seed=0).eval()
    checkpoint_blocks(checkpointed)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = KVCache(32)
        first = checkpointed(ids[:, :8], cache)
        cache.advance(8)
        step = checkpointed(ids[:, 8:], cache)
        torch.testing.assert_close(torch.cat([first, step], 1), plain(ids), atol=1e-5, rtol=1e-5)


def test_a_policy_that_names_no_block_is_an_error():
    model = lower(load_spec(str(ROOT / "specs" / "gpt2.arch"), SMALL))
    with pytest.raises(ValueError, match=r"block\.9 names no block \(the model's blocks: block\.0, block\.1"):
        checkpoint_blocks(model, "block.0,block.9")


MEMORY = textwrap.dedent("""
    import json, sys
    import torch
    from lmspec.compiler import load_spec
    from lmspec.compiler.checkpointing import checkpoint_blocks
    from lmspec.compiler.lower import lower

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    graph = load_spec(sys.argv[1], {"layers": 12, "dim": 256, "heads": 4, "vocab": 256, "context": 512,
                                    "dropout": 0.0})
    model = lower(graph, seed=0).train()
    if sys.argv[2] == "checkpointed":
        checkpoint_blocks(model)
    for p in model.parameters():  # gradients exist before: the growth measured is activations
        p.grad = torch.zeros_like(p)
    ids = torch.randint(0, 256, (4, 512), generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak to the current size
        f.write("5")
    before = status("VmRSS")
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    print(json.dumps({"growth": status("VmHWM") - before, "loss": loss.item()}))
""")


# slow: tests/runtime/train/test_plan_memory.py measures what checkpointing saves in the default run too
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_checkpointing_cuts_activation_memory_of_a_12_layer_model_at_seq_512_by_40_percent(tmp_path):
    script = tmp_path / "memory.py"
    script.write_text(MEMORY)
    # A fixed mmap threshold makes glibc return freed tensors to the OS, so the peak RSS is the
    # peak of live tensors rather than of what the allocator kept.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs = {}
    for mode in ("plain", "checkpointed"):
        out = subprocess.run([sys.executable, str(script), str(ROOT / "specs" / "gpt2.arch"), mode], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["plain"]["loss"] == pytest.approx(runs["checkpointed"]["loss"], abs=1e-6)
    assert runs["checkpointed"]["growth"] <= 0.6 * runs["plain"]["growth"], runs
