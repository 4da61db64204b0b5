"""`lmspec plan`'s 3-D layouts (data x tensor x pipeline parallel): memory per GPU, traffic per step,
bubble and step time, against hand calculations from the published configs (compiler/plan.py's
docstring gives the model). No torch."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmspec.compiler import load_spec
from lmspec.compiler.plan import make_plan
from lmspec.runtime.cli.plan import cmd_plan

ROOT = Path(__file__).resolve().parents[2]

# Llama 3.1 70B, from its config.json
V, D, F, H, KV, HD, L = 128256, 8192, 28672, 64, 8, 128, 80
N70 = 70_553_706_496
T = 4096  # tokens per micro-batch: --seq 4096 (the default), --micro-batch 1


def spec(name, **overrides):
    return load_spec(str(ROOT / "specs" / f"{name}.arch"), overrides)


def plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", "plan", *args], cwd=ROOT,
                          capture_output=True, text=True)


def find(plan, dp, tp, pp, strategy, ckpt, sp=False):
    [x] = [x for x in plan.grid.layouts if (x.dp, x.tp, x.pp, x.strategy, x.checkpointing, x.sequence_parallel)
           == (dp, tp, pp, strategy, ckpt, sp)]
    return x


@pytest.fixture(scope="module")
def llama70b():
    return spec("llama3.1-70b")


# ---------------------------------------------------------------- Llama 3.1 70B, bf16 autocast

def _block_params():
    matrices = (H + 2 * KV) * HD * D + D * D + 3 * F * D  # q/k/v, out; gate+up, down
    return matrices, 2 * D  # and two RMSNorm gains


def _block_activations_bf16(tp, sp=False):
    """One block's saved tensors for T tokens under bf16 autocast, on one GPU of tp: the fp32 residual
    into each RMSNorm and its fp32 1/rms, the bf16 copy of each norm's output that q/k/v and gate/up
    read: replicated (1/tp under sequence parallelism); q/k/v, RoPE's new q and k, the fp32 log-sum-exp
    per head, the heads' output, the MLP's gate+up, silu(gate) and the product: split by tp."""
    replicated = 2 * (T * D * 4 + T * 4 + T * D * 2)
    split = ((H + 2 * KV) * HD * T * 2 + T * H * HD * 2 + T * KV * HD * 2 + H * T * 4 + T * H * HD * 2
             + T * 2 * F * 2 + T * F * 2 + T * F * 2)
    return replicated / (tp if sp else 1) + split / tp


def test_70b_on_8_gpus_only_cpu_offload_fits_and_the_cli_names_it():
    out = plan_cli("specs/llama3.1-70b.arch", "--gpus", "8", "--gpu-memory", "80GB", "--precision", "bf16")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # notes wrap at 100 columns
    assert "layouts on 8 GPUs" in text and "the fastest that do not fit:" in text
    # fp32 weights + fp32 gradients + two fp32 moments: 16 bytes a parameter, 1,129 GB > 8 x 80 GB, so no
    # layout fits on the GPUs alone; pure DDP (all of it on every GPU) least of all
    assert 16 * N70 / 8 > 80e9
    assert "pure data parallel (dp=8, with checkpointing): ddp 1,286.2 GB (does not fit), fsdp 182.3 GB " \
           "(does not fit), offload 41.2 GB + 1,129 GB of host memory per node (fits)" in text
    assert "8 1 1 offload per block 8 41.2 yes" in text and "4 2 1 offload per block 16 26.1 yes" in text
    assert "8 1 1 ddp no 8 1,401.0 no" in text
    assert "nothing fits" not in text and "however they are split" not in text
    assert "offload: FSDP2 with CPU offload (`lmspec train --strategy fsdp --cpu-offload`; pp = 1 only)" in text
    p = make_plan(spec("llama3.1-70b"), gpus=8, gpu_memory=80e9, seq=4096, precision="bf16")
    fit = [x for x in p.grid.layouts if x.fits(80e9) == "yes"]
    assert fit and all(x.strategy == "offload" and x.pp == 1 for x in fit)
    assert all(x.total > 16 * N70 / 8 for x in p.grid.layouts if x.strategy != "offload")
    assert all(x.fits(80e9) == "no" for x in p.grid.layouts if x.strategy == "ddp" and x.dp == 8)
    assert p.grid_more is None  # nothing to look for on more GPUs
    # every dp x tp x pp = 8 with tp a power of 2 dividing 64 heads, 8 kv heads and 28672
    assert {(x.dp, x.tp, x.pp) for x in p.grid.layouts} == {
        (8, 1, 1), (4, 1, 2), (2, 1, 4), (1, 1, 8), (4, 2, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1), (1, 4, 2), (1, 8, 1)}


def test_70b_offload_dp8_memory_by_hand(llama70b):
    """dp=8 x tp=1 x pp=1, FSDP2 with CPU offload, checkpointing, on 8 x 80 GB: the GPU keeps the unsharded
    root and two blocks (bf16 weights, fp32 gradients) and the activations; the host, 16 bytes a parameter,
    sharded over the 8 GPUs of the node."""
    p = make_plan(llama70b, gpus=8, gpu_memory=80e9, seq=4096, precision="bf16")
    attention = D * H * HD + 2 * D * KV * HD + H * HD * D  # q; k and v (8 kv heads of 128); out
    mlp = 3 * D * F  # gate, up, down
    block = attention + mlp + 2 * D  # and two RMSNorm gains
    root = V * D + D + D * V  # embedding, final RMSNorm, untied head
    assert block == 855_654_400 and root == 2_101_354_496
    assert root + L * block == N70
    assert p.block_params[None] == root
    assert [v for k, v in p.block_params.items() if k is not None] == [block] * L
    x = find(p, 8, 1, 1, "offload", True)
    fsdp = find(p, 8, 1, 1, "fsdp", True)
    unsharded = root + 2 * block
    assert x.weights == pytest.approx(2 * unsharded, rel=1e-9)  # gathered in bf16
    assert x.gradients == pytest.approx(4 * unsharded, rel=1e-9)
    assert x.optimizer == 0
    assert x.activations == fsdp.activations  # checked by hand in test_70b_fsdp4_tp8_memory_by_hand
    assert x.total == pytest.approx(unsharded * (2 + 4) + fsdp.activations, rel=1e-9)
    assert x.total == pytest.approx(41.2e9, rel=1e-3) and x.total <= 0.9 * 80e9
    assert x.host == pytest.approx(16 * N70 / 8, rel=1e-9)
    assert x.host_node == pytest.approx(16 * N70 / 8 * 8, rel=1e-9)  # 1,129 GB of the node's 2 TB
    assert x.fits(80e9) == "yes"
    # time: m = 8 micro-batches each copy the fp32 shard in twice and the fp32 gradient shard out, over
    # PCIe at 50 GB/s, hidden behind the compute (as FSDP's NVLink traffic is); AdamW on the CPU is not
    m = x.micro_batches
    assert m == 8 and x.comm["pcie"] == pytest.approx(m * 12 * N70 / 8, rel=1e-9)
    assert x.comm["dp"] == fsdp.comm["dp"] and x.times["dp"] == 0
    assert x.times["offload"] == pytest.approx(28 * N70 / 8 / 20e9, rel=1e-9)
    assert x.step_s == pytest.approx(fsdp.step_s + 28 * N70 / 8 / 20e9, rel=1e-9)
    data = json.loads(plan_cli("specs/llama3.1-70b.arch", "--gpus", "8", "--precision", "bf16",
                               "--format", "json").stdout)["layouts"]
    [j] = [j for j in data["all"] if (j["dp"], j["tp"], j["pp"], j["data_parallel"], j["activation_checkpointing"])
           == (8, 1, 1, "offload", True)]
    assert j["host_memory_bytes"] == {"per_gpu": x.host, "per_node": x.host_node}
    assert j["fits"] == "yes" and j["comm_bytes_per_gpu_per_step"]["pcie"] == x.comm["pcie"]
    assert data["assumptions"]["host_memory_per_node"] == 2e12 and data["assumptions"]["pcie_bandwidth"] == 50e9


def test_70b_offload_does_not_fit_a_small_host():
    out = plan_cli("specs/llama3.1-70b.arch", "--gpus", "8", "--gpu-memory", "80GB", "--precision", "bf16",
                   "--host-memory", "512GB")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "none fits in 80 GB" in text
    assert "offload 41.2 GB + 1,129 GB of host memory per node (does not fit)" in text
    assert "nothing fits on 8 GPUs" in text and "141.1 GB per GPU however they are split, and offloaded to " \
        "host memory (offload layouts) they take 1,129 GB per node at least, more than 90% of its 512 GB " \
        "(--host-memory)" in text
    assert "The fewest GPUs (doubling) on which a layout fits: 32" in text
    p = make_plan(spec("llama3.1-70b"), gpus=8, gpu_memory=80e9, seq=4096, precision="bf16", host_memory=512e9)
    offload = [x for x in p.grid.layouts if x.strategy == "offload"]
    assert offload and all(x.fits(80e9) == "no" for x in offload)
    assert p.grid_more[0] == 32 and p.grid_more[1].fits(80e9) == "yes"


def test_offload_only_without_pipeline_and_with_replicas():
    for name, gpus in (("tiny", 8), ("tiny", 1), ("llama3.1-70b", 32)):
        p = make_plan(spec(name), gpus=gpus, seq=128, precision="bf16")
        offload = [x for x in p.grid.layouts if x.strategy == "offload"]
        assert all(x.pp == 1 and x.dp > 1 for x in offload)
        assert {(x.dp, x.tp) for x in offload} == {(x.dp, x.tp) for x in p.grid.layouts
                                                   if x.strategy == "fsdp" and x.pp == 1}
        assert all(x.host == 0 and x.host_node == 0 and x.comm["pcie"] == 0 for x in p.grid.layouts
                   if x.strategy != "offload")
    assert not [x for x in make_plan(spec("tiny"), gpus=1, seq=128).grid.layouts if x.strategy == "offload"]
    # --strategy ddp leaves it out, fsdp brings it (it is FSDP, with --cpu-offload)
    for strategy, expected in (("ddp", {"ddp"}), ("fsdp", {"fsdp", "offload"}), ("both", {"ddp", "fsdp", "offload"})):
        data = json.loads(_run(strategy=strategy))["layouts"]
        assert {x["data_parallel"] for x in data["all"]} == expected


def test_70b_on_32_gpus_names_layouts_that_fit(llama70b):
    out = plan_cli("specs/llama3.1-70b.arch", "--gpus", "32", "--gpu-memory", "80GB", "--precision", "bf16",
                   "--format", "json")
    data = json.loads(out.stdout)["layouts"]
    fit = [x for x in data["all"] if x["fits"] == "yes"]
    assert len(fit) >= 5
    assert {"dp": 1, "tp": 8, "pp": 4, "data_parallel": "ddp", "activation_checkpointing": True}.items() <= \
        next(x for x in fit if (x["tp"], x["pp"]) == (8, 4)).items()
    pure = [x for x in data["all"] if x["dp"] == 32 and x["data_parallel"] == "ddp"]
    assert pure and all(x["fits"] == "no" for x in pure)
    assert [x["step_seconds"] for x in data["all"]] == sorted(x["step_seconds"] for x in data["all"])
    assert data["assumptions"]["nvlink_bandwidth"] == 450e9 and data["assumptions"]["network_bandwidth"] == 50e9


def test_70b_tp8_pp4_memory_by_hand(llama70b):
    """dp=1 x tp=8 x pp=4 on 32 GPUs, DDP (nothing to shard), 1F1B: stage 0 is the worst GPU: 20 blocks
    and the vocab-parallel embedding, 4 micro-batches in flight."""
    p = make_plan(llama70b, gpus=32, gpu_memory=80e9, seq=4096, precision="bf16")
    assert p.grid.global_batch == 8 * 32  # default: 8 micro-batches of 1 sequence per GPU
    matrices, norms = _block_params()
    assert 80 * (matrices + norms) + 2 * V * D + D == N70
    params = V * D / 8 + 20 * (matrices / 8 + norms)
    copies = 20 * matrices / 8  # autocast's bf16 copies: the matrices, not the embedding nor the gains
    for ckpt in (False, True):
        x = find(p, 1, 8, 4, "ddp", ckpt)
        assert x.micro_batches == 256 and x.stage == 0
        assert x.weights == pytest.approx(4 * params + 2 * copies)
        assert x.gradients == pytest.approx(4 * params)
        assert x.optimizer == pytest.approx(8 * params)
        tokens = T * 8  # the embedding keeps the i64 token ids
        if ckpt:  # 4 x (ids + 20 block inputs, the fp32 residual) + one block recomputed
            acts = 4 * (tokens + 20 * T * D * 4) + _block_activations_bf16(8)
        else:
            acts = 4 * (tokens + 20 * _block_activations_bf16(8))
        assert x.activations == pytest.approx(acts)
        assert x.bubble == pytest.approx(3 / (256 + 3))
    x = find(p, 1, 8, 4, "ddp", True)
    assert x.total == pytest.approx(51.9e9, rel=1e-3) and x.fits(80e9) == "yes"


def test_70b_fsdp4_tp8_memory_by_hand(llama70b):
    """dp=4 (FSDP) x tp=8 x pp=1 on 32 GPUs with checkpointing: 1/4 of the tp-split state, plus the
    unsharded root (embedding/8, head/8, final norm) and two blocks, one micro-batch at a time."""
    p = make_plan(llama70b, gpus=32, gpu_memory=80e9, seq=4096, precision="bf16")
    x = find(p, 4, 8, 1, "fsdp", True)
    matrices, norms = _block_params()
    block = matrices / 8 + norms
    root = 2 * V * D / 8 + D
    params = root + 80 * block
    unsharded = root + 2 * block
    assert x.weights == pytest.approx(4 * params / 4 + 2 * unsharded)  # gathered in bf16
    assert x.gradients == pytest.approx(4 * params / 4 + 4 * unsharded)
    assert x.optimizer == pytest.approx(8 * params / 4)
    outside = T * 8 + (T * D * 4 + T * 4) + T * D * 2  # ids; final norm's x and 1/rms; the head's bf16 input
    logits = T * V * 2 / 8  # vocab-parallel: each GPU has 1/8 of the vocabulary
    loss = (T * V * 4 + T * 8) / 8 + 2 * T * V * 4 / 8
    acts = outside + 80 * T * D * 4 + logits + max(loss, _block_activations_bf16(8))
    assert x.activations == pytest.approx(acts)
    assert x.fits(80e9) == "yes" and x.micro_batches == 8 * 32 // 4


def test_sequence_parallel_splits_the_boundary_and_sends_the_same_bytes(llama70b):
    plain = make_plan(llama70b, gpus=32, seq=4096, precision="bf16")
    sp = make_plan(llama70b, gpus=32, seq=4096, precision="bf16", sequence_parallel=True)
    a, b = find(plain, 1, 8, 4, "ddp", False), find(sp, 1, 8, 4, "ddp", False, sp=True)
    assert b.activations == pytest.approx(4 * (T * 8 + 20 * _block_activations_bf16(8, sp=True)))
    assert b.comm["tp"] == a.comm["tp"] and b.comm["pp"] == a.comm["pp"] / 8
    assert (b.weights, b.gradients, b.optimizer) == (a.weights, a.gradients, a.optimizer)


def test_gpipe_keeps_every_micro_batch(llama70b):
    f1b = find(make_plan(llama70b, gpus=32, seq=4096, precision="bf16"), 1, 8, 4, "ddp", True)
    gpipe = find(make_plan(llama70b, gpus=32, seq=4096, precision="bf16", schedule="gpipe"), 1, 8, 4, "ddp", True)
    # the last stage is now the worst: all 256 micro-batches' block inputs, final norm, head input,
    # 1/8 of the logits and of the log-probabilities wait for the backward passes
    assert (f1b.stage, gpipe.stage) == (0, 3)
    outside = (T * D * 4 + T * 4) + T * D * 2
    logits, kept, grads = T * V * 2 / 8, (T * V * 4 + T * 8) / 8, 2 * T * V * 4 / 8
    assert gpipe.activations == pytest.approx(256 * (20 * T * D * 4 + outside + logits) + 255 * kept
                                              + max(kept + grads, _block_activations_bf16(8)))
    assert gpipe.bubble == f1b.bubble and gpipe.step_s == f1b.step_s


# ---------------------------------------------------------------- which layouts are offered

@pytest.mark.parametrize("name, overrides, allowed", [
    ("gpt2", dict(heads=6, dim=384, layers=4, context=256, vocab=512), {1, 2}),  # 6 heads: not 4 nor 8
    ("llama3.2-1b", dict(kv_heads=2, layers=4), {1, 2}),  # 2 kv heads
    ("gpt2", dict(heads=16, dim=512, layers=4, context=256, vocab=512), {1, 2, 4, 8}),
])
def test_tp_divides_heads_and_kv_heads(name, overrides, allowed):
    p = make_plan(spec(name, **overrides), gpus=16, seq=256)
    assert {x.tp for x in p.grid.layouts} == allowed  # and never more than a node's 8
    assert all(x.dp * x.tp * x.pp == 16 and x.pp <= 4 for x in p.grid.layouts)
    assert all(x.micro_batches >= x.pp for x in p.grid.layouts)


def test_pure_data_parallel_layouts_are_the_ddp_and_fsdp_rows():
    for name in ("gpt2", "llama3.1-8b"):
        for precision in ("fp32", "bf16"):
            p = make_plan(spec(name), gpus=8, seq=512, precision=precision)
            rows = {(r.strategy, r.checkpointing): r for r in p.rows}
            for ckpt in (False, True):
                for strategy in ("ddp", "fsdp"):
                    x, r = find(p, 8, 1, 1, strategy, ckpt), rows[strategy, ckpt]
                    assert (x.weights, x.gradients, x.optimizer, x.activations) == \
                        (r.weights, r.gradients, r.optimizer, r.activations)


# ---------------------------------------------------------------- traffic and time on a tiny spec

def test_tiny_communication_by_hand():
    """specs/tiny.arch, fp32, 8 GPUs as dp=2 x tp=2 x pp=2, 128 tokens a micro-batch, global batch 64
    sequences: 32 micro-batches per pipeline. vocab 128, dim 128, 4 layers (2 a stage), head tied to wte."""
    v, d, t = 128, 128, 128
    p = make_plan(spec("tiny"), gpus=8, seq=128)
    m = 32
    residual = t * d * 4  # fp32 [micro-batch, seq, dim]
    # per block: ln_1, ln_2 (weight, bias) replicated; q/k/v (+bias), fc (+bias), out, down split by 2;
    # out's and down's biases replicated (row-parallel)
    block = 4 * d + (3 * d * d + 3 * d + d * d + 4 * d * d + 4 * d + 4 * d * d) / 2 + 2 * d
    stage0 = v * d / 2 + 128 * d + 2 * block  # vocab-parallel wte, replicated wpe
    stage1 = 2 * block + 2 * d + v * d / 2  # ln_f, the tied head's own copy of wte
    assert stage0 > stage1
    for strategy in ("ddp", "fsdp"):
        x = find(p, 2, 2, 2, strategy, False)
        assert x.micro_batches == m
        # tp: 4 all-reduces per block + 1 for the embedding (stage 0) or the head (stage 1), each sending
        # 2 (tp-1)/tp = 1 x the tensor; pp: one residual a micro-batch (forward on 0, backward on 1)
        assert x.comm["tp"] == m * (4 * 2 + 1) * 1 * residual
        assert x.comm["pp"] == m * residual
        if strategy == "ddp":  # all-reduce fp32 gradients once a step: 2 (dp-1)/dp of them
            assert x.comm["dp"] == pytest.approx(2 * (1 / 2) * 4 * stage0)
        else:  # per micro-batch: all-gather fp32 weights forward and backward, reduce-scatter fp32 grads
            assert x.comm["dp"] == pytest.approx(m * (1 / 2) * stage0 * (4 + 4 + 4))
        assert x.bubble == pytest.approx(1 / 33)
        assert x.links == {"dp": "nvlink", "pp": "nvlink"}
    # on 4 nodes of 2 GPUs each: tp x dp = 4 crosses nodes, and so does the pipeline
    q = make_plan(spec("tiny"), gpus=8, seq=128, gpus_per_node=2)
    assert find(q, 2, 2, 2, "ddp", False).links == {"dp": "network", "pp": "network"}
    assert {x.tp for x in q.grid.layouts} == {1, 2}


def test_step_time_is_the_pipeline_plus_what_traffic_adds():
    g = spec("tiny")
    slow = make_plan(g, gpus=4, seq=128, nvlink_bandwidth=1e9)
    fast = make_plan(g, gpus=4, seq=128, nvlink_bandwidth=1e15)
    a, b = find(slow, 1, 1, 4, "ddp", False), find(fast, 1, 1, 4, "ddp", False)
    # only pp traffic here, per micro-batch on the critical path: (m + pp - 1) x (sent per micro-batch / bw)
    m, pp = a.micro_batches, 4
    assert m == 32 and a.bubble == pytest.approx(3 / 35)
    per_mb = a.comm["pp"] / m
    # (the slowest stage is an inner one, sending 2 a micro-batch, with slow links, and the last, which
    # computes the head, with fast ones: the two differ by a stage's compute difference, tiny here)
    assert a.step_s - b.step_s == pytest.approx((m + pp - 1) * per_mb * (1 / 1e9 - 1 / 1e15), rel=1e-3)
    assert per_mb == 2 * 128 * 128 * 4
    # no pipeline, no tp: the step is the compute (DDP's all-reduce hides behind the last backward)
    c = find(fast, 4, 1, 1, "ddp", False)
    assert c.step_s == pytest.approx(c.compute_s) and c.bubble == 0
    # compute at the MFU: the step's training FLOPs spread over the GPUs, when nothing else is in the way
    flops = 32 * 128 * fast.training_flops_per_token
    assert c.compute_s == pytest.approx(flops / (4 * 989e12 * 0.4), rel=1e-6)
    # checkpointing recomputes the blocks' forward: more time
    assert find(fast, 4, 1, 1, "ddp", True).step_s > c.step_s


# ---------------------------------------------------------------- the CLI's options

def _args(**extra):
    """`lmspec plan specs/tiny.arch --gpus 8 --format json` parsed, with `name=value` as `--name value`
    (True: the flag alone)."""
    from lmspec.runtime.cli.main import parser

    options = {"gpus": 8, "format": "json", **extra}
    argv = [str(ROOT / "specs" / "tiny.arch")]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return parser().parse_args(["plan", *argv])


def _run(**extra):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cmd_plan(_args(**extra)) == 0
    return buf.getvalue()


def test_layout_options_reach_the_plan():
    data = json.loads(_run(global_batch=16, schedule="gpipe", sequence_parallel=True, gpus_per_node=4,
                           nvlink_bandwidth="900GB/s", network_bandwidth="25GB/s"))["layouts"]
    assert data["assumptions"] | {} == {**data["assumptions"], "global_batch": 16, "schedule": "gpipe",
                                        "gpus_per_node": 4, "max_tp": 4, "nvlink_bandwidth": 900e9,
                                        "network_bandwidth": 25e9}
    assert all(x["sequence_parallel"] == (x["tp"] > 1) for x in data["all"])
    assert all(x["micro_batches"] * x["dp"] == 16 for x in data["all"])
    text = " ".join(_run(format="human", layouts=3).split())
    assert "layouts on 8 GPUs (8 per node)" in text and "450 GB/s" in text and "50 GB/s between nodes" in text
    assert "... and " in text


def test_layout_options_default_to_eight_sequences_per_gpu_and_1f1b():
    data = json.loads(_run())["layouts"]
    assert data["assumptions"]["global_batch"] == 64 and data["assumptions"]["schedule"] == "1f1b"


def test_a_huge_gpu_count_plans_at_once():
    # a pipeline stage holds at least one block: the layouts are not searched up to the GPU count
    data = json.loads(_run(gpus=2**40, layouts=0))["layouts"]
    assert max(x["pp"] for x in data["all"]) == 4  # tiny.arch has four blocks


@pytest.mark.parametrize("option, value, message", [
    ("--global-batch", "0", "argument --global-batch: must be an integer >= 1, got 0"),
    ("--nvlink-bandwidth", "fast", "argument --nvlink-bandwidth: 'fast' is not a bandwidth: e.g. 450GB/s"),
    ("--gpus-per-node", "0", "argument --gpus-per-node: must be an integer >= 1, got 0"),
    ("--host-memory", "lots", "argument --host-memory: 'lots' is not a memory size"),
    ("--pcie-bandwidth", "0GB/s", "argument --pcie-bandwidth: must be positive, got 0GB/s"),
    ("--layouts", "-1", "argument --layouts: must be an integer >= 0, got -1"),
])
def test_layout_option_errors(option, value, message):
    out = plan_cli("specs/tiny.arch", option, value)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith(f"lmspec plan: error: {message}"), out.stderr
    assert "Traceback" not in out.stderr
