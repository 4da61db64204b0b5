"""`lmspec import hf` and `lmspec export hf`: Hugging Face model directories in and out.

Small random models built with transformers are imported through the real command line, then
compared with transformers itself: logits, greedy continuations, and the tensors written back."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from runtime_helpers import SHARED_DATA, TESTS_DIR  # noqa: E402
from lmspec.compiler.lower import lower  # noqa: E402
from lmspec.runtime.checkpoint.store import load_checkpoint  # noqa: E402
from lmspec.runtime.cli.main import main  # noqa: E402
from lmspec.compiler.rewrites import graph_from_record  # noqa: E402
from lmspec.runtime.export.from_checkpoint import export_bundle  # noqa: E402
from lmspec.runtime.train.sampling import generate  # noqa: E402

REPO = TESTS_DIR.parent
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
GPT2_SPEC = str(REPO / "specs" / "gpt2.arch")
GPT2_SETTINGS = ("--set", "layers=2", "--set", "dim=64", "--set", "heads=4", "--set", "context=128")


def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _word_tokenizer(path: Path, size: int) -> None:
    """A tokenizers JSON file with `size` word tokens (t0 ... t<size-1>): enough for the runtime."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _run(*args) -> int:
    return main([str(a) for a in args])


def _load(checkpoint: Path):
    ckpt = load_checkpoint(checkpoint)
    model = lower(graph_from_record(ckpt.spec))
    ckpt.load_model(model)
    return model.eval()


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory, streamed_import):
    """A random GPT-2 (2 layers, dim 64, GPT-2's vocabulary) saved by transformers with GPT-2's
    tokenizer files beside it: (directory, the transformers model)."""
    if not (GPT2_TOKENIZER / "encoder.json").is_file():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_TOKENIZER}")
    _quiet_transformers()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # wider than the default init, so that greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    directory = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(GPT2_TOKENIZER / name, directory / name)
    return directory, model


@pytest.fixture(scope="module")
def imported(hf_gpt2, tmp_path_factory) -> Path:
    directory, _ = hf_gpt2
    out = tmp_path_factory.mktemp("imported") / "run"
    assert _run("import", "hf", directory, "--spec", GPT2_SPEC, *GPT2_SETTINGS, "-o", out) == 0
    return out


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(load_checkpoint(checkpoint).path / "model.safetensors"))


def test_logits_and_greedy_continuation_match_transformers(hf_gpt2, imported):
    _, hf = hf_gpt2
    model = _load(imported)
    tokens = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4

    prompt = [15496, 11, 995, 13]  # "Hello, world."
    ours = generate(model, prompt, 32, temperature=0)
    hf.generation_config.eos_token_id = None  # run all 32 tokens, as ours does without an eot_id
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, attention_mask=None)
    assert ours == theirs[0, len(prompt):].tolist()

    meta = json.loads((load_checkpoint(imported).path / "meta.json").read_text())
    assert meta["hf"]["model_type"] == "gpt2" and json.loads(meta["tokenizer"])["kind"] == "hf"


