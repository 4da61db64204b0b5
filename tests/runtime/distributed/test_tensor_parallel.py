"""Tensor parallelism derived from the graph: the plan (pure, in process) and, on CPU with gloo over
2 ranks (torchrun running this file as a script), the same loss, gradients and AdamW update as one
process, for a GPT-2-style model (tied head, biases, learned positions) and a Llama/Qwen3-style one
(RMSNorm, GQA 4 heads / 2 kv heads, RoPE, QK-norm, SwiGLU, untied head)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _graph(case: str):
    from lmspec.compiler.loader import load_spec
    from runtime_helpers import GPT, LLAMA
    if case == "gpt":
        return load_spec(str(ROOT / GPT[0]), GPT[1])
    return load_spec("llama_tiny.arch", sources={"llama_tiny.arch": LLAMA})


# ------------------------------------------------------------------------------ in process: the plan

def test_the_plan_splits_heads_rows_and_vocab():
    from lmspec.compiler.tensor_parallel import format_tensor_parallel_plan, tensor_parallel_plan
    plan = tensor_parallel_plan(_graph("llama"), 2)
    p = plan.params
    qkv = p["block.0.attn.qkv.weight"]
    assert (qkv.split, qkv.dim, qkv.sections, qkv.local_shape) == ("column", 0, (64, 32, 32), (64, 64))
    assert (p["block.1.attn.proj.weight"].split, p["block.1.attn.proj.weight"].dim) == ("row", 1)
    assert p["block.0.mlp.fc.weight"].sections == (96, 96) and p["block.0.mlp.proj.weight"].local_shape == (64, 48)
    assert p["embed.weight"].split == p["lm_head.weight"].split == "vocab"
    assert p["block.0.attn.q_norm.weight"].split == p["norm.weight"].split == "replicated"
    assert plan.modules["block.0.attn"].heads == 2 and plan.modules["block.0.attn"].kv_heads == 1
    table = format_tensor_parallel_plan(plan)
    assert "block.{0-1}.attn.qkv.weight" in table and "[192, 64]" in table and "per rank" in table

    gpt = tensor_parallel_plan(_graph("gpt"), 2)
    assert gpt.params["lm_head.weight"].tied_to == "wte.weight" and gpt.params["lm_head.weight"].dim == 0
    assert gpt.params["block.0.attn.proj.bias"].split == "replicated"
    assert gpt.params["wpe.weight"].split == "replicated"


def test_heads_that_do_not_divide_are_a_located_error_before_any_process_group():
    import torch.distributed as dist
    from lmspec.compiler.loader import load_spec
    from lmspec.compiler.tensor_parallel import tensor_parallel_plan
    from lmspec.dsl.diagnostics import SpecError
    with pytest.raises(SpecError) as err:
        tensor_parallel_plan(_graph("llama"), 4)  # 4 heads divide, 2 kv heads do not
    (d,) = err.value.diagnostics
    assert d.code == "E103" and "2 kv_heads do not divide over tensor-parallel size 4" in d.message
    assert (d.span.file, d.span.line) == ("llama_tiny.arch", 9)
    with pytest.raises(SpecError) as err:
        tensor_parallel_plan(_graph("gpt"), 3)  # 4 heads, hidden 256 and vocab 128 over 3
    messages = [d.message for d in err.value.diagnostics]
    assert len(messages) == 3 and any("4 heads do not divide" in m for m in messages)
    assert all(d.span.file.endswith("tiny.arch") for d in err.value.diagnostics)
    with pytest.raises(SpecError) as err:  # hand-written attention cannot run on a slice of the sequence
        tensor_parallel_plan(load_spec(str(ROOT / "specs/handwritten.arch")), 2, sequence_parallel=True)
    (d,) = err.value.diagnostics
    assert d.code == "E103" and d.message.startswith("split: mixes positions")
    assert (Path(d.span.file).name, d.span.line) == ("attention.arch", 6)
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------ 2 ranks

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           __file__, str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["gpt", "llama"])
def test_two_ranks_equal_one_process(two_ranks, case):
    r = two_ranks[case]
    assert r["state_dict_exact"] and r["reload_exact"]  # full_state_dict round trips bit for bit
    assert r["sharded"]  # the big matrices really are split
    assert abs(r["loss_tp"] - r["loss_one"]) <= 1e-5
    assert r["grad_names"] and max(r["grad_diff"].values()) <= 1e-5, r["grad_diff"]
    assert max(r["param_diff"].values()) <= 1e-5, r["param_diff"]
    assert max(r["optim_diff"].values()) <= 1e-5
    assert abs(r["loss2_tp"] - r["loss2_one"]) <= 1e-5  # after the step, on the next batch
    # sequence parallel (norms, position table and residual split along the sequence): the same again
    assert r["sp_norm_seq"] * 2 == r["seq"]  # a norm sees half the sequence
    assert abs(r["sp_loss"] - r["loss_one"]) <= 1e-5
    assert max(r["sp_grad_diff"].values()) <= 1e-5, r["sp_grad_diff"]
    assert max(r["sp_param_diff"].values()) <= 1e-5, r["sp_param_diff"]


def test_a_tensor_parallel_checkpoint_has_the_single_process_layout(two_ranks):
    r = two_ranks["checkpoint"]
    assert r["same_names"] and r["weights_close"] and r["optim_close"] and r["resumed_exact"]


# ------------------------------------------------------------------------------ the worker

def _worker(out: str) -> None:
    import os
    import tempfile

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from lmspec.compiler.lower import lower
    from lmspec.compiler.tensor_parallel import tensor_parallel_plan
    from lmspec.runtime.distributed import canonical_state as canon
    from lmspec.runtime.checkpoint import sharded as sharded_store
    from lmspec.runtime.distributed import tensor_parallel as tpm
    from lmspec.runtime.checkpoint.store import load_checkpoint, read_optimizer_by_name, read_tensors
    from lmspec.runtime.distributed.world import World
    from lmspec.runtime.train.config import TrainConfig
    from lmspec.runtime.train.steps import make_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = tpm.tensor_parallel_mesh(2)
    cfg = TrainConfig()  # AdamW as `lmspec train` makes it: lr 1e-3, weight decay 0.1
    results = {}

    def step(model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        tpm.sum_partial_gradients(model)  # what train_step does: q_norm/k_norm's gradients, summed
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # clips: the norm is well above 0.5
        return loss

    def diff(a, b):
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        return {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}

    for case in ("gpt", "llama"):
        graph = _graph(case)
        plan = tensor_parallel_plan(graph, 2)
        one, tp = lower(graph, seed=0), lower(graph, seed=0)
        tpm.apply_tensor_parallel(tp, plan, mesh)
        r = results[case] = {}
        reference = {k: v.detach().clone() for k, v in one.state_dict().items()}
        full = canon.full_state_dict(tp, plan)
        r["state_dict_exact"] = full.keys() == reference.keys() and all(torch.equal(full[k], reference[k])
                                                                         for k in full)
        canon.load_full_state_dict(tp, plan, {k: v for k, v in reference.items() if k != "lm_head.weight"
                                            or case == "llama"})  # a tied weight under one name only
        again = canon.full_state_dict(tp, plan)
        r["reload_exact"] = all(torch.equal(again[k], reference[k]) for k in again)
        qkv = tp.get_parameter("block.0.attn.qkv.weight")
        r["sharded"] = qkv.to_local().shape[0] * 2 == qkv.shape[0]

        vocab = graph.params[next(iter(graph.params))].shape[0]
        gen = torch.Generator().manual_seed(1)
        x, y, x2 = (torch.randint(0, vocab, (2, 16), generator=gen) for _ in range(3))
        opt_one, opt_tp = make_optimizer(one, cfg), make_optimizer(tp, cfg)
        loss_one, loss_tp = step(one, x, y), step(tp, x, y)
        r["loss_one"], r["loss_tp"] = loss_one.item(), loss_tp.item()
        grads_one = {n: p.grad for n, p in one.named_parameters()}
        grads_tp = canon.full_gradients(tp, plan)
        r["grad_names"] = list(grads_tp)
        r["grad_diff"] = diff(grads_tp, grads_one)
        opt_one.step()
        opt_tp.step()
        r["param_diff"] = diff(canon.full_state_dict(tp, plan), one.state_dict())
        by_name_tp = canon.full_optimizer_state_dict(tp, opt_tp, plan)["state"]
        by_name_one = canon.full_optimizer_state_dict(one, opt_one, plan)["state"]  # plain tensors pass through
        r["optim_diff"] = diff({f"{n}.{k}": v for n, s in by_name_tp.items() for k, v in s.items()},
                               {f"{n}.{k}": v for n, s in by_name_one.items() for k, v in s.items()})
        # sequence parallelism: the same numbers, with the residual stream split along the sequence
        sp_plan = tensor_parallel_plan(graph, 2, sequence_parallel=True)
        sp = tpm.apply_tensor_parallel(lower(graph, seed=0), sp_plan, mesh)
        opt_sp = make_optimizer(sp, cfg)
        norm = next(path for path, rule in sp_plan.modules.items() if rule.op in ("layernorm", "rmsnorm"))
        seen = []
        sp.get_submodule(norm).register_forward_pre_hook(lambda module, args: seen.append(args[0].size(1)))
        logits = sp(x)
        r["sp_norm_seq"], r["seq"] = seen[0], x.size(1)
        loss_sp = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss_sp.backward()
        tpm.sum_partial_gradients(sp)
        torch.nn.utils.clip_grad_norm_(sp.parameters(), 0.5)
        r["sp_loss"] = loss_sp.item()
        r["sp_grad_diff"] = diff(canon.full_gradients(sp, sp_plan), grads_one)
        opt_sp.step()
        r["sp_param_diff"] = diff(canon.full_state_dict(sp, sp_plan), one.state_dict())
        with torch.no_grad():
            r["loss2_one"] = F.cross_entropy(one(x2).reshape(-1, vocab), y.reshape(-1)).item()
            r["loss2_tp"] = F.cross_entropy(tp(x2).reshape(-1, vocab), y.reshape(-1)).item()

    # A checkpoint of the last (llama) run: single-process names and layout; it resumes a fresh
    # tensor-parallel model exactly (weights loaded before parallelizing, optimizer by name).
    run_dir = Path(tempfile.gettempdir()) / f"lmspec-tp-test-{os.getppid()}"
    path = sharded_store.save_tensor_parallel_checkpoint(World(rank, 2), run_dir, step=1, model=tp, optimizer=opt_tp,
                                               plan=plan, rng=None, train_config={}, metrics={}, tokenizer="",
                                               spec={})
    dist.barrier()
    ckpt = load_checkpoint(run_dir)
    saved = read_tensors(ckpt.path / "model.safetensors")
    c = results["checkpoint"] = {}
    c["same_names"] = saved.keys() == one.state_dict().keys()
    c["weights_close"] = all(torch.allclose(saved[k], one.state_dict()[k], atol=1e-5) for k in saved)
    optim = read_optimizer_by_name(ckpt.path)
    c["optim_close"] = all(torch.allclose(v, by_name_one[n][k], atol=1e-5) for n, s in optim["state"].items()
                           for k, v in s.items())
    fresh = lower(graph, seed=5)
    ckpt.load_model(fresh)
    tpm.apply_tensor_parallel(fresh, plan, mesh)
    opt_fresh = make_optimizer(fresh, cfg)
    sharded_store.load_tensor_parallel_optimizer(ckpt, opt_fresh, fresh, plan)
    x3 = torch.randint(0, vocab, (2, 16), generator=gen)
    for model, opt in ((tp, opt_tp), (fresh, opt_fresh)):
        opt.zero_grad()
        step(model, x3, y)
        opt.step()
    a, b = canon.full_state_dict(tp, plan), canon.full_state_dict(fresh, plan)
    c["resumed_exact"] = all(torch.equal(a[k], b[k]) for k in a)
    dist.barrier()
    if rank == 0:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        Path(out).write_text(json.dumps(results))
        assert path is not None
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: runtime_helpers' specs
    _worker(sys.argv[1])
