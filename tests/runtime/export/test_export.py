"""`lmspec export` and `lmspec generate`: ONNX bundles checked against PyTorch, generation with
onnxruntime alone (greedy parity with `lmspec sample`, batches, sampling, stops), and bad input."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime_helpers import SHARED_DATA, lmspec_cli, lmspec_main
from lmspec.runtime.cli.main import main
from lmspec.compiler.loader import load_spec
from lmspec.compiler.lower import lower
from lmspec.runtime.checkpoint.store import save_checkpoint
from lmspec.compiler.rewrites import spec_record
from lmspec.runtime.export.from_checkpoint import export_bundle
from lmspec.runtime.train.sampling import generate
from lmspec.runtime.export.bundle import BundleError, bundle_sidecar
from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest
from lmspec.runtime.data.tokenizer import FileTokenizer


def random_checkpoint(run_dir, spec, overrides=None, tokenizer=None, seed=0, tweak=None):
    """A checkpoint of a spec with its random initial weights (changed by `tweak`), as `lmspec train`
    would save it at step 0."""
    graph = load_spec(spec, overrides=overrides or {})
    model = lower(graph, seed=seed)
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    tokenizer = tokenizer or FileTokenizer.from_path(SHARED_DATA / "gpt2-tokenizer")
    save_checkpoint(run_dir, step=0, model=model, optimizer=None, rng=None, train_config={}, metrics={},
                    tokenizer=tokenizer.to_json(), spec=spec_record(graph, overrides or {}))
    return model, tokenizer


def quiet(*_):
    pass


# ------------------------------------------------------------------------------------- parity

def test_bundle_has_optimum_layout_and_records_parity(tiny_bundle):
    import onnx

    meta = json.loads(bundle_sidecar(tiny_bundle).read_text())
    assert meta["cache"] == {"layers": 2, "kv_heads": [4, 4], "head_dim": [16, 16]}
    assert meta["parity"]["fp32"]["empty_cache"] <= 1e-4 and meta["parity"]["fp32"]["filled_cache"] <= 1e-4
    graph = onnx.load(str(tiny_bundle)).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert inputs["past_key_values.1.value"] == ["batch_size", 4, "past_sequence_length", 16]
    assert outputs["present.0.key"] == ["batch_size", 4, "past_sequence_length + sequence_length", 16]
    assert list(outputs)[0] == "logits" and len(outputs) == 1 + 2 * 2


def test_greedy_onnx_generation_equals_lmspec_sample_for_64_tokens(tiny_run, tiny_bundle):
    torch_out = lmspec_main("sample", tiny_run, "--prompt", "I had always", "--max-tokens", "64", "--temperature", "0")
    onnx_out = lmspec_main("generate", tiny_bundle, "--prompt", "I had always", "--max-tokens", "64",
                          "--temperature", "0")
    assert torch_out.returncode == 0 and onnx_out.returncode == 0, torch_out.stderr + onnx_out.stderr
    assert onnx_out.stdout == torch_out.stdout
    assert len(onnx_out.stdout) > len("I had always") + 32  # it generated, and it stopped at no end-of-text


def test_generation_runs_past_the_context_like_pytorch(tiny_run, tiny_bundle):
    """64-token context, 150 new tokens: both samplers slide a window once the cache is full."""
    args = ["--prompt", "Gisburn", "--max-tokens", "150", "--temperature", "0"]
    torch_out = lmspec_main("sample", tiny_run, *args)
    onnx_out = lmspec_main("generate", tiny_bundle, *args)
    assert onnx_out.returncode == 0, onnx_out.stderr
    assert onnx_out.stdout == torch_out.stdout


def _gpt2_shape_parity(tmp_path, overrides, tokens=64):
    model, tokenizer = random_checkpoint(tmp_path / "run", "specs/gpt2.arch", overrides)
    meta = export_bundle(str(tmp_path / "run"), str(tmp_path / "gpt2.onnx"), log=quiet)
    assert meta["parity"]["fp32"]["empty_cache"] <= 1e-4 and meta["parity"]["fp32"]["filled_cache"] <= 1e-4
    prompt = tokenizer.encode((SHARED_DATA / "tinyshakespeare.txt").read_text()[:400])[:48]
    with torch.no_grad():
        expected = generate(model.eval(), prompt, tokens, temperature=0)
    onnx_model = OnnxModel(tmp_path / "gpt2.onnx")
    [got] = onnx_model.generate([GenerationRequest(prompt, tokens, temperature=0, stop_at_eot=False)])
    assert got.tokens == expected
    # Logits along the generated sequence, step by step with the cache, within 1e-4 of PyTorch's.
    ids = np.array([prompt + expected], dtype=np.int64)
    logits, past = onnx_model.forward(ids[:, :len(prompt)])
    steps = [logits[:, -1]]
    for i in range(len(prompt), ids.shape[1] - 1):
        logits, past = onnx_model.forward(ids[:, i:i + 1], past=past)
        steps.append(logits[:, -1])
    with torch.no_grad():
        reference = model(torch.from_numpy(ids))[0, len(prompt) - 1:-1].numpy()
    assert np.abs(np.concatenate(steps) - reference).max() <= 1e-4


@pytest.mark.slow  # GPT-2's layout exports in test_every_spec_exports and imports in test_hf.py
def test_gpt2_width_random_weights_greedy_parity(tmp_path):
    """GPT-2-small widths and vocabulary (768, 12 heads, 50,257), two layers: quick enough for every run."""
    _gpt2_shape_parity(tmp_path, {"layers": 2})


@pytest.mark.slow
def test_gpt2_small_random_weights_greedy_parity(tmp_path):
    _gpt2_shape_parity(tmp_path, {})


# ------------------------------------------------------------------------------- generation

def test_batched_prompts_of_different_lengths_match_one_by_one(tiny_bundle):
    model = OnnxModel(tiny_bundle)
    prompts = ["I", "The picture was", "Mrs. Gisburn said that", "he"]
    requests = [GenerationRequest(model.tokenizer.encode(p), 20 + 5 * i, temperature=0) for i, p in enumerate(prompts)]
    batched = model.generate(requests)
    for request, together in zip(requests, batched):
        [alone] = model.generate([request])
        assert together.tokens == alone.tokens and together.text == alone.text
        assert together.finish_reason == "length" and len(together.tokens) == request.max_tokens


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_bundle):
    model = OnnxModel(tiny_bundle)
    prompt = model.tokenizer.encode("It was")

    def run(**kw):
        return model.generate([GenerationRequest(prompt, 30, **kw)])[0].tokens

    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert run(temperature=1.0, seed=3) != run(temperature=1.0, seed=4)
    assert run(temperature=0.7, top_k=1, seed=5) == run(temperature=0)
    assert run(temperature=1.0, top_p=1e-6, seed=6) == run(temperature=0)


def test_stop_string_ends_the_text_before_it(tiny_bundle):
    model = OnnxModel(tiny_bundle)
    prompt = model.tokenizer.encode("I had always")
    [free] = model.generate([GenerationRequest(prompt, 60, temperature=0)])
    stop = free.text[10:12]  # a string the greedy continuation is known to contain
    [cut] = model.generate([GenerationRequest(prompt, 60, temperature=0, stop=(stop,))])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index(stop)]
    assert model.tokenizer.decode(cut.tokens).startswith(cut.text)
    streamed = "".join(e.text for e in model.stream([GenerationRequest(prompt, 60, temperature=0, stop=(stop,))]))
    assert streamed == cut.text


def test_generation_stops_at_end_of_text(tmp_path):
    """A model made to always predict <|endoftext|>: generation stops at once, the token not in the text."""
    def always_eot(model):
        u = torch.randn(64, generator=torch.Generator().manual_seed(0))
        model.get_parameter("ln_f.weight").zero_()  # every position's final hidden state becomes u ...
        model.get_parameter("ln_f.bias").copy_(u)
        model.get_parameter("wte.weight")[50256] = 10 * u  # ... whose largest logit is then 50256's

    random_checkpoint(tmp_path / "run", "specs/gpt2.arch", {"layers": 1, "dim": 64, "heads": 2}, tweak=always_eot)
    export_bundle(str(tmp_path / "run"), str(tmp_path / "m.onnx"), log=quiet)
    onnx_model = OnnxModel(tmp_path / "m.onnx")
    assert onnx_model.eot_id == 50256
    [done] = onnx_model.generate([GenerationRequest([464, 3290], 20, temperature=0)])
    assert done.finish_reason == "stop" and done.tokens == [] and done.text == ""
    [forced_on] = onnx_model.generate([GenerationRequest([464, 3290], 3, temperature=0, stop_at_eot=False)])
    assert forced_on.tokens == [50256] * 3 and forced_on.finish_reason == "length"


def test_generate_path_never_imports_torch(tiny_bundle):
    code = ("import sys\nfrom lmspec.runtime.cli import main\n"
            f"rc = main(['generate', {str(tiny_bundle)!r}, '--prompt', 'I', '--max-tokens', '5', '--seed', '1'])\n"
            "assert rc == 0\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_batched_cli_json(tiny_bundle):
    out = lmspec_main("generate", tiny_bundle, "--prompt", "I", "--prompt", "The picture", "--max-tokens", "12",
                     "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["prompt"] for r in results] == ["I", "The picture"]
    assert all(len(r["tokens"]) == 12 and r["finish_reason"] == "length" for r in results)


# ------------------------------------------------------------------------ options and specs

def test_optimize_and_int8_quantize(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "-o", str(tmp_path / "q.onnx"), "--optimize", "--quantize", "int8",
                 "--no-report"]) == 0  # the report: test_quantized_report.py
    out = capsys.readouterr()
    assert "parity optimized:" in out.out and "parity int8:" in out.out and "what quantizing costs" not in out.out
    meta = json.loads(bundle_sidecar(tmp_path / "q.onnx").read_text())
    assert "quantization_report" not in meta and meta["quantized"] == "int8" and meta["optimized"] is True and meta["parity"]["optimized"]["filled_cache"] <= 1e-4
    assert meta["fused"].get("SkipLayerNormalization", 0) > 0
    import onnx
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    fp32 = (tmp_path / "q.onnx").stat().st_size
    int8 = OnnxModel(tmp_path / "q.onnx")
    [c] = int8.generate([GenerationRequest(int8.tokenizer.encode("I had"), 10, temperature=0)])
    assert len(c.tokens) == 10 and fp32 > 0


def test_a_model_past_protobufs_limit_keeps_its_weights_beside_it(tiny_run, tiny_bundle, tmp_path, monkeypatch):
    """Over 1.8 GB the weights go to MODEL.onnx.data (checked here on a small model by lowering the
    bar): each tensor names that file, the weights are moved into place rather than read and written
    again, the pair works from another folder, and --optimize --quantize int8 handles it too."""
    import onnx
    from onnx import TensorProto
    from lmspec.compiler import onnx_export
    monkeypatch.setattr(onnx_export, "_needs_external_data", lambda model: True)
    loads, load = [], onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **kw: loads.append(kw.get("load_external_data", True)) or load(*a, **kw))
    for name, options in (("big.onnx", []), ("big-int8.onnx", ["--optimize", "--quantize", "int8", "--no-report"])):
        out = lmspec_main("export", tiny_run, "-o", tmp_path / name, *options)
        assert out.returncode == 0, out.stderr
        if name == "big.onnx":  # a plain export reads the weights once, to check them against PyTorch
            assert loads and not any(loads), loads
        graph = onnx.load(str(tmp_path / name), load_external_data=False).graph
        external = [t for t in graph.initializer if t.data_location == TensorProto.EXTERNAL]
        locations = {e.value for t in external for e in t.external_data if e.key == "location"}
        assert external and locations == {name + ".data"}, locations
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name)) == [name, name + ".data"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for path in tmp_path.glob("big.*"):
        shutil.move(path, moved / path.name)
    prompt = ["--max-tokens", "24", "--temperature", "0", "--prompt", "I had always"]
    big, small = lmspec_main("generate", moved / "big.onnx", *prompt), lmspec_main("generate", tiny_bundle, *prompt)
    assert big.returncode == 0 and big.stdout == small.stdout, big.stderr
    int8 = lmspec_main("generate", tmp_path / "big-int8.onnx", *prompt)
    assert int8.returncode == 0 and int8.stdout.startswith("I had always"), int8.stderr


INT4_PARITY = 0.5  # largest |logit difference| an int4 export of tiny_run may show (a 1-layer tiny: 0.09)


def test_int4_quantizes_every_weight_matrix_in_blocks_and_generates(tiny_run, tiny_bundle, tmp_path, capsys):
    """--quantize int4: every MatMul weight (the tied head's too) becomes a MatMulNBits of 4-bit blocks,
    the logits stay within INT4_PARITY of PyTorch's, and the bundle generates; with --fp16 it is refused."""
    import onnx

    assert main(["export", str(tiny_run), "-o", str(tmp_path / "q4.onnx"), "--quantize", "int4", "--no-report"]) == 0
    meta = json.loads(bundle_sidecar(tmp_path / "q4.onnx").read_text())
    assert meta["quantized"] == "int4" and "parity int4:" in capsys.readouterr().out
    assert 0 < meta["parity"]["int4"]["empty_cache"] <= INT4_PARITY and meta["parity"]["int4"]["filled_cache"] <= INT4_PARITY
    graph = onnx.load(str(tmp_path / "q4.onnx")).graph
    weights = {i.name for i in graph.initializer}
    blocks = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert blocks and not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    # 4-bit blocks of 32, multiplied at accuracy level 4 (int8 activations: faster than int8 itself)
    assert all({a.name: a.i for a in n.attribute}.items() >= {"bits": 4, "block_size": 32, "accuracy_level": 4}.items()
               for n in blocks)
    assert (tmp_path / "q4.onnx").stat().st_size < tiny_bundle.stat().st_size
    int4 = OnnxModel(tmp_path / "q4.onnx")
    [c] = int4.generate([GenerationRequest(int4.tokenizer.encode("I had"), 10, temperature=0)])
    assert len(c.tokens) == 10
    assert main(["export", str(tiny_run), "-o", str(tmp_path / "h.onnx"), "--quantize", "int4", "--fp16"]) == 2
    assert "--quantize int4 and --fp16 exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "h.onnx").exists()


@pytest.mark.slow  # optimize and int8 are checked on tiny in the default run
def test_gpt2_style_optimize_keeps_tanh_gelu_and_int8_quantizes_the_tied_head(tmp_path):
    """GPT-2's tanh GELU survives onnxruntime's bias fusion (as FastGelu), and the tied output head,
    exported as MatMul(x, Transpose(wte)), is quantised like every other MatMul."""
    import onnx

    random_checkpoint(tmp_path / "run", "specs/gpt2.arch", {"layers": 1, "dim": 64, "heads": 2})
    meta = export_bundle(str(tmp_path / "run"), str(tmp_path / "q.onnx"), optimize=True, quantize="int8", log=quiet)
    assert meta["parity"]["optimized"]["empty_cache"] <= 1e-4 and meta["parity"]["optimized"]["filled_cache"] <= 1e-4
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    weights = {i.name for i in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # all int8
    assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights]
    assert "FastGelu" in {n.op_type for n in graph.node} or meta["fused"].get("FastGelu", 0) > 0


@pytest.mark.slow  # fp16 is for GPU providers; optimize and int8 stay in the default run
def test_fp16_export_runs_and_reports_its_difference(tiny_run, tmp_path):
    out = lmspec_main("export", tiny_run, "-o", tmp_path / "h.onnx", "--fp16")
    assert out.returncode == 0, out.stderr
    meta = json.loads(bundle_sidecar(tmp_path / "h.onnx").read_text())
    assert meta["dtype"] == "float16" and 0 < meta["parity"]["fp16"]["filled_cache"] < 0.05
    half = OnnxModel(tmp_path / "h.onnx")
    [c] = half.generate([GenerationRequest(half.tokenizer.encode("I had"), 8, temperature=0)])
    assert len(c.tokens) == 8


@pytest.mark.slow  # another opset of the same export the default run already checks
def test_opset_option(tiny_run, tmp_path):
    import onnx
    out = lmspec_main("export", tiny_run, "-o", tmp_path / "m.onnx", "--opset", "18")
    assert out.returncode == 0, out.stderr
    opsets = {o.domain: o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import}
    assert opsets[""] == 18
    bad = lmspec_main("export", tiny_run, "-o", tmp_path / "b.onnx", "--opset", "9")
    assert bad.returncode == 1 and "opset" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("spec, overrides", [
    ("specs/handwritten.arch", {}),
    ("specs/gpt2.arch", {"layers": 1, "dim": 64, "heads": 4, "kv_heads": None}),
    pytest.param("specs/llama3.2-1b.arch", {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
                                            "ffn": 96, "rope_original": 8},
                 marks=pytest.mark.slow),  # test_hf.py exports an imported Llama 3 with its parity check
    pytest.param("specs/mistral-7b.arch", {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 1, "head_dim": 16,
                                           "ffn": 96, "window": 3}, marks=pytest.mark.slow),  # llama's, plus a window
    pytest.param("specs/qwen3-0.6b.arch", {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "head_dim": 32,
                                           "ffn": 96}, marks=pytest.mark.slow),  # QK-norm: qwen3-moe-tiny has it too
    pytest.param("specs/qwen3-moe-tiny.arch", {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
                                               "experts": 4, "top_k": 2, "moe_ffn": 32},
                 marks=pytest.mark.slow),  # test_hf.py exports an imported Qwen3-MoE with its parity check
])
def test_every_spec_exports(tmp_path, spec, overrides):
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model, tokenizer = random_checkpoint(tmp_path / "run", spec, overrides,
                                         tokenizer=_char_tokenizer() if "handwritten" in spec else None)
    meta = export_bundle(str(tmp_path / "run"), str(tmp_path / "m.onnx"), log=quiet)
    assert meta["parity"]["fp32"]["empty_cache"] <= 1e-4
    onnx_model = OnnxModel(tmp_path / "m.onnx")
    prompt = tokenizer.encode("the ")
    [got] = onnx_model.generate([GenerationRequest(prompt, 12, temperature=0, stop_at_eot=False)])
    with torch.no_grad():
        assert got.tokens == generate(model.eval(), prompt, 12, temperature=0)


def _char_tokenizer():
    from lmspec.runtime.data.tokenizer import CharTokenizer
    return CharTokenizer.from_text("".join(chr(c) for c in range(32, 127)) + "\n")


def test_an_op_marked_not_exportable_is_named_at_its_line(monkeypatch):
    from lmspec.compiler.onnx_export import check_exportable
    from lmspec.compiler.registry import get_op
    from lmspec.dsl.diagnostics import SpecError

    monkeypatch.setattr(type(get_op("layernorm")), "exportable", False)
    graph = load_spec("specs/tiny.arch", overrides={"layers": 1})
    with pytest.raises(SpecError) as err:
        check_exportable(graph)
    text = err.value.render()
    assert "specs/tiny.arch:" in text and "op 'layernorm' cannot be exported to ONNX" in text and "^" in text


def test_export_fails_loudly_and_writes_nothing_when_parity_is_off(tiny_run, tmp_path, monkeypatch):
    from lmspec.compiler import onnx_parity
    from lmspec.compiler.onnx_export import ExportError

    real = onnx_parity.check_parity

    def off_by_a_bit(*args, **kw):
        result = real(*args, **kw)
        result.filled_cache = 3e-4
        return result

    monkeypatch.setattr(onnx_parity, "check_parity", off_by_a_bit)
    with pytest.raises(ExportError, match=r"3\.000e-04 > 0.0001"):
        export_bundle(str(tiny_run), str(tmp_path / "m.onnx"), log=quiet)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error(tiny_bundle, tmp_path, capsys):
    (tmp_path / "corrupt.onnx").write_bytes(b"not a model")
    shutil.copy(bundle_sidecar(tiny_bundle), tmp_path / "corrupt.lmspec.json")
    shutil.copy(tiny_bundle, tmp_path / "alone.onnx")
    (tmp_path / "run").mkdir()
    cases = [
        (["export", tmp_path / "nowhere", "-o", tmp_path / "x.onnx"], "nowhere"),
        (["export", tmp_path / "run", "-o", tmp_path / "x.onnx"], "checkpoint"),
        (["generate", tmp_path / "missing.onnx", "--prompt", "I"], "no such ONNX model"),
        (["generate", tmp_path / "corrupt.onnx", "--prompt", "I"], "onnxruntime cannot load it"),
        (["generate", tmp_path / "alone.onnx", "--prompt", "I"], "alone.lmspec.json: missing"),
        (["generate", tiny_bundle, "--prompt", "\u2603 snowman"], "prompt"),
    ]
    out = lmspec_cli(*cases[3][0])  # one in a process of its own, as a user runs it
    assert out.returncode in (1, 2) and cases[3][1] in out.stderr and "Traceback" not in out.stderr, out.stderr
    for args, words in cases:  # the rest through main(): an interpreter start each is most of their time
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code in (1, 2), (args, err)
        assert words in err and "Traceback" not in err, (args, err)


def test_a_directory_with_one_bundle_is_accepted(tiny_bundle):
    assert OnnxModel(tiny_bundle.parent).path == tiny_bundle
    with pytest.raises(BundleError, match="no exported model"):
        OnnxModel(SHARED_DATA)
