"""How runtime/distributed/fsdp.py groups a lowered model for FSDP2 and names its consolidated weights
(the multi-process behaviour is in test_distributed.py)."""
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_model

from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from lmspec.runtime.distributed.fsdp import block_units, kept_names

ROOT = Path(__file__).resolve().parents[3]


def test_each_block_is_one_unit_of_the_op_modules_it_calls():
    model = lower(load_spec(str(ROOT / "specs" / "tiny.arch"), {"layers": 3}))
    units = block_units(model)
    assert list(units) == ["block.0", "block.1", "block.2"]
    assert units["block.1"] == ["block.1.ln", "block.1.attn", "block.1.ln_1", "block.1.mlp"]
    in_units = {name for names in units.values() for name in names}
    # every parameter is in exactly one unit or in the root (embeddings, final norm, the tied head)
    root = [n for n, _ in model.named_parameters() if not any(n.startswith(u + ".") for u in in_units)]
    assert sorted(root) == ["ln_f.bias", "ln_f.weight", "wpe.weight", "wte.weight"]  # wte is the head's too


def test_a_module_sharing_a_weight_with_the_outside_stays_with_the_root():
    model = lower(load_spec(str(ROOT / "specs" / "tiny.arch"), {"layers": 2}))
    block0, block1 = model.get_submodule("block.0"), model.get_submodule("block.1")
    block1.mlp.fc.weight = block0.mlp.fc.weight  # one parameter, two modules
    units = block_units(model)
    assert "block.0.mlp" not in units["block.0"] and "block.1.mlp" not in units["block.1"]
    assert "block.0.attn" in units["block.0"]


def test_consolidated_weights_are_named_as_a_plain_checkpoint_names_them(tmp_path):
    model = lower(load_spec(str(ROOT / "specs" / "tiny.arch"), {"layers": 2}))
    save_model(model, str(tmp_path / "plain.safetensors"))
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as f:
        assert sorted(kept_names(model)) == sorted(f.keys())
