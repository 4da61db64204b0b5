"""An export to a directory is a model onnxruntime-genai runs as it is: genai_config.json and the
tokenizer files beside model.onnx, no hand edits, the same greedy tokens as `lmspec generate`; and
where genai cannot run a bundle, export says why and writes none of them."""
import json

import pytest

from lmspec.runtime.export.from_checkpoint import export_bundle
from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest

from test_export import _char_tokenizer, random_checkpoint

og = pytest.importorskip("onnxruntime_genai")


def sharpen(model):  # weights far from init: greedy choices that are not near-ties
    for p in model.parameters():
        p.mul_(3.0)


def genai_greedy(directory, prompt: str, new: int) -> tuple[list[int], list[int]]:
    """(the prompt's ids by genai's tokenizer, the `new` tokens genai's greedy search appends)."""
    model = og.Model(str(directory))
    ids = [int(i) for i in og.Tokenizer(model).encode(prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return ids, out


def genai_greedy_batch(directory, prompts: list[str], length: int) -> list[list[int]]:
    """The tokens genai's greedy search appends to each prompt, all of them in one batch of
    `length` positions (the longest prompt's included)."""
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(og.Tokenizer(model).encode_batch(prompts))
    rows = [[] for _ in prompts]
    while not generator.is_done():
        generator.generate_next_token()
        for row, token in zip(rows, generator.get_next_tokens()):
            row.append(int(token))
    return rows


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-attention"])
def test_genai_runs_an_export_as_it_is_and_greedy_tokens_equal_lmspecs(tmp_path, fused):
    random_checkpoint(tmp_path / "run", "specs/gpt2.arch", {"layers": 2, "dim": 64, "heads": 4, "context": 64},
                      tweak=sharpen)
    messages = []
    meta = export_bundle(str(tmp_path / "run"), str(tmp_path / "bundle"), fused_attention=fused,
                         log=messages.append)
    assert meta["genai"] == "genai_config.json"
    config = json.loads((tmp_path / "bundle" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2 and config["model"]["context_length"] == 64
    # the fused kernel's cache is one buffer per layer, updated in place: genai's own layout
    assert config["search"]["past_present_share_buffer"] is fused
    # ...which Optimum's cache that grows cannot take: no config.json for it, and the reason
    assert (meta["optimum"] is None) is fused and any(
        m.startswith("no config.json (Optimum): --fused-attention's shared buffer") for m in messages) is fused
    bundle = OnnxModel(tmp_path / "bundle" / "model.onnx")
    prompts = ["I had always thought", "The picture"]
    ours = bundle.generate([GenerationRequest(bundle.tokenizer.encode(p), 40, temperature=0, stop_at_eot=False)
                            for p in prompts])
    for prompt, own in zip(prompts, ours):
        ids, tokens = genai_greedy(tmp_path / "bundle", prompt, 40)  # most of the 64-token context
        assert ids == bundle.tokenizer.encode(prompt)
        assert tokens == own.tokens
    # both prompts in one genai batch (it pads the shorter one): each row's tokens are still lmspec's
    rows = genai_greedy_batch(tmp_path / "bundle", prompts, 40)
    assert [row == own.tokens[:len(row)] and len(row) >= 30 for row, own in zip(rows, ours)] == [True, True]


def test_genai_runs_an_int4_export_whose_lookup_reads_the_heads_blocks(tmp_path):
    """--quantize int4 of a tied head: the embedding is onnxruntime's GatherBlockQuantized over the
    head's MatMulNBits blocks (runtime/export/quantized_lookups.py), which genai runs as it is."""
    import onnx
    random_checkpoint(tmp_path / "run", "specs/gpt2.arch", {"layers": 2, "dim": 64, "heads": 4, "context": 64},
                      tweak=sharpen)
    export_bundle(str(tmp_path / "run"), str(tmp_path / "bundle"), quantize="int4", log=lambda *_: None)
    assert "GatherBlockQuantized" in {n.op_type for n in onnx.load(str(tmp_path / "bundle" / "model.onnx")).graph.node}
    bundle = OnnxModel(tmp_path / "bundle" / "model.onnx")
    prompt = "I had always thought"
    [own] = bundle.generate([GenerationRequest(bundle.tokenizer.encode(prompt), 30, temperature=0, stop_at_eot=False)])
    assert genai_greedy(tmp_path / "bundle", prompt, 30)[1] == own.tokens


def test_what_genai_cannot_run_gets_no_config_and_a_reason(tmp_path):
    random_checkpoint(tmp_path / "chars", "specs/tiny.arch", {"layers": 1, "vocab": 96}, tokenizer=_char_tokenizer())
    messages = []
    meta = export_bundle(str(tmp_path / "chars"), str(tmp_path / "c"), log=messages.append)
    assert meta["genai"] is None and not (tmp_path / "c" / "genai_config.json").exists()
    assert any("no genai_config.json (onnxruntime-genai): its tokenizer is character-level" in m for m in messages)
    assert "no config.json (Optimum): its tokenizer is character-level; Optimum reads Hugging Face tokenizer " \
           "files (train with --tokenizer)" in messages  # the same for Optimum (test_optimum.py)
    assert meta["optimum"] is None and not (tmp_path / "c" / "config.json").exists()
    random_checkpoint(tmp_path / "bpe", "specs/gpt2.arch", {"layers": 1, "dim": 64, "heads": 2, "context": 32})
    messages = []
    meta = export_bundle(str(tmp_path / "bpe"), str(tmp_path / "f" / "named.onnx"), log=messages.append)
    assert meta["genai"] is None and sorted(p.name for p in (tmp_path / "f").iterdir()) == \
        ["named.lmspec.json", "named.onnx"]
    assert any("it reads a directory, and a file name was given" in m for m in messages)
    assert meta["optimum"] is None and any(
        m.startswith("no config.json (Optimum): it reads a directory, and a file name was given") for m in messages)
