"""`lmspec import hf --map` and `export hf` for a family lmspec does not ship: the README's worked
example (OLMo 2: norms after each sublayer, QK-norm over the whole projections) imported from a
random model saved by `transformers`, compared with it, and written back; mistakes in a map are located errors,
and a map that does not fit the checkpoint is one error listing every problem, before anything is
written."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from runtime_helpers import ROOT, lmspec_main
from lmspec.runtime.hf.map_file import MapError, parse_map

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-6,
             pad_token_id=0)
# OLMo-2-0425-1B's config.json values, which the README's spec is written for
PUBLISHED = dict(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096, rope_theta=500000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)


def readme_example() -> tuple[str, str]:
    """(spec, map) as the README's "Bringing a new family" section writes them."""
    block = re.search(r"<!-- family-example -->(.*?)<!-- /family-example -->", (ROOT / "README.md").read_text(),
                      re.S).group(1)
    return re.search(r"```\n(model .*?)```", block, re.S).group(1), re.search(r"```toml\n(.*?)```", block, re.S).group(1)


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    """A random small OLMo 2 saved by transformers, with a word tokenizer: (directory, model)."""
    from test_hf import _quiet_transformers, _word_tokenizer

    _quiet_transformers()
    torch.manual_seed(0)
    hf = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SMALL)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
    directory = tmp_path_factory.mktemp("olmo2") / "olmo2"
    hf.save_pretrained(directory, safe_serialization=True)
    _word_tokenizer(directory / "tokenizer.json", 1000)
    return directory, hf


def sizes(directory) -> list[str]:
    """--set options that size the README's spec (OLMo 2 1B) like the small config.json."""
    return ["--set", "vocab=1000", "--set", "context=128", "--set", "dim=64", "--set", "layers=4", "--set", "heads=4",
            "--set", "kv_heads=2", "--set", "head_dim=16", "--set", "ffn=96"]


def test_the_readme_example_imports_matches_transformers_and_round_trips(olmo2, tmp_path):
    directory, hf = olmo2
    spec_text, map_text = readme_example()
    spec, map_file = tmp_path / "olmo2.arch", tmp_path / "olmo2.toml"
    spec.write_text(spec_text)
    map_file.write_text(map_text)
    out = tmp_path / "run"
    run = lmspec_main("import", "hf", directory, "--spec", spec, "--map", map_file, *sizes(directory), "-o", out)
    assert run.returncode == 0, run.stderr
    from test_hf import _load, assert_matches_transformers
    tokens = assert_matches_transformers(_load(out), hf, 24)

    exported = tmp_path / "exported"
    run = lmspec_main("export", "hf", out, "-o", exported)  # the map recorded at import, backwards
    assert run.returncode == 0, run.stderr
    original, written = load_file(str(directory / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_a_map_that_does_not_fit_the_checkpoint_lists_every_problem_and_writes_nothing(olmo2, tmp_path):
    directory, _ = olmo2
    spec_text, map_text = readme_example()
    (tmp_path / "s.arch").write_text(spec_text)
    wrong = map_text.replace("self_attn.o_proj.weight", "self_attn.out_proj.weight")  # a tensor it lacks
    wrong = wrong.replace('"block.{i}.mlp.proj.weight" = "model.layers.{i}.mlp.down_proj.weight"',
                          '"block.{i}.mlp.proj.weight" = "model.layers.{i}.mlp.up_proj.weight"')  # shape; down unused
    (tmp_path / "m.toml").write_text(wrong)
    run = lmspec_main("import", "hf", directory, "--spec", tmp_path / "s.arch", "--map", tmp_path / "m.toml",
                     *sizes(directory), "-o", tmp_path / "run")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert f"(by the map {tmp_path / 'm.toml'})" in line
    assert ("4 tensors missing: model.layers.0.self_attn.out_proj.weight (the spec's block.0.attn.proj.weight "
            "needs it), model.layers.1.self_attn.out_proj.weight (the spec's block.1.attn.proj.weight needs it) "
            "and 2 more") in line
    assert ("4 tensors of another shape: model.layers.0.mlp.up_proj.weight has shape [96, 64] but the spec's "
            "block.0.mlp.proj.weight needs [64, 96]") in line
    assert "8 tensors with no place in the spec: model.layers.0.mlp.down_proj.weight" in line
    assert not (tmp_path / "run").exists()
    other = lmspec_main("import", "hf", directory, "--spec", tmp_path / "s.arch", "--map",
                       ROOT / "runtime/hf/maps/llama.toml", *sizes(directory), "-o", tmp_path / "run")
    assert other.returncode == 1 and "model_type 'olmo2' is not one of the map's family.model_types" in other.stderr


@pytest.mark.parametrize("change, message", [
    (("keys = [\"num_key_value_heads\"]", "keyz = [\"num_key_value_heads\"]"),
     "m.toml:12: unknown key hyper.kv_heads.keyz (expected one of: keys, default, when, needed)"),
    (("[hyper]", "[hyper"), "m.toml:6:9: not TOML"),
    (('op = "mlp"', 'op = "mpl"'), "m.toml:30: op_args: op 'mpl' is not an op of the language"),
    ((', "model.layers.{i}.mlp.up_proj.weight"] }', '] }'), "params.'block.{i}.mlp.fc.weight': cat names two or more"),
    (('[params]', '[parameters]'), "unknown key parameters (expected one of: family, hyper, requires"),
    (('default = "hidden_size // num_attention_heads"', 'default = "hidden_size //"'),
     "hyper.head_dim.default: 'hidden_size //' is not an expression"),
])
def test_mistakes_in_a_map_are_located_errors(change, message):
    _, map_text = readme_example()
    old, new = change
    assert old in map_text
    with pytest.raises(MapError) as info:
        parse_map(map_text.replace(old, new, 1), "m.toml")
    assert message in str(info.value), str(info.value)


def test_the_readme_spec_has_the_parameters_transformers_builds_for_olmo2_1b():
    from lmspec.compiler import load_spec
    from lmspec.compiler.analysis import parameter_count

    spec_text, _map = readme_example()
    graph = load_spec("olmo2.arch", sources={"olmo2.arch": spec_text})
    with torch.device("meta"):
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**PUBLISHED))
    assert parameter_count(graph) == sum(p.numel() for p in model.parameters()) == 1_484_916_736


