"""Pipeline parallelism: the stage table cut from the graph (in process), and two pipeline ranks on
CPU (gloo) giving the same loss, gradients and AdamW step as one process on the same global batch,
under GPipe and 1F1B, for a GPT-2-style spec with a head tied across stages and a Llama-style one."""
import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lmspec.compiler.loader import load_spec
from lmspec.compiler.pipeline_stages import format_pipeline_stages, pipeline_stages
from lmspec.dsl.diagnostics import SpecError

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "specs" / "tiny.arch")
TINY_SET = {"layers": 2, "dim": 64, "heads": 4, "dropout": 0.0, "vocab": 96, "context": 32}
LLAMA = """\
model llama_tiny {
  vocab = 96; context = 32; dim = 64; layers = 2; heads = 4; kv_heads = 2; ffn = 128; eps = 1e-5

  input tokens: i64[batch, seq <= context]

  x = embedding(tokens, vocab, dim) as embed
  repeat layers as block {
    x = x + attention(rmsnorm(x, eps) as attn_norm, heads, kv_heads=kv_heads, bias=false, rope=true) as attn
    x = x + mlp(rmsnorm(x, eps) as mlp_norm, ffn, act=silu, gated=true, bias=false) as mlp
  }
  logits = linear(rmsnorm(x, eps) as norm, vocab, bias=false) as lm_head
  output logits: f32[batch, seq, vocab]
}
"""
# Adam's first step is lr * g / (|g| + eps): near g = 0 it magnifies float rounding in the gradient by up to
# lr / eps, so the learning rate is a usual one rather than a large one that would only measure that rounding.
BATCH, SEQ, LR = 4, 16, 1e-3
CASES = [(spec, schedule) for spec in ("tiny", "llama") for schedule in ("gpipe", "1f1b")]


def _graph(name: str, tmp: Path, **overrides):
    if name == "tiny":
        return load_spec(TINY, {**TINY_SET, **overrides})
    path = tmp / "llama_tiny.arch"
    if not path.exists():
        path.write_text(LLAMA)
    return load_spec(str(path), overrides or None)


def _batch():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 96, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _optimizer(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)


# --------------------------------------------------------------------------- the stage table, in process

def test_stages_cover_every_parameter_once_and_the_tied_head_is_a_copy():
    graph = load_spec(TINY, {**TINY_SET, "layers": 4})
    stages = pipeline_stages(graph, 2)
    owned = [p.name for p in graph.owned_params()]
    listed = [name for s in stages for name in s.parameters]
    assert sorted(listed) == sorted(owned) and len(set(listed)) == len(listed)
    assert [b for s in stages for b in s.blocks] == [f"block.{i}" for i in range(4)]
    assert stages[0].holds_embedding and not stages[0].holds_head
    assert stages[-1].holds_head and not stages[-1].holds_embedding
    assert "wte.weight" in stages[0].parameters and stages[-1].tied_copies == {"lm_head.weight": "wte.weight"}
    owned_count = sum(torch.Size(p.shape).numel() for p in graph.owned_params())
    assert sum(s.parameter_count for s in stages) == owned_count + 96 * 64  # the copy is stored twice
    assert pipeline_stages(graph, 1)[0].tied_copies == {}  # one stage: the tie stays a tie


def test_more_stages_than_layers_is_a_located_error():
    graph = load_spec(TINY, TINY_SET)
    with pytest.raises(SpecError) as err:
        pipeline_stages(graph, 3)
    [diag] = err.value.diagnostics
    assert diag.code == "E201" and "--pp 3" in diag.message and "2" in diag.message
    line = next(i for i, text in enumerate(Path(TINY).read_text().splitlines(), 1) if "repeat layers" in text)
    assert diag.span.line == line and "repeat" in err.value.render()


def test_the_cut_minimises_the_largest_stage_and_the_head_lightens_the_last_stage(tmp_path):
    # a large vocabulary makes the head weigh several blocks: the last stage gets fewer of them
    graph = _graph("llama", tmp_path, vocab=4096, layers=6)
    stages = pipeline_stages(graph, 3, seq=16)
    sizes = [len(s.blocks) for s in stages]
    assert sum(sizes) == 6 and sizes[-1] < sizes[1]
    # no other contiguous cut has a smaller largest stage
    best = min(max(_costs(graph, cut)) for cut in _cuts(6, 3))
    assert max(s.cost for s in stages) == pytest.approx(best)
    table = format_pipeline_stages(stages)
    assert "imbalance" in table and "embed + block.0" in table and "+ head" in table


def _cuts(n, k):
    for inner in itertools.combinations(range(1, n), k - 1):
        yield (0, *inner, n)


