"""`lmspec lora merge` end to end: an adapter checkpoint (adapters only, on a base checkpoint) is
folded into a plain checkpoint that gives the same logits, samples and exports; bad input is one
line and exit 1."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from runtime_helpers import SHARED_DATA, lmspec_main
from lmspec.compiler.lower import lower
from lmspec.compiler.rewrites import apply_rewrites
from lmspec.runtime.checkpoint.store import load_checkpoint, save_checkpoint
from lmspec.runtime.cli.main import main as cli_main
from lmspec.compiler.rewrites import graph_from_record
from lmspec.compiler.rewrites import spec_record
from lmspec.runtime.checkpoint.models import base_record, load_model
from lmspec.runtime.finetune.lora import mark_trainable, trainable_weights
from lmspec.runtime.data.tokenizer import load_tokenizer

LORA = {"kind": "lora", "rank": 4, "alpha": 8.0, "targets": ["attn.qkv", "attn.proj", "mlp.*"]}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A base checkpoint from `lmspec train` (in this process: the command line's entry point, without
    a second interpreter's start-up)."""
    run = tmp_path_factory.mktemp("lora_base") / "base"
    code = cli_main(["train", "specs/tiny.arch", "--set", "layers=2", "--set", "dim=32", "--set", "heads=2",
                     "--set", "context=32", "--data", str(SHARED_DATA / "the-verdict.txt"), "--steps", "3",
                     "--no-progress", "--sample-tokens", "0", "--out", str(run)])
    assert code == 0
    return run


def make_adapter_run(base_run, out):
    """Train adapters on the base a few steps on real text; save them alone, as a finetune verb does.
    Returns the adapted model, in eval mode."""
    base = load_checkpoint(base_run)
    graph = apply_rewrites(graph_from_record(base.spec), [LORA])
    model = lower(graph, seed=0)
    missing, unexpected = model.load_state_dict(load_model(base_run).model.state_dict(), strict=False)
    assert not unexpected and all(".lora_" in n for n in missing)
    mark_trainable(model, graph)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor(load_tokenizer(base.tokenizer).encode((SHARED_DATA / "the-verdict.txt").read_text()[:2000]))
    for step in range(4):
        batch = ids[step * 64:step * 64 + 4 * 17].view(4, 17)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    spec = spec_record(graph, base.spec["overrides"], rewrites=[LORA]) | {"base": base_record(base)}
    save_checkpoint(out, step=4, model=None, optimizer=None, rng=None, train_config={"lora": 4},
                    metrics={"loss": loss.item()}, tokenizer=base.tokenizer, spec=spec,
                    weights=trainable_weights(model))
    return model.eval()


@pytest.fixture(scope="module")
def adapter_run(base_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora_adapters") / "adapters"
    return run, make_adapter_run(base_run, run)


@pytest.fixture(scope="module")
def merged_run(adapter_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora_merged") / "merged"
    out = lmspec_main("lora", "merge", adapter_run[0], "--out", run)
    assert out.returncode == 0, out.stderr
    assert "merged the adapters of 8 matrices" in out.stdout
    return run


def test_merge_gives_a_plain_checkpoint_with_the_same_logits_that_samples(adapter_run, merged_run, base_run):
    run, adapted = adapter_run
    saved = load_checkpoint(run)
    from safetensors.torch import load_file
    own = load_file(str(saved.path / "model.safetensors"))
    assert own and all(".lora_" in name for name in own)  # an adapter checkpoint: adapters alone

    merged = load_checkpoint(merged_run)
    assert "base" not in merged.spec and "rewrites" not in merged.spec
    assert merged.spec["overrides"] == saved.spec["overrides"]
    assert (merged.step, merged.metrics, merged.tokenizer) == (saved.step, saved.metrics, saved.tokenizer)
    graph = graph_from_record(merged.spec)
    plain = lower(graph)
    merged.load_model(plain)  # strict: every weight, none of them adapters
    plain.eval()
    ids = torch.randint(0, 62, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), adapted(ids), atol=1e-5, rtol=1e-5)
        base = load_model(base_run).model
        assert (plain(ids) - base(ids)).abs().max() > 1e-3  # the merge changed the base's behaviour

    sample = lmspec_main("sample", merged_run, "--prompt", "I had", "--max-tokens", "8", "--temperature", "0")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("I had")


@pytest.mark.slow
def test_the_merged_checkpoint_exports_and_passes_its_parity_check(merged_run, tmp_path):
    exported = lmspec_main("export", merged_run, "-o", tmp_path / "bundle" / "merged.onnx")
    assert exported.returncode == 0, exported.stderr
    meta = json.loads((tmp_path / "bundle" / "merged.lmspec.json").read_text())
    assert meta["parity"]["fp32"]["empty_cache"] <= 1e-4 and meta["parity"]["fp32"]["filled_cache"] <= 1e-4


def lora_merge(capsys, *args):
    """`lmspec lora merge` in this process (the same entry point as the command line): exit code, stderr."""
    code = cli_main(["lora", "merge", *map(str, args)])
    return code, capsys.readouterr().err


def test_a_checkpoint_without_adapters_is_refused(base_run, tmp_path, capsys):
    code, err = lora_merge(capsys, base_run, "--out", tmp_path / "out")
    assert code == 1 and "has no LoRA adapters to merge" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_out_that_holds_a_run_is_refused(adapter_run, base_run, capsys):
    code, err = lora_merge(capsys, adapter_run[0], "--out", base_run)
    assert code == 1 and f"{base_run} already holds a run; choose another --out" in err


def test_a_missing_or_changed_base_is_refused(base_run, tmp_path, capsys):
    moved_base = tmp_path / "base"
    shutil.copytree(base_run, moved_base)
    make_adapter_run(moved_base, tmp_path / "adapters")
    weights = next(moved_base.glob("checkpoints/step_*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    code, err = lora_merge(capsys, tmp_path / "adapters", "--out", tmp_path / "out1")
    assert code == 1 and "has changed since the adapters were trained on it" in err and "Traceback" not in err
    weights.unlink()
    code, err = lora_merge(capsys, tmp_path / "adapters", "--out", tmp_path / "out2")
    assert code == 1 and "its base checkpoint" in err and "is missing" in err
    code, err = lora_merge(capsys, tmp_path / "nowhere", "--out", tmp_path / "out3")
    assert code == 1 and "no such file or directory" in err