def test_every_shipped_family_is_a_map():
    from lmspec.runtime.hf.shipped import shipped_families

    families = shipped_families()
    assert list(families) == ["gpt2", "llama", "qwen3", "qwen3_moe", "phi3", "granite", "starcoder2", "stablelm",
                              "gemma", "olmo", "gemma3", "smollm3"]
    assert families["llama"].model_types == ("llama", "mistral", "qwen2")
    assert families["gpt2"].base_config["gpt2"] == {"n_inner": None}  # `null = [...]` in TOML
    assert "llama/llama3" in families["llama"].templates


@pytest.mark.parametrize("spec, family, model_type", [
    ("gemma-2b", "gemma", "gemma"), ("olmo-1b", "olmo", "olmo"), ("gemma3-1b", "gemma3", "gemma3_text"),
    ("granite-3.0-2b", "granite", "granite"), ("smollm3-3b", "smollm3", "smollm3"), ("llama3.2-1b", "llama", "llama"),
    ("gpt2", "gpt2", "gpt2"), ("starcoder2-3b", "starcoder2", "starcoder2"), ("mistral-7b", "llama", "mistral"),
])
def test_export_of_a_checkpoint_never_imported_finds_its_own_family(spec, family, model_type):
    """A Llama map holds a Gemma or OLMo spec's parameters too; the family is the one whose template
    builds the spec's graph, so the written config.json computes what the spec does."""
    from lmspec.compiler import load_spec
    from lmspec.runtime.hf.names import infer_family

    found, found_type = infer_family(load_spec(str(ROOT / "specs" / f"{spec}.arch")))
    assert (found.name, found_type) == (family, model_type)


def test_an_olmo_trained_here_exports_to_a_model_transformers_runs_the_same(tmp_path):
    from lmspec.compiler import load_spec
    from lmspec.compiler.lower import lower
    from lmspec.compiler.rewrites import spec_record
    from lmspec.runtime.checkpoint.store import save_checkpoint
    from lmspec.runtime.data.tokenizer import FileTokenizer
    from test_hf import _load, _word_tokenizer

    sizes = {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 4, "head_dim": 16, "ffn": 96, "vocab": 1000,
             "context": 128}
    graph = load_spec(str(ROOT / "specs/olmo-1b.arch"), overrides=sizes)
    _word_tokenizer(tmp_path / "tokenizer.json", 1000)
    save_checkpoint(tmp_path / "run", step=0, model=lower(graph, seed=0), optimizer=None, rng=None, train_config={},
                    metrics={}, tokenizer=FileTokenizer.from_path(tmp_path / "tokenizer.json").to_json(),
                    spec=spec_record(graph, sizes))
    run = lmspec_main("export", "hf", tmp_path / "run", "-o", tmp_path / "hf")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "olmo"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - _load(tmp_path / "run")(tokens)).abs().max().item() <= 1e-4
