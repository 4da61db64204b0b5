"""`lmspec export gguf`: the file read back with the `gguf` package has llama.cpp's architecture,
tensor names, shapes, types, metadata and tokenizer, and its dequantised tensors equal the
checkpoint's within the type's error; `transformers` (which undoes llama.cpp's conventions itself)
and, where it is installed, llama.cpp load it and compute our logits; what llama.cpp would compute
differently is refused by name with nothing written."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmspec.runtime.checkpoint.models import load_model
from lmspec.runtime.cli.main import main
from lmspec.runtime.errors import GGUFError
from lmspec.runtime.export.gguf_file import export_gguf

from lmspec.runtime.data.tokenizer import FileTokenizer
from runtime_helpers import SHARED_DATA
from test_export import _char_tokenizer, random_checkpoint

gguf = pytest.importorskip("gguf")

TINY = {"layers": 2, "dim": 64, "heads": 4, "context": 64}
# Llama 3 with a short original context, so its rotary frequency scaling changes short sequences
LLAMA3 = ("specs/llama3.2-1b.arch", {**TINY, "kv_heads": 2, "head_dim": 16, "ffn": 128, "vocab": 50257,
                                     "rope_original": 16})
# head_dim 128, as Qwen 3 has (and as transformers assumes: it reads no key_length from a GGUF file)
QWEN3 = ("specs/qwen3-0.6b.arch", {**TINY, "kv_heads": 2, "head_dim": 128, "ffn": 96, "vocab": 50257})
GPT2 = ("specs/gpt2.arch", {**TINY, "context": 1024})  # transformers sizes GPT-2's positions by n_positions
PROMPT = [464, 3290, 318, 257, 1332, 286, 262, 6334, 13, 383, 1110, 373, 257, 1263, 290, 340, 1816, 477,
          286, 262, 1310, 11, 290, 484, 750, 407, 760, 644, 284, 466, 13, 632]


def sharpen(model):  # weights far from init: logits that differ clearly between positions
    for p in model.parameters():
        p.mul_(3.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(family, type): path} for GPT-2, Llama 3 and Qwen 3 checkpoints, in f16 and q8_0 (Llama 3 in both)."""
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    kinds = {"gpt2": ("f16",), "llama": ("f16", "q8_0"), "qwen3": ("q8_0",)}
    for family, (spec, overrides) in {"gpt2": GPT2, "llama": LLAMA3, "qwen3": QWEN3}.items():
        random_checkpoint(root / family, spec, overrides, tweak=sharpen)
        for kind in kinds[family]:
            files[family, kind] = export_gguf(str(root / family), str(root / f"{family}-{kind}.gguf"), kind,
                                              log=lambda *_: None)
    return root, files


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def our_logits(run, ids) -> torch.Tensor:
    model = load_model(str(run)).model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out if torch.is_tensor(out) else out[0])[0]