def _costs(graph, cut):
    """Each stage's cost for a given cut, through the same table with the blocks forced."""
    from lmspec.compiler import pipeline_stages as ps
    pre, blocks, post, _ = ps._units(graph, 16)
    units = [pre, *blocks, post]
    flops = sum(u.flops for u in units)
    mem = sum(ps._memory(u) for u in units)
    out = []
    for s in range(len(cut) - 1):
        group = blocks[cut[s]:cut[s + 1]] + ([pre] if s == 0 else []) + ([post] if s == len(cut) - 2 else [])
        out.append(max(sum(u.flops for u in group) / flops, sum(ps._memory(u) for u in group) / mem))
    return out


# --------------------------------------------------------------------------- two ranks against one process

def _worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist
    from lmspec.compiler.lower import lower
    from lmspec.runtime.distributed.pipeline import build_pipeline
    from lmspec.runtime.train.steps import training_loss as _loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        results = {}
        tokens, targets = _batch()
        for spec, schedule in CASES:
            graph = _graph(spec, Path(tmp))
            model = lower(graph, seed=0)
            stages = pipeline_stages(graph, world, seq=SEQ)
            pipe = build_pipeline(model, graph, stages, rank, world, n_microbatches=2, schedule=schedule,
                                  loss_fn=_loss)
            del model
            loss = pipe.step(tokens, targets)
            grads = {name: p.grad.clone() for name, p in pipe.named_parameters()}
            norm = pipe.clip_grad_norm_(1e9)  # the norm over all stages, a tied weight once
            _optimizer(pipe.parameters()).step()
            state = pipe.full_state_dict()
            eval_loss = pipe.eval_loss(tokens, targets)
            results[spec, schedule] = {"loss": loss, "grads": grads, "norm": norm, "state": state,
                                       "eval_loss": eval_loss}
        # resuming from a whole-model state: every rank loads its part; gathering gives it back
        graph = _graph("tiny", Path(tmp))
        pipe = build_pipeline(lower(graph, seed=0), graph, pipeline_stages(graph, world), rank, world, 2)
        # gradient accumulation: two half batches at scale 1/2 give the whole batch's gradients
        halves = [pipe.step(tokens[i:i + 2], targets[i:i + 2], scale=0.5) for i in (0, 2)]
        results["accumulated"] = {"loss": sum(halves) / 2,
                                  "grads": {name: p.grad.clone() for name, p in pipe.named_parameters()}}
        other = lower(graph, seed=1).state_dict()
        pipe.load_full_state_dict(other)
        results["reloaded"] = pipe.full_state_dict()
        torch.save(results, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp)), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def _reference(spec: str, tmp: Path):
    """One process, the same global batch: loss, gradients by every name, the weights after AdamW as
    model.safetensors keeps them (a tied weight once)."""
    import tempfile
    from safetensors.torch import load_file, save_model
    from lmspec.compiler.lower import lower
    from lmspec.runtime.train.steps import training_loss as _loss

    model = lower(_graph(spec, tmp), seed=0)
    tokens, targets = _batch()
    loss = _loss(model(tokens), targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters(remove_duplicate=False)}
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    _optimizer(model.parameters()).step()
    with tempfile.TemporaryDirectory() as d:
        save_model(model, f"{d}/model.safetensors")
        weights = load_file(f"{d}/model.safetensors")
    with torch.no_grad():
        eval_loss = _loss(model(tokens), targets).item()
    return loss.item(), grads, norm, weights, eval_loss


@pytest.mark.parametrize("spec, schedule", CASES)
def test_two_pipeline_ranks_equal_one_process(ranks, spec, schedule):
    tmp, results = ranks
    loss, grads, norm, weights, eval_loss = _reference(spec, tmp)
    mine = [r[spec, schedule] for r in results]
    assert all(abs(m["loss"] - loss) <= 1e-5 for m in mine)  # every rank reports the same loss
    assert all(abs(m["norm"] - norm) <= 1e-5 for m in mine)
    seen = {}
    for m in mine:
        for name, grad in m["grads"].items():
            assert torch.allclose(grad, grads[name], atol=1e-5), name
            seen[name] = True
    assert seen.keys() == grads.keys()  # every gradient, a tied head's copy included
    state = mine[0]["state"]
    assert mine[1]["state"] == {}  # gathered to rank 0 only
    assert state.keys() == weights.keys()
    assert all(torch.allclose(state[k], weights[k], atol=1e-5) for k in weights)
    assert all(abs(m["eval_loss"] - eval_loss) <= 1e-5 for m in mine)


def test_gradients_accumulate_over_steps_at_a_scale(ranks):
    tmp, results = ranks
    loss, grads, *_ = _reference("tiny", tmp)
    for r in results:
        assert abs(r["accumulated"]["loss"] - loss) <= 1e-5
        assert all(torch.allclose(g, grads[name], atol=1e-5) for name, g in r["accumulated"]["grads"].items())


def test_a_whole_model_state_loads_into_the_stages(ranks):
    from lmspec.compiler.lower import lower
    tmp, results = ranks
    other = lower(_graph("tiny", tmp), seed=1).state_dict()
    back = results[0]["reloaded"]
    assert back.keys() <= other.keys() and "lm_head.weight" in back
    assert all(torch.equal(back[k], other[k]) for k in back)
