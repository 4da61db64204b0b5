"""An export to a directory is also a model Optimum loads as it is: config.json (as `export hf` writes it,
with use_cache), generation_config.json and the tokenizer files genai reads, with the chat template;
transformers reads each, and Optimum's ORTModelForCausalLM gives lmspec's logits and greedy tokens. Where
Optimum cannot load a bundle, export says why and writes none of its files."""
import json

import numpy as np
import pytest

from runtime_helpers import SHARED_DATA
from lmspec.compiler.loader import load_spec
from lmspec.compiler.lower import lower
from lmspec.compiler.rewrites import spec_record
from lmspec.runtime.checkpoint.store import save_checkpoint
from lmspec.runtime.data.chat_template import JinjaTemplate
from lmspec.runtime.data.tokenizer import FileTokenizer
from lmspec.runtime.export.from_checkpoint import export_bundle
from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest

from test_export import random_checkpoint

transformers = pytest.importorskip("transformers")

GPT2 = {"layers": 2, "dim": 64, "heads": 4, "context": 64}
PROMPTS = ("I had always thought", "The picture")
MESSAGES = [("system", "Be brief."), ("user", "Who painted it?")]
OPTIMUM_MISSING = ("optimum-onnx (optimum.onnxruntime) is not installed: its newest release, 0.1.0, requires "
                   "transformers<4.58 and pip would downgrade transformers to install it")


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    """A GPT-2-shaped checkpoint finetuned (as its train_config says) with the chatml template, its
    weights far from init (greedy choices that are not near-ties), exported to a directory."""
    root = tmp_path_factory.mktemp("optimum")
    graph = load_spec("specs/gpt2.arch", overrides=GPT2)
    model = lower(graph, seed=0)
    for p in model.parameters():
        p.data.mul_(3.0)
    tokenizer = FileTokenizer.from_path(SHARED_DATA / "gpt2-tokenizer")
    save_checkpoint(root / "run", step=0, model=model, optimizer=None, rng=None, train_config={"template": "chatml"},
                    metrics={}, tokenizer=tokenizer.to_json(), spec=spec_record(graph, GPT2))
    messages = []
    meta = export_bundle(str(root / "run"), str(root / "bundle"), log=messages.append)
    return root, meta, messages


def test_transformers_reads_the_config_the_generation_config_and_the_tokenizer_with_its_template(chat_export):
    root, meta, messages = chat_export
    bundle = root / "bundle"
    assert meta["optimum"] == "config.json" and meta["genai"] == "genai_config.json"
    assert json.loads((bundle / "model.lmspec.json").read_text())["optimum"] == "config.json"
    assert any(f"wrote config.json and generation_config.json: Optimum's ORTModelForCausalLM loads {bundle}" in m
               for m in messages)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "genai_config.json"} <= {p.name for p in bundle.iterdir()}
    config = transformers.AutoConfig.from_pretrained(bundle)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("gpt2", 2, 50257)
    assert config.use_cache is True and config.architectures == ["GPT2LMHeadModel"]
    generation = transformers.GenerationConfig.from_pretrained(bundle)
    assert generation.eos_token_id == 50256 and generation.do_sample is False and generation.max_length == 64
    hf = transformers.AutoTokenizer.from_pretrained(bundle)
    ours = OnnxModel(bundle / "model.onnx")
    for text in (*PROMPTS, (SHARED_DATA / "the-verdict.txt").read_text()[:2000]):
        assert hf(text)["input_ids"] == ours.tokenizer.encode(text)
    assert hf.eos_token == "<|endoftext|>" and "token_type_ids" not in hf("x")
    # the template genai and Optimum read (one tokenizer_config.json) renders as lmspec's chat does
    as_dicts = [{"role": r, "content": c} for r, c in MESSAGES]
    rendered = hf.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=False)
    assert rendered == JinjaTemplate(ours.tokenizer, meta["chat_template"]).text(MESSAGES)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_optimum_loads_the_directory_and_its_logits_and_greedy_tokens_equal_lmspecs(chat_export):
    ort = pytest.importorskip("optimum.onnxruntime", reason=OPTIMUM_MISSING)
    bundle = chat_export[0] / "bundle"
    model = ort.ORTModelForCausalLM.from_pretrained(bundle)
    hf = transformers.AutoTokenizer.from_pretrained(bundle)
    ours = OnnxModel(bundle / "model.onnx")
    for prompt in PROMPTS:
        encoded = hf(prompt, return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        logits, _ = ours.forward(np.array([ids]))
        assert np.abs(model(**encoded).logits.numpy() - logits).max() <= 1e-5
        [expected] = ours.generate([GenerationRequest(ids, 12, temperature=0, stop_at_eot=False)])
        out = model.generate(**encoded, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out[0, len(ids):].tolist() == expected.tokens


NO_FAMILY = """model nofamily {
  vocab = 50257; context = 32; dim = 64; heads = 2; layers = 1

  input tokens: i64[batch, seq <= context]

  x = embedding(tokens, vocab, dim) as wte + position(seq, context, dim) as wpe
  repeat layers as block {
    x = x + attention(rmsnorm(x), heads, causal=true)
    x = x + mlp(rmsnorm(x), 4 * dim, act=gelu)
  }
  logits = linear(rmsnorm(x) as ln_f, vocab, bias=false, tie=wte) as lm_head
  output logits: f32[batch, seq, vocab]
}
"""


def _optimum_files(directory) -> set[str]:
    return {p.name for p in directory.iterdir()} & {"config.json", "generation_config.json"}


def test_what_optimum_cannot_load_gets_no_files_and_a_reason(tmp_path):
    # (a character-level tokenizer and a file name: test_genai.py, for both runtimes)
    # a spec no Hugging Face family's table fits: genai runs it, Optimum has no config.json for it
    spec = tmp_path / "nofamily.arch"
    spec.write_text(NO_FAMILY)
    random_checkpoint(tmp_path / "nofamily", str(spec))
    messages = []
    meta = export_bundle(str(tmp_path / "nofamily"), str(tmp_path / "n"), log=messages.append)
    assert meta["optimum"] is None and meta["genai"] == "genai_config.json" and not _optimum_files(tmp_path / "n")
    assert (tmp_path / "n" / "tokenizer_config.json").is_file()  # genai's
    [line] = [m for m in messages if m.startswith("no config.json (Optimum): ")]
    assert "the parameters of model nofamily match no Hugging Face family's table" in line
    assert "--model-type" not in line  # `export hf`'s option, which `export` does not have