def permuted(w: torch.Tensor, heads: int) -> torch.Tensor:  # convert_hf_to_gguf's LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(family: str, model) -> dict[str, np.ndarray]:
    """The checkpoint's weights under llama.cpp's names and in its layout, written out by hand."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["wte.weight" if family == "gpt2" else "embed.weight"]}
    for i in range(TINY["layers"]):
        b, blk = f"block.{i}.", f"blk.{i}."
        if family == "gpt2":
            out |= {blk + "attn_norm.weight": sd[b + "ln.weight"], blk + "attn_norm.bias": sd[b + "ln.bias"],
                    blk + "attn_qkv.weight": sd[b + "attn.qkv.weight"], blk + "attn_qkv.bias": sd[b + "attn.qkv.bias"],
                    blk + "attn_output.weight": sd[b + "attn.proj.weight"],
                    blk + "attn_output.bias": sd[b + "attn.proj.bias"],
                    blk + "ffn_norm.weight": sd[b + "ln_1.weight"], blk + "ffn_norm.bias": sd[b + "ln_1.bias"],
                    blk + "ffn_up.weight": sd[b + "mlp.fc.weight"], blk + "ffn_up.bias": sd[b + "mlp.fc.bias"],
                    blk + "ffn_down.weight": sd[b + "mlp.proj.weight"], blk + "ffn_down.bias": sd[b + "mlp.proj.bias"]}
            continue
        heads, kv, d = model_dims(family)
        q, k, v = sd[b + "attn.qkv.weight"].split([heads * d, kv * d, kv * d])
        if family == "llama":
            q, k = permuted(q, heads), permuted(k, kv)
        gate, up = sd[b + "mlp.fc.weight"].chunk(2)
        out |= {blk + "attn_norm.weight": sd[b + "attn_norm.weight"], blk + "attn_q.weight": q,
                blk + "attn_k.weight": k, blk + "attn_v.weight": v, blk + "attn_output.weight": sd[b + "attn.proj.weight"],
                blk + "ffn_norm.weight": sd[b + "mlp_norm.weight"], blk + "ffn_gate.weight": gate,
                blk + "ffn_up.weight": up, blk + "ffn_down.weight": sd[b + "mlp.proj.weight"]}
        if family == "qwen3":
            out |= {blk + "attn_q_norm.weight": sd[b + "attn.q_norm.weight"],
                    blk + "attn_k_norm.weight": sd[b + "attn.k_norm.weight"]}
    out["output_norm.weight"] = sd["ln_f.weight" if family == "gpt2" else "norm.weight"]
    if family == "gpt2":
        out["output_norm.bias"] = sd["ln_f.bias"]
    if not torch.equal(sd["lm_head.weight"], out["token_embd.weight"]):  # untied: its own head
        out["output.weight"] = sd["lm_head.weight"]
    if family == "gpt2":
        out["position_embd.weight"] = sd["wpe.weight"]
    return {k: v.numpy() for k, v in out.items()}


def model_dims(family):
    spec = {"llama": LLAMA3, "qwen3": QWEN3}[family][1]
    return spec["heads"], spec["kv_heads"], spec["head_dim"]


def test_the_file_has_llama_cpps_names_shapes_types_metadata_and_our_weights(exported):
    root, files = exported
    for (family, kind), path in files.items():
        reader = gguf.GGUFReader(str(path))
        meta = fields(reader)
        arch = {"gpt2": "gpt2", "llama": "llama", "qwen3": "qwen3"}[family]
        assert meta["general.architecture"] == arch and meta["general.file_type"] == \
            {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
        assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.embedding_length"] == 64
        assert meta[f"{arch}.attention.head_count"] == 4
        if family == "gpt2":
            assert meta["gpt2.context_length"] == 1024 and meta["gpt2.feed_forward_length"] == 256
            assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
        else:
            heads, kv, d = model_dims(family)
            assert meta[f"{arch}.attention.head_count_kv"] == kv and meta[f"{arch}.rope.dimension_count"] == d
            assert meta[f"{arch}.attention.key_length"] == d and meta[f"{arch}.context_length"] == 64
        # every tensor is one the gguf package (llama.cpp's own table) lists for the architecture
        known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]
                 for i in range(2)}
        model = load_model(str(root / family)).model
        expected = expected_tensors(family, model)
        got = {t.name: t for t in reader.tensors}
        assert set(got) - {"rope_freqs.weight"} == set(expected), family
        for name, tensor in got.items():
            assert name.rsplit(".", 1)[0] in known, name
            if name == "rope_freqs.weight":
                continue
            want = expected[name]
            assert tuple(int(n) for n in reversed(tensor.shape)) == want.shape, name  # GGUF lists ne, innermost first
            vector = want.ndim == 1 or name.endswith("_norm.weight") or name == "position_embd.weight"
            wanted_type = "F32" if vector else kind.upper()
            assert tensor.tensor_type.name == wanted_type, name
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
            if wanted_type == "F32":
                np.testing.assert_array_equal(values, want)
            elif wanted_type == "F16":
                np.testing.assert_allclose(values, want, rtol=1e-3, atol=1e-7)
            else:  # q8_0: each block of 32 is int8 times a scale max|block|/127, itself rounded to f16
                blocks = want.reshape(-1, 32)
                bound = np.abs(blocks).max(axis=1, keepdims=True) * (0.5 / 127 + 2 ** -10) + 1e-7
                assert (np.abs(values.reshape(-1, 32) - blocks) <= bound).all(), name
        if family == "llama":  # lmspec's own Llama 3 frequencies are the base ones divided by these factors
            attention = next(m for m in model.modules() if hasattr(m, "inv_freq"))
            d = model_dims("llama")[2]
            base = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
            factors = gguf.quants.dequantize(got["rope_freqs.weight"].data, got["rope_freqs.weight"].tensor_type)
            np.testing.assert_allclose(base.numpy() / factors, attention.inv_freq.double().numpy(), rtol=1e-5)
            assert factors.max() == pytest.approx(32.0)  # the spec's rope_factor, on the slowest frequencies
        # the tokenizer: GPT-2's, by id, with its merges; no BOS added, as lmspec adds none
        from lmspec.runtime.data.tokenizer import load_tokenizer
        from lmspec.runtime.checkpoint.store import load_checkpoint
        ours = load_tokenizer(load_checkpoint(str(root / family)).tokenizer).tokenizer
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
        tokens = meta["tokenizer.ggml.tokens"]
        assert len(tokens) == 50257 and all(ours.id_to_token(i) == tokens[i] for i in range(0, 50257, 97))
        assert len(meta["tokenizer.ggml.merges"]) == 50000 and meta["tokenizer.ggml.merges"][0] == "Ġ t"
        assert meta["tokenizer.ggml.eos_token_id"] == 50256 and meta["tokenizer.ggml.add_bos_token"] is False
        assert meta["tokenizer.ggml.token_type"][50256] == gguf.TokenType.CONTROL


@pytest.mark.slow  # 20 s; by default the reader's test checks every tensor against the checkpoint instead
def test_transformers_loads_the_gguf_and_computes_our_logits(exported):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    root, files = exported
    # transformers ignores llama.cpp's rope_freqs, so not Llama 3 here (llama.cpp's own test below runs it).
    # f16 rounds each weight; q8_0's blocks round more, and these random weights (x3) amplify it;
    # a tensor in the wrong layout is off by the logits' whole size.
    for family, kind, tolerance in (("gpt2", "f16", 0.01), ("qwen3", "q8_0", 0.2)):
        ours = our_logits(root / family, PROMPT)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(root), gguf_file=files[family, kind].name, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = model(torch.tensor([PROMPT])).logits[0]
        scale = ours.abs().max().item()
        assert (theirs - ours).abs().max().item() <= tolerance * scale, (family, kind)
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.75
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root), gguf_file=files["gpt2", "f16"].name)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert tokenizer.encode(text, add_special_tokens=False) == \
        FileTokenizer.from_path(SHARED_DATA / "gpt2-tokenizer").encode(text)


def test_llama_cpp_runs_the_gguf_with_our_logits(exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding (llama-cpp-python) is not "
                                                        "installed; it builds from source")
    root, files = exported
    for (family, kind), path in sorted(files.items()):
        ours = our_logits(root / family, PROMPT)
        model = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        text = "First Citizen:\nBefore we proceed any further, hear me speak."
        assert model.tokenize(text.encode(), add_bos=False) == \
            FileTokenizer.from_path(SHARED_DATA / "gpt2-tokenizer").encode(text)
        model.eval(PROMPT)
        theirs = torch.tensor(np.array(model.scores[:len(PROMPT)]))
        tolerance = 0.01 if kind == "f16" else 0.2
        assert (theirs - ours).abs().max().item() <= tolerance * ours.abs().max().item(), (family, kind)
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.75


def _export_cli(run, out, *extra):
    return subprocess.run([sys.executable, "-m", "lmspec", "export", "gguf", str(run), "-o", str(out), *extra],
                          capture_output=True, text=True)


@pytest.mark.parametrize("spec, overrides, tokenizer, says", [
    ("specs/mistral-7b.arch", {**TINY, "kv_heads": 2, "head_dim": 16, "ffn": 128, "vocab": 50257, "window": 16},
     None, "attention window=16: llama.cpp's llama attends over the whole context"),
    ("specs/gpt2.arch", {**TINY, "vocab": 96}, "chars", "its tokenizer is character-level"),
    ("specs/qwen3-moe-tiny.arch", {"layers": 1, "vocab": 50257}, None, "op moe"),
    ("specs/gemma3-1b.arch", {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 1, "head_dim": 16, "ffn": 128,
                              "vocab": 50257, "context": 64}, None, "a gemma3_text model: lmspec writes GGUF for"),
])
def test_what_llama_cpp_would_compute_differently_is_refused_by_name(tmp_path, spec, overrides, tokenizer, says):
    random_checkpoint(tmp_path / "run", spec, overrides, tokenizer=_char_tokenizer() if tokenizer else None)
    (tmp_path / "out").mkdir()
    with pytest.raises(GGUFError) as refused:
        export_gguf(str(tmp_path / "run"), str(tmp_path / "out" / "model.gguf"), log=lambda *_: None)
    assert says in str(refused.value)
    assert list((tmp_path / "out").iterdir()) == []  # not the file, nor the scratch directory


def test_no_copy_of_the_weights_is_written_on_the_way(tmp_path, monkeypatch):
    """The tensors go from the checkpoint into the GGUF file: a 7B model needs no 14 GB of scratch."""
    random_checkpoint(tmp_path / "run", *GPT2)

    def no_weights_file(path, *args, **kwargs):
        raise AssertionError(f"{path}: a copy of the weights was written")

    monkeypatch.setattr("lmspec.runtime.hf.convert.SafetensorsWriter", no_weights_file)
    export_gguf(str(tmp_path / "run"), str(tmp_path / "model.gguf"), log=lambda *_: None)
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert "token_embd.weight" in {t.name for t in reader.tensors}


def test_cli_writes_the_file_refuses_in_one_line_and_refuses_onnx_flags(tmp_path, capsys):
    random_checkpoint(tmp_path / "run", *GPT2)
    done = _export_cli(tmp_path / "run", tmp_path / "out", "--type", "q8_0")
    assert done.returncode == 0, done.stderr
    assert "llama.cpp architecture gpt2" in done.stdout and "Q8_0" in done.stdout
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    assert fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.gguf"]  # no scratch left behind
    capsys.readouterr()
    random_checkpoint(tmp_path / "mistral", "specs/mistral-7b.arch",
                      {**TINY, "kv_heads": 2, "head_dim": 16, "ffn": 128, "vocab": 50257, "window": 16})
    for argv, code, says in (
            (["export", "gguf", str(tmp_path / "mistral"), "-o", str(tmp_path / "x.gguf")], 1,
             "lmspec export gguf: error: attention window=16: llama.cpp's llama attends over the whole context"),
            (["export", "gguf", str(tmp_path / "run"), "-o", str(tmp_path / "x.gguf"), "--quantize", "int8"], 2,
             "lmspec export: error: --quantize: only for ONNX export, not `export gguf`"),
            (["export", str(tmp_path / "run"), "-o", str(tmp_path / "m.onnx"), "--type", "f16"], 2,
             "lmspec export: error: --type is only for `lmspec export gguf`")):
        assert main(argv) == code
        assert capsys.readouterr().err.strip().splitlines() == [says]
        assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "m.onnx").exists()
    with pytest.raises(SystemExit):  # argparse's own refusal of a type it does not know
        main(["export", "gguf", str(tmp_path / "run"), "-o", str(tmp_path / "x.gguf"), "--type", "q4_0"])
    assert "invalid choice: 'q4_0'" in capsys.readouterr().err