def test_sharded_checkpoint_imports_identically(hf_gpt2, imported, tmp_path):
    directory, hf = hf_gpt2
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    out = tmp_path / "run"
    assert _run("import", "hf", sharded, "--spec", GPT2_SPEC, *GPT2_SETTINGS, "-o", out,
                "--tokenizer", GPT2_TOKENIZER) == 0
    a, b = _weights(imported), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_is_bit_identical_and_loads_in_transformers(hf_gpt2, imported, tmp_path, capsys):
    directory, hf = hf_gpt2
    out = tmp_path / "exported"
    assert _run("export", "hf", imported, "-o", out) == 0
    original = load_file(str(directory / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert original.keys() == written.keys()
    assert all(original[k].dtype == written[k].dtype and torch.equal(original[k], written[k]) for k in original)
    assert json.loads((out / "config.json").read_text()) == json.loads((directory / "config.json").read_text())

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.tensor([[15496, 11, 995, 13, 50256, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hello, world.<|endoftext|>")["input_ids"] == [15496, 11, 995, 13, 50256]

    capsys.readouterr()
    assert _run("export", "hf", imported, "-o", out) == 2  # never over an existing directory
    assert "not empty" in capsys.readouterr().err
    assert _run("export", "hf", imported, "-o", tmp_path / "x", "--opset", "18") == 2


def test_bfloat16_file_without_transformer_prefix_round_trips(hf_gpt2, tmp_path):
    """Hub GPT-2 files converted from OpenAI's have no `transformer.` prefix; most hub models are bf16."""
    directory, _ = hf_gpt2
    bare = tmp_path / "bare"
    shutil.copytree(directory, bare)
    original = load_file(str(directory / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v.to(torch.bfloat16) for k, v in original.items()},
              str(bare / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    assert _run("import", "hf", bare, "--spec", GPT2_SPEC, *GPT2_SETTINGS, "-o", out) == 0
    assert {t.dtype for t in _weights(out).values()} == {torch.bfloat16}
    _load(out)  # a bf16 checkpoint loads into the fp32 model
    exported = tmp_path / "exported"
    assert _run("export", "hf", out, "-o", exported) == 0
    written = load_file(str(exported / "model.safetensors"))
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k].to(torch.bfloat16)) for k in original)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_config_that_disagrees_with_the_spec_is_refused(hf_gpt2, tmp_path, capsys):
    directory, _ = hf_gpt2
    capsys.readouterr()
    assert _run("import", "hf", directory, "--spec", GPT2_SPEC, *GPT2_SETTINGS, "--set", "layers=3",
                "-o", tmp_path / "run") == 1
    line = _error_line(capsys)
    assert "n_layer = 2" in line and "layers = 3" in line
    assert not (tmp_path / "run").exists()


def test_tensor_shape_that_disagrees_with_the_spec_is_refused(hf_gpt2, tmp_path, capsys):
    directory, _ = hf_gpt2
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 255)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert _run("import", "hf", broken, "--spec", GPT2_SPEC, *GPT2_SETTINGS, "-o", tmp_path / "run") == 1
    line = _error_line(capsys)
    assert "transformer.h.1.mlp.c_fc.weight" in line and "[64, 255]" in line and "[64, 256]" in line


def test_unreadable_inputs_are_one_line_errors(hf_gpt2, tmp_path, capsys):
    directory, _ = hf_gpt2
    cases = {}
    cases["missing dir"] = tmp_path / "nowhere"
    no_config = tmp_path / "no_config"
    shutil.copytree(directory, no_config)
    (no_config / "config.json").unlink()
    cases["config.json"] = no_config
    corrupt = tmp_path / "corrupt"
    shutil.copytree(directory, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["corrupt"] = corrupt
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(directory, no_tokenizer)
    for name in ("encoder.json", "vocab.bpe"):
        (no_tokenizer / name).unlink()
    cases["--tokenizer"] = no_tokenizer
    for expected, path in cases.items():
        capsys.readouterr()
        assert _run("import", "hf", path, "--spec", GPT2_SPEC, *GPT2_SETTINGS, "-o", tmp_path / "run") == 1, expected
        line = _error_line(capsys)
        assert str(path) in line or expected in line, line
        assert not (tmp_path / "run").exists()
    # the same directory with a tokenizer named on the command line imports
    assert _run("import", "hf", no_tokenizer, "--spec", GPT2_SPEC, *GPT2_SETTINGS, "-o", tmp_path / "run",
                "--tokenizer", GPT2_TOKENIZER) == 0
    capsys.readouterr()
    assert _run("import", "hf", no_tokenizer, "--spec", GPT2_SPEC, *GPT2_SETTINGS, "-o", tmp_path / "run",
                "--tokenizer", GPT2_TOKENIZER) == 2  # never into an existing checkpoint
    assert "not empty" in capsys.readouterr().err


def test_emit_spec_writes_a_checked_spec_that_imports_identically(hf_gpt2, imported, tmp_path, capsys):
    directory, _ = hf_gpt2
    spec = tmp_path / "gpt2-tiny.arch"
    out = tmp_path / "run"
    assert _run("import", "hf", directory, "--emit-spec", spec, "-o", out) == 0
    text = spec.read_text()
    assert "layers = 2" in text and "dim = 64" in text and "model gpt2_tiny {" in text
    assert _run("check", spec) == 0
    a, b = _weights(imported), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # its map beside it, the family's: the two import again with --spec and --map
    assert (tmp_path / "gpt2-tiny.toml").read_text() == (REPO / "runtime/hf/maps/gpt2.toml").read_text()
    assert _run("import", "hf", directory, "--spec", spec, "--map", tmp_path / "gpt2-tiny.toml", "-o",
                tmp_path / "by-map") == 0
    c = _weights(tmp_path / "by-map")
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    capsys.readouterr()
    assert _run("import", "hf", directory, "--spec", GPT2_SPEC, "--emit-spec", spec, "-o", tmp_path / "r2") == 2


def test_emit_spec_writes_the_activation_and_eps_config_json_names(hf_gpt2, tmp_path):
    """A GPT-2 with the exact GELU and another eps (as `export hf` writes a spec with act=gelu): the
    emitted spec says so, and computes what transformers computes with that config."""
    directory, _ = hf_gpt2
    variant = tmp_path / "gpt2-gelu"
    shutil.copytree(directory, variant)
    config = json.loads((variant / "config.json").read_text())
    config.update(activation_function="gelu", layer_norm_epsilon=1e-3)
    (variant / "config.json").write_text(json.dumps(config))
    spec, out = tmp_path / "gpt2-gelu.arch", tmp_path / "run"
    assert _run("import", "hf", variant, "--emit-spec", spec, "-o", out) == 0
    text = spec.read_text()
    assert "act=gelu)" in text and "eps = 0.001" in text
    hf = transformers.GPT2LMHeadModel.from_pretrained(variant).eval()
    assert_matches_transformers(_load(out), hf, 8)
    # an activation the map has no spec value for is refused, naming the ones it knows
    config.update(activation_function="gelu_fast")
    (variant / "config.json").write_text(json.dumps(config))
    assert _run("import", "hf", variant, "--emit-spec", tmp_path / "x.arch", "-o", tmp_path / "x") == 1
    assert not (tmp_path / "x.arch").exists()


# -------------------------------------------------------------- Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE

QWEN2_SPEC = """\
model qwen2_tiny {
  vocab = 1000; context = 256; dim = 64; layers = 2; heads = 4; kv_heads = 2
  ffn = 96; eps = 1e-6; theta = 1000000.0

  input tokens: i64[batch, seq <= context]

  x = embedding(tokens, vocab, dim) as embed
  repeat layers as block {
    x = x + attention(rmsnorm(x, eps) as attn_norm, heads, kv_heads=kv_heads, bias=true, out_bias=false,
                      rope=true, rope_theta=theta) as attn
    x = x + mlp(rmsnorm(x, eps) as mlp_norm, ffn, act=silu, gated=true, bias=false) as mlp
  }
  logits = linear(rmsnorm(x, eps) as norm, vocab, bias=false) as lm_head
  output logits: f32[batch, seq, vocab]
}
"""

_BASE = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
FAMILY_CASES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", "specs/llama3.2-1b.arch",
               dict(head_dim=16, tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", "specs/mistral-7b.arch",
                dict(head_dim=16, sliding_window=8, rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", None, dict(rope_theta=1e6, rms_norm_eps=1e-6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "specs/qwen3-0.6b.arch",
              dict(head_dim=16, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "specs/qwen3-moe-tiny.arch",
                  dict(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                       norm_topk_prob=True, rope_theta=1e6, intermediate_size=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "specs/phi3-mini-4k.arch",
             dict(sliding_window=16, rms_norm_eps=1e-5, pad_token_id=0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", "specs/granite-3.0-2b.arch",
                dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                     logits_scaling=8.0, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", "specs/starcoder2-3b.arch",
                   dict(sliding_window=16, norm_epsilon=1e-5, use_bias=True, tie_word_embeddings=True)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", "specs/stablelm-2-1.6b.arch",
                 dict(use_qkv_bias=True, layer_norm_eps=1e-5, partial_rotary_factor=0.25)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "specs/gemma-2b.arch",
              dict(head_dim=16, num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", "specs/olmo-1b.arch", dict(tie_word_embeddings=True, pad_token_id=0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "specs/gemma3-1b.arch",
               dict(head_dim=16, num_key_value_heads=1, sliding_window=4, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention"],  # Gemma 3's pattern, in two layers
                    rope_local_base_freq=10000.0, rope_theta=1000000.0, pad_token_id=0)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", "specs/smollm3-3b.arch",
                dict(num_hidden_layers=4, rope_theta=2000000.0, pad_token_id=0)),  # layer 3 without RoPE
}


def assert_matches_transformers(model, hf, new_tokens: int) -> torch.Tensor:
    """The imported `model` against the transformers one: logits within 1e-4 on random tokens (returned),
    and the same greedy continuation of their first 8, lmspec's with the KV cache."""
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
        prompt = tokens[0, :8]
        want = hf.generate(prompt[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
    assert generate(model, prompt.tolist(), new_tokens, temperature=0) == want[0, 8:].tolist()
    return tokens


def _settings_for(directory: Path, spec: str) -> list[str]:
    """--set options that size the shipped spec like config.json (the import then checks them all)."""
    from lmspec.compiler import load_spec
    from lmspec.runtime.hf.config import family_of, hyper_from_config
    from lmspec.runtime.hf.families import spec_literal

    config = json.loads((directory / "config.json").read_text())
    _, family = family_of(config)
    hyper = load_spec(spec).hyper
    out = []
    for name, (value, _) in hyper_from_config(family, config).items():
        if name in hyper and value is not None:
            out += ["--set", f"{name}={spec_literal(value)}"]
    return out


# qwen2 (biases on q/k/v) and mistral (a window) differ from llama3 in one option each, qwen3's QK-norm
# is in qwen3_moe too, phi3 is llama's layout with a window, stablelm's LayerNorm and biases are in
# starcoder2, gemma's norms, embedding scale and GeGLU are in gemma3, granite's multipliers are spec
# arithmetic tested elsewhere, smollm3's NoPE layers are gemma3's per-layer options, and qwen3_moe's
# experts are checked against a reference in tests/compiler; starcoder2's LayerNorm, biases and tanh
# GELU are GPT-2's (above, and tests/runtime/export/test_gguf.py) with mistral's window: slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow)
                                  if c in ("qwen2", "mistral", "qwen3", "phi3", "stablelm", "gemma", "granite",
                                           "smollm3", "qwen3_moe", "starcoder2") else c
                                  for c in FAMILY_CASES])
def test_llama_family_imports_match_transformers_and_round_trip(case, tmp_path):
    config_class, model_class, spec, extra = FAMILY_CASES[case]
    if spec is None:
        spec = tmp_path / "qwen2.arch"
        spec.write_text(QWEN2_SPEC)
    elif not (REPO / spec).is_file():
        pytest.skip(f"{spec} not found")
    spec = str(REPO / spec)
    _quiet_transformers()
    torch.manual_seed(0)
    settings = {k: v for k, v in {**_BASE, **extra}.items() if v is not None}
    hf = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
    directory = tmp_path / case
    hf.save_pretrained(directory, safe_serialization=True)
    _word_tokenizer(directory / "tokenizer.json", 1000)
    out = tmp_path / "run"
    assert _run("import", "hf", directory, "--spec", spec, *_settings_for(directory, spec), "-o", out) == 0
    model = _load(out)
    tokens = assert_matches_transformers(model, hf, 32)

    # The spec written from config.json imports the same weights.
    emitted = tmp_path / "emitted.arch"
    assert _run("import", "hf", directory, "--emit-spec", emitted, "-o", tmp_path / "run-emitted") == 0
    a, b = _weights(out), _weights(tmp_path / "run-emitted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # ONNX export of the imported checkpoint passes its parity check (empty and filled cache).
    meta = export_bundle(str(out), str(tmp_path / "onnx" / "model.onnx"), log=lambda *_: None)
    assert max(meta["parity"]["fp32"].values()) <= 1e-4

    exported = tmp_path / "exported"
    assert _run("export", "hf", out, "-o", exported) == 0
    original = load_file(str(directory / "model.safetensors"))
    written = load_file(str(exported / "model.safetensors"))
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)
    reloaded = getattr(transformers, model_class).from_pretrained(exported).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)

    if case == "qwen3_moe":  # transformers' in-memory layout: experts fused into 3-D tensors
        state = hf.state_dict()
        assert "model.layers.0.mlp.experts.gate_up_proj" in state
        fused = tmp_path / "fused"
        shutil.copytree(directory, fused)
        (fused / "model.safetensors").unlink()
        save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"),
                  metadata={"format": "pt"})
        again = tmp_path / "run-fused"
        assert _run("import", "hf", fused, "--spec", spec, *_settings_for(directory, spec), "-o", again) == 0
        a, b = _weights(out), _weights(again)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, safetensors, tokenizers                     # imported before measuring
    import lmspec.compiler.loader, lmspec.runtime.cli.train, lmspec.runtime.hf.convert
    import lmspec.runtime.checkpoint.store, lmspec.runtime.data.tokenizer  # what the verb imports when it runs
    from lmspec.runtime.cli.main import main

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    try:  # reset the peak to the current size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = status("VmRSS")
    rc = main(sys.argv[1:])
    print(json.dumps({"rc": rc, "before": before, "peak": status("VmHWM"), "reset": reset}))
""")


@pytest.fixture(scope="module")
def streamed_import(tmp_path_factory):
    """A ~100 MB random GPT-2-shaped model imported in a subprocess that reports its peak memory.
    Started before the other tests of this module (hf_gpt2 asks for it), so that it runs beside them."""
    if not Path("/proc/self/status").is_file():
        yield None
        return
    dim, layers, vocab, context = 512, 8, 512, 128
    root = tmp_path_factory.mktemp("streamed")
    directory = root / "big"
    directory.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {"transformer.wte.weight": (vocab, dim), "transformer.wpe.weight": (context, dim),
               "transformer.ln_f.weight": (dim,), "transformer.ln_f.bias": (dim,)}
    for i in range(layers):
        h = f"transformer.h.{i}."
        tensors.update({h + "ln_1.weight": (dim,), h + "ln_1.bias": (dim,), h + "ln_2.weight": (dim,),
                        h + "ln_2.bias": (dim,), h + "attn.c_attn.weight": (dim, 3 * dim),
                        h + "attn.c_attn.bias": (3 * dim,), h + "attn.c_proj.weight": (dim, dim),
                        h + "attn.c_proj.bias": (dim,), h + "mlp.c_fc.weight": (dim, 4 * dim),
                        h + "mlp.c_fc.bias": (4 * dim,), h + "mlp.c_proj.weight": (4 * dim, dim),
                        h + "mlp.c_proj.bias": (dim,)})
    save_file({k: torch.empty(shape).uniform_(-1, 1, generator=gen) for k, shape in tensors.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": vocab, "n_positions": context, "n_embd": dim, "n_head": 8,
        "n_layer": layers}))
    _word_tokenizer(directory / "tokenizer.json", vocab)
    process = subprocess.Popen(
        [sys.executable, "-c", MEMORY_SCRIPT, "import", "hf", str(directory), "--spec", GPT2_SPEC,
         "--set", f"vocab={vocab}", "--set", f"context={context}", "--set", f"dim={dim}", "--set", "heads=8",
         "--set", f"layers={layers}", "-o", str(root / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    yield process, (directory / "model.safetensors").stat().st_size
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_import_streams_without_holding_the_model(streamed_import):
    if streamed_import is None:
        pytest.skip("needs /proc/self/status")
    process, size = streamed_import
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    growth = report["peak"] - report["before"]
    print(f"model {size / 2**20:.0f} MiB, peak RSS growth {growth / 2**20:.1f} MiB "
          f"({'reset' if report['reset'] else 'not reset'} before the import)")
    assert size > 90 * 2**20
    assert growth < 0.5 * size  # one output tensor at a time, not a copy of the model


# Shipped specs of one published size each, with that model's config.json values.
PUBLISHED = {
    "specs/phi3-mini-4k.arch": ("Phi3Config", "Phi3ForCausalLM", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, sliding_window=2047, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    "specs/granite-3.0-2b.arch": ("GraniteConfig", "GraniteForCausalLM", dict(
        vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0)),
    "specs/starcoder2-3b.arch": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(
        vocab_size=49152, hidden_size=3072, intermediate_size=12288, num_hidden_layers=30, num_attention_heads=24,
        num_key_value_heads=2, max_position_embeddings=16384, rope_theta=999999.4420358813, sliding_window=4096,
        norm_epsilon=1e-5, use_bias=True, tie_word_embeddings=True)),
    "specs/stablelm-2-1.6b.arch": ("StableLmConfig", "StableLmForCausalLM", dict(
        vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0, partial_rotary_factor=0.25,
        layer_norm_eps=1e-5, use_qkv_bias=True, tie_word_embeddings=False)),
    "specs/gemma-2b.arch": ("GemmaConfig", "GemmaForCausalLM", dict(
        vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    "specs/olmo-1b.arch": ("OlmoConfig", "OlmoForCausalLM", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=True)),
    "specs/gemma3-1b.arch": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, sliding_window=512, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    "specs/smollm3-3b.arch": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=65536, rope_theta=5000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
}


@pytest.mark.parametrize("spec", list(PUBLISHED))
def test_a_shipped_spec_matches_its_published_config_and_parameter_count(spec):
    """The spec agrees with the published config.json through its family's map, and has the
    parameters transformers builds from that config (counted on the meta device: nothing allocated)."""
    from lmspec.compiler import load_spec
    from lmspec.compiler.analysis import parameter_count
    from lmspec.runtime.hf.config import check_hyper, check_op_args, family_of

    config_class, model_class, values = PUBLISHED[spec]
    config = getattr(transformers, config_class)(**values)
    _, family = family_of(config.to_dict())
    graph = load_spec(str(REPO / spec))
    assert check_hyper(family, config.to_dict(), graph) + check_op_args(family, config.to_dict(), graph) == []
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    assert parameter_count(graph) == sum(p.numel() for p in model.parameters())
