"""LoRA as a graph rewrite: the adapter parameters it adds, a fresh adapted model equal to its base,
training only the adapters, merging them back (against the unmerged model), and located errors."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmspec.compiler import load_spec
from lmspec.compiler.analysis import breakdown, parameter_count
from lmspec.compiler.checkpointing import checkpoint_blocks
from lmspec.compiler.kv_cache import KVCache
from lmspec.compiler.lora import add_lora, is_lora, lora_parameter_names, merge_lora, rewrites_without_lora
from lmspec.compiler.lower import lower
from lmspec.compiler.rewrites import RewriteError, apply_rewrites
from lmspec.runtime.finetune.lora import lora_rewrite, mark_trainable
from lmspec.runtime.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "specs" / "tiny.arch")
LLAMA = str(ROOT / "specs" / "llama3.2-1b.arch")
GPT_SMALL = {"layers": 2, "dim": 32, "heads": 2, "context": 32}
LLAMA_SMALL = {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn": 128, "vocab": 256,
               "context": 32, "rope_original": 8}
DEFAULT_TARGETS = ["attn.qkv", "attn.proj", "mlp.*"]


def tokens(vocab, shape=(2, 16), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_adapters_are_added_beside_each_matched_matrix_with_their_shapes():
    base = load_spec(TINY, GPT_SMALL)
    graph = add_lora(base, rank=4, alpha=8.0, targets=DEFAULT_TARGETS)
    expect = {}
    for b in range(2):
        for matrix, (out, inp) in {"attn.qkv": (96, 32), "attn.proj": (32, 32), "mlp.fc": (128, 32),
                                   "mlp.proj": (32, 128)}.items():
            expect[f"block.{b}.{matrix}.lora_a"] = (4, inp)
            expect[f"block.{b}.{matrix}.lora_b"] = (out, 4)
    assert {n: graph.params[n].shape for n in lora_parameter_names(graph)} == expect
    assert set(graph.params) - set(expect) == set(base.params)  # base names unchanged
    assert not is_lora(base) and not lora_parameter_names(base)  # the input graph is left alone
    assert is_lora(graph)
    added = sum(4 * (i + o) for i, o in [(32, 96), (32, 32), (32, 128), (128, 32)]) * 2
    assert parameter_count(graph) == parameter_count(base) + added  # what `lmspec info` counts
    assert sum(g.params * g.count for g in breakdown(graph)) == parameter_count(graph)
    model = lower(graph)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(graph)
    assert set(model.state_dict()) == set(graph.params)


@pytest.mark.parametrize("targets, expect", [
    ("attn.qkv", ["block.0.attn.qkv", "block.1.attn.qkv"]),
    (["mlp.*"], ["block.0.mlp.fc", "block.0.mlp.proj", "block.1.mlp.fc", "block.1.mlp.proj"]),
    ("block.1.attn.*", ["block.1.attn.proj", "block.1.attn.qkv"]),
    ("block.?.mlp.proj, qkv", ["block.0.attn.qkv", "block.0.mlp.proj", "block.1.attn.qkv", "block.1.mlp.proj"]),
])
def test_targets_match_the_end_of_module_paths_or_a_whole_glob(targets, expect):
    graph = add_lora(load_spec(TINY, GPT_SMALL), rank=2, alpha=2.0, targets=targets)
    assert sorted({n.rsplit(".", 1)[0] for n in lora_parameter_names(graph)}) == expect


def test_a_fresh_adapted_model_computes_exactly_what_its_base_does():
    base = load_spec(TINY, GPT_SMALL)
    graph = add_lora(base, rank=8, alpha=16.0, targets=DEFAULT_TARGETS)
    plain, adapted = lower(base, seed=3), lower(graph, seed=3)
    for name, tensor in plain.state_dict().items():  # the same base initialisation, draw for draw
        assert torch.equal(adapted.state_dict()[name], tensor), name
    a = adapted.get_parameter("block.0.attn.qkv.lora_a")
    assert a.abs().max() > 0 and a.abs().max() <= 32 ** -0.5  # kaiming-uniform, bound 1/sqrt(in)
    assert not adapted.get_parameter("block.0.attn.qkv.lora_b").any()
    ids = tokens(128)
    assert torch.equal(adapted(ids), plain(ids))


@pytest.mark.parametrize("targets, message", [
    ("attn.qvk", "target 'attn.qvk' matches no weight matrix (the model has block.0.attn.qkv, "
                 "block.0.attn.proj, block.0.mlp.fc, block.0.mlp.proj, lm_head)"),
    ("wte", "target 'wte' matches no weight matrix"),  # embeddings are no target
    ("lm_head", "lm_head.weight is tied to wte.weight; tied matrices cannot take adapters"),
    ("", "no target patterns given"),
])
def test_bad_targets_are_refused_naming_the_pattern(targets, message):
    with pytest.raises(RewriteError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        add_lora(load_spec(TINY, GPT_SMALL), rank=4, alpha=8.0, targets=targets)


@pytest.mark.parametrize("rank, alpha, message", [(0, 8.0, "rank must be a positive integer, got 0"),
                                                  (2.5, 8.0, "rank must be a positive integer, got 2.5"),
                                                  (True, 8.0, "rank must be a positive integer, got True"),
                                                  (4, 0.0, "alpha must be a positive number, got 0.0"),
                                                  # before: --lora 1e12 tried to allocate its adapters
                                                  (10**12, 8.0, r"rank 1000000000000 is more than "
                                                                r"block.0.mlp.fc.weight's smaller side 32")])
def test_bad_rank_or_alpha_is_refused(rank, alpha, message):
    with pytest.raises(RewriteError, match=message):
        add_lora(load_spec(TINY, GPT_SMALL), rank=rank, alpha=alpha, targets="mlp.*")


def test_stacked_expert_weights_and_adapters_twice_are_refused_clearly():
    moe = load_spec(str(ROOT / "specs" / "qwen3-moe-tiny.arch"))
    with pytest.raises(RewriteError, match="names only stacked expert weights"):
        add_lora(moe, rank=2, alpha=4.0, targets="fc_weight")
    routed = add_lora(moe, rank=2, alpha=4.0, targets="router")  # the router is a plain linear
    assert all(".router." in n for n in lora_parameter_names(routed))
    with pytest.raises(RewriteError, match="already has LoRA adapters"):
        add_lora(routed, rank=2, alpha=4.0, targets="router")


def test_an_untied_head_and_plain_linears_take_adapters(tmp_path):
    spec = tmp_path / "untied.arch"
    spec.write_text("""model untied {
  vocab = 64; context = 16; dim = 32
  input tokens: i64[batch, seq <= context]
  x = embedding(tokens, vocab, dim) as wte
  x = x + linear(linear(x, 64, bias=false) as up, dim) as down
  logits = linear(x, vocab, bias=true) as lm_head
  output logits: f32[batch, seq, vocab]
}
""")
    base = load_spec(str(spec))
    graph = apply_rewrites(base, [{"kind": "lora", "rank": 4, "alpha": 4.0, "targets": ["lm_head", "up"]}])
    assert lora_parameter_names(graph) == ["up.lora_a", "up.lora_b", "lm_head.lora_a", "lm_head.lora_b"]
    model = lower(graph)
    with torch.no_grad():
        model.get_parameter("lm_head.lora_b").normal_()
        model.get_parameter("up.lora_b").normal_()
    ids = tokens(64)
    merged_graph, weights = merge_lora(graph, model.state_dict())
    merged = lower(merged_graph)
    merged.load_state_dict(weights)
    torch.testing.assert_close(merged(ids), model(ids), atol=1e-5, rtol=1e-5)


def train_adapters(model, graph, vocab, steps=5):
    """AdamW on what mark_trainable leaves trainable, next-token loss on random tokens."""
    count = mark_trainable(model, graph)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert count == sum(p.numel() for p in trainable) == sum(
        graph.params[n].shape[0] * graph.params[n].shape[1] for n in lora_parameter_names(graph))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for step in range(steps):
        ids = tokens(vocab, (4, 17), seed=step)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("spec, overrides, vocab", [(TINY, GPT_SMALL, 128), (LLAMA, LLAMA_SMALL, 256)],
                         ids=["gpt2-style", "llama-gqa"])
def test_training_only_adapters_then_merging_gives_the_same_logits(spec, overrides, vocab):
    base = load_spec(spec, overrides)
    graph = add_lora(base, rank=4, alpha=8.0, targets=DEFAULT_TARGETS)
    model = lower(graph, seed=1)
    before = {n: t.clone() for n, t in model.state_dict().items() if n in base.params}
    ids = tokens(vocab)
    with torch.no_grad():
        start = model(ids)
    train_adapters(model, graph, vocab)
    after = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"
    assert all(after[n].any() for n in lora_parameter_names(graph) if n.endswith("lora_b"))
    with torch.no_grad():
        adapted = model(ids)
    assert (adapted - start).abs().max() > 1e-3  # the adapters learnt something

    merged_graph, weights = merge_lora(graph, dict(after))
    assert not is_lora(merged_graph) and set(merged_graph.params) == set(base.params)
    assert set(weights) == set(after) - set(lora_parameter_names(graph))
    merged = lower(merged_graph)
    merged.load_state_dict(weights, strict=True)
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)
    assert is_lora(graph) and after["block.0.attn.qkv.weight"].equal(before["block.0.attn.qkv.weight"])


def test_adapters_work_with_the_kv_cache_and_activation_checkpointing():
    graph = add_lora(load_spec(LLAMA, LLAMA_SMALL), rank=4, alpha=8.0, targets=DEFAULT_TARGETS)
    plain, checkpointed = lower(graph, seed=0), lower(graph, seed=0)
    with torch.no_grad():
        for model in (plain, checkpointed):
            for name in lora_parameter_names(graph):
                model.get_parameter(name).normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    checkpoint_blocks(checkpointed)
    ids = tokens(256, (1, 9))
    plain.eval(), checkpointed.eval()
    with torch.no_grad():
        full = plain(ids)
        cache = KVCache(32)
        for t in range(ids.shape[1]):  # token by token through the cache, as generation feeds them
            logits = checkpointed(ids[:, t:t + 1], cache)
            cache.advance(1)
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    mark_trainable(plain, graph), mark_trainable(checkpointed, graph)
    grads = []
    for model in (plain, checkpointed):
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) == set(lora_parameter_names(graph))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_rank_8_trains_at_most_2_percent_of_gpt2_small():
    graph = add_lora(load_spec(str(ROOT / "specs" / "gpt2.arch")), rank=8, alpha=16.0, targets=DEFAULT_TARGETS)
    adapters = sum(graph.params[n].shape[0] * graph.params[n].shape[1] for n in lora_parameter_names(graph))
    assert adapters == 12 * 8 * (768 + 2304 + 768 + 768 + 768 + 3072 + 3072 + 768)
    assert adapters / parameter_count(graph) <= 0.02


def test_mark_trainable_freezes_the_rest_and_takes_extra_names():
    graph = add_lora(load_spec(TINY, GPT_SMALL), rank=2, alpha=4.0, targets="attn.qkv")
    model = lower(graph)
    count = mark_trainable(model, graph, also=["ln_f.weight", "ln_f.bias"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(lora_parameter_names(graph)) | {"ln_f.weight", "ln_f.bias"}
    assert count == 2 * (2 * 32 + 96 * 2) + 2 * 32
    with pytest.raises(ValueError, match="no parameters head.weight"):
        mark_trainable(model, graph, also=["head.weight"])


def test_rewrites_without_lora_keeps_the_others():
    rewrites = [{"kind": "classify", "labels": ["a", "b"]}, {"kind": "lora", "rank": 2, "alpha": 4.0,
                                                            "targets": ["mlp.*"]}]
    assert rewrites_without_lora(rewrites) == rewrites[:1]


def test_lora_options_make_the_rewrite_record():
    from argparse import ArgumentParser, Namespace
    from lmspec.runtime.cli.options import add_lora_options

    parser = ArgumentParser()
    add_lora_options(parser)
    assert lora_rewrite(parser.parse_args([])) is None
    assert lora_rewrite(parser.parse_args(["--lora", "8"])) == {
        "kind": "lora", "rank": 8, "alpha": 16.0, "targets": ["attn.qkv", "attn.proj", "mlp.*"]}
    record = lora_rewrite(parser.parse_args(["--lora", "4", "--lora-alpha", "4", "--lora-targets", "qkv, lm_head"]))
    assert record == {"kind": "lora", "rank": 4, "alpha": 4.0, "targets": ["qkv", "lm_head"]}
    for argv in (["--lora", "0"], ["--lora", "2", "--lora-alpha", "-1"]):  # refused by the option's type
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    targets = "attn.qkv,attn.proj,mlp.*"
    for args, message in [(dict(lora=0, lora_alpha=None, lora_targets=targets), "at least 1"),
                          (dict(lora=2, lora_alpha=-1.0, lora_targets=targets), "positive"),
                          (dict(lora=2, lora_alpha=None, lora_targets=" , "), "at least one module pattern"),
                          # before: ignored without --lora, and every weight trained instead
                          (dict(lora=None, lora_alpha=None, lora_targets="mlp.*"),
                           "--lora-targets shape LoRA adapters: add --lora R"),
                          (dict(lora=None, lora_alpha=4.0, lora_targets=None),
                           "--lora-alpha shape LoRA adapters: add --lora R")]:
        with pytest.raises(UsageError, match=message):  # and by lora_rewrite, for a caller with no command line
            lora_rewrite(Namespace(**args))
