import json

import pytest
import torch
import torch.nn.functional as F

import lmspec.runtime.checkpoint.store as checkpoint_module
from lmspec.runtime.checkpoint.store import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.steps import make_optimizer

VOCAB = 20


def _trained(tiny_gpt, steps=2, init_seed=0):
    """A tiny model and its AdamW after a few steps, so the optimizer has real state."""
    model = tiny_gpt(VOCAB, init_seed=init_seed)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    for i in range(steps):
        _step(model, optimizer, seed=i)
    return model, optimizer


def _step(model, optimizer, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(VOCAB, (2, 16), generator=gen)
    logits = model(x)
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
    optimizer.step()
    optimizer.zero_grad()


def _save(run_dir, step, model, optimizer=None, keep=3, **extra):
    fields = dict(rng={"torch_cpu": torch.get_rng_state()}, train_config={"steps": 10},
                  metrics={"elapsed": 1.5}, tokenizer='{"kind": "char", "chars": "ab"}',
                  spec={"file": "x.arch", "overrides": {"layers": 2}})
    fields.update(extra)
    return save_checkpoint(run_dir, step=step, model=model, optimizer=optimizer, keep=keep, **fields)


def test_layout_and_metadata(tmp_path, tiny_gpt):
    model, optimizer = _trained(tiny_gpt)
    path = _save(tmp_path, 500, model, optimizer)
    assert path == tmp_path / "checkpoints" / "step_000500"
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000500\n"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 500 and meta["spec"] == {"file": "x.arch", "overrides": {"layers": 2}}
    ckpt = load_checkpoint(tmp_path)
    assert (ckpt.step, ckpt.train_config, ckpt.metrics) == (500, {"steps": 10}, {"elapsed": 1.5})
    assert ckpt.tokenizer == '{"kind": "char", "chars": "ab"}'


def test_model_round_trip_keeps_tied_weights(tmp_path, tiny_gpt):
    model, optimizer = _trained(tiny_gpt)
    _save(tmp_path, 1, model, optimizer)
    fresh = tiny_gpt(VOCAB, init_seed=99)
    load_checkpoint(tmp_path).load_model(fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


def test_optimizer_round_trip_is_exact(tmp_path, tiny_gpt):
    model, optimizer = _trained(tiny_gpt, steps=3)
    _save(tmp_path, 3, model, optimizer)
    state = optimizer.state_dict()["state"]
    names = [n for n, _ in model.named_parameters()]
    with checkpoint_module.safe_open(str(tmp_path / "checkpoints/step_000003/optimizer.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"{names[0]}.exp_avg" in keys and f"{names[0]}.exp_avg_sq" in keys and f"{names[0]}.step" in keys

    model2 = tiny_gpt(VOCAB, init_seed=7)
    optimizer2 = make_optimizer(model2, TrainConfig(lr=1e-2))
    ckpt = load_checkpoint(tmp_path)
    ckpt.load_model(model2)
    ckpt.load_optimizer(optimizer2, model2)
    state2 = optimizer2.state_dict()
    assert state2["param_groups"] == optimizer.state_dict()["param_groups"]
    for index, values in state.items():
        for key, tensor in values.items():
            assert torch.equal(tensor, state2["state"][index][key]), (index, key)
    # The proof that matters: the next step lands on identical weights.
    _step(model, optimizer, seed=10)
    _step(model2, optimizer2, seed=10)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_rng_states_round_trip(tmp_path, tiny_gpt):
    model = tiny_gpt(VOCAB)
    gen = torch.Generator().manual_seed(4)
    _save(tmp_path, 1, model, rng={"torch_cpu": torch.get_rng_state(), "batch_generator": gen.get_state()})
    states = load_checkpoint(tmp_path).rng_states()
    assert torch.equal(states["batch_generator"], gen.get_state())
    assert torch.equal(states["torch_cpu"], torch.get_rng_state())


def test_keeps_the_last_k(tmp_path, tiny_gpt):
    model = tiny_gpt(VOCAB)
    for step in (100, 200, 300, 400, 500):
        _save(tmp_path, step, model, keep=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000300", "step_000400", "step_000500"]
    assert load_checkpoint(tmp_path).step == 500


def test_saving_an_earlier_step_drops_the_abandoned_later_ones(tmp_path, tiny_gpt):
    # A run resumed from step 200 overwrites history: a stale step_000300 must not outlive it.
    model = tiny_gpt(VOCAB)
    for step in (100, 200, 300):
        _save(tmp_path, step, model)
    (tmp_path / "checkpoints" / "latest").write_text("step_000200\n")
    _save(tmp_path, 250, model)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000100", "step_000200", "step_000250"]


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, tiny_gpt, monkeypatch):
    model, optimizer = _trained(tiny_gpt)
    _save(tmp_path, 100, model, optimizer)
    before = (tmp_path / "checkpoints" / "step_000100" / "model.safetensors").read_bytes()

    def interrupted(*args, **kwargs):  # Ctrl-C after model.safetensors, while writing the optimizer
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 200, model, optimizer)
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000100"]  # no half-written step_000200, no temporary left
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 100
    assert (ckpt.path / "model.safetensors").read_bytes() == before


def test_stale_temporary_from_a_killed_save_is_ignored_then_removed(tmp_path, tiny_gpt):
    model = tiny_gpt(VOCAB)
    _save(tmp_path, 100, model)
    stale = tmp_path / "checkpoints" / ".tmp-step_000200-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert load_checkpoint(tmp_path).step == 100
    _save(tmp_path, 200, model)
    assert not stale.exists()
    assert load_checkpoint(tmp_path).step == 200


def test_accepts_run_dir_checkpoints_dir_or_step_dir(tmp_path, tiny_gpt):
    model = tiny_gpt(VOCAB)
    _save(tmp_path, 100, model)
    _save(tmp_path, 200, model)
    assert load_checkpoint(tmp_path).step == 200
    assert load_checkpoint(tmp_path / "checkpoints").step == 200
    assert load_checkpoint(tmp_path / "checkpoints" / "step_000100").step == 100


def test_without_latest_the_newest_directory_is_used(tmp_path, tiny_gpt):
    # A crash between renaming the directory into place and writing `latest`.
    model = tiny_gpt(VOCAB)
    _save(tmp_path, 100, model)
    _save(tmp_path, 200, model)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert load_checkpoint(tmp_path).step == 200


def test_no_checkpoint(tmp_path):
    assert find_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint(tmp_path / "absent")


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("file, action, message", [
    ("model.safetensors", _corrupt, r"model.safetensors: corrupt or unreadable"),
    ("model.safetensors", lambda p: p.write_bytes(b""), r"model.safetensors: corrupt or unreadable"),
    ("model.safetensors", lambda p: p.unlink(), r"model.safetensors: missing"),
    ("meta.json", lambda p: p.write_text('{"step": 1'), r"meta.json: corrupt"),
    ("meta.json", lambda p: p.unlink(), r"meta.json: missing"),
    ("meta.json", lambda p: p.write_text('{"step": "x"}'), r"meta.json: field 'step' is missing"),
])
def test_corrupt_files_fail_on_load_naming_the_file_and_the_checkpoint_to_use(tmp_path, tiny_gpt, file, action,
                                                                                message):
    model, optimizer = _trained(tiny_gpt)
    earlier = _save(tmp_path, 1, model, optimizer)
    step_dir = _save(tmp_path, 2, model, optimizer)
    action(step_dir / file)
    with pytest.raises(CheckpointError, match=f"{message}.*; step_000001 is intact: load {earlier} instead"):
        load_checkpoint(tmp_path)
    _corrupt(earlier / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{message}.*; no earlier checkpoint of this run is intact"):
        load_checkpoint(tmp_path)


def _read_optimizer(ckpt, model, optimizer):
    ckpt.load_optimizer(optimizer, model)


def _read_rng(ckpt, model, optimizer):
    ckpt.rng_states()


@pytest.mark.parametrize("file, action, read, message", [
    # a truncated file no longer matches its recorded checksum, which is checked before it is parsed
    ("optimizer.safetensors", _corrupt, _read_optimizer, r"optimizer.safetensors: checksum mismatch"),
    ("optimizer.safetensors", lambda p: p.unlink(), _read_optimizer, r"optimizer.safetensors: missing"),
    ("rng.safetensors", _corrupt, _read_rng, r"rng.safetensors: checksum mismatch"),
    ("rng.safetensors", lambda p: p.unlink(), _read_rng, r"rng.safetensors: missing"),
])
def test_corrupt_resume_files_fail_when_read(tmp_path, tiny_gpt, file, action, read, message):
    model, optimizer = _trained(tiny_gpt)
    step_dir = _save(tmp_path, 1, model, optimizer)
    action(step_dir / file)
    ckpt = load_checkpoint(tmp_path)  # the weights and metadata are fine
    with pytest.raises(CheckpointError, match=message):
        read(ckpt, model, optimizer)


def test_latest_naming_a_missing_directory(tmp_path, tiny_gpt):
    _save(tmp_path, 1, tiny_gpt(VOCAB))
    (tmp_path / "checkpoints" / "latest").write_text("step_000999\n")
    with pytest.raises(CheckpointError, match=r"latest: names 'step_000999', which is not a checkpoint"):
        load_checkpoint(tmp_path)


def test_weights_for_another_model_are_refused(tmp_path, tiny_gpt):
    model, optimizer = _trained(tiny_gpt)
    _save(tmp_path, 1, model, optimizer)
    ckpt = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors: does not fit the model"):
        ckpt.load_model(tiny_gpt(VOCAB, dim=64))
    with pytest.raises(CheckpointError, match="model.safetensors: does not fit the model"):
        ckpt.load_model(tiny_gpt(VOCAB, layers=3))
    deeper = tiny_gpt(VOCAB, layers=3)
    with pytest.raises(CheckpointError, match="optimizer.safetensors: optimizer parameter groups do not match"):
        ckpt.load_optimizer(make_optimizer(deeper, TrainConfig()), deeper)


def test_unserialisable_metadata_is_refused_before_writing(tmp_path, tiny_gpt):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        _save(tmp_path, 1, tiny_gpt(VOCAB), spec={"bad": object()})
    assert find_checkpoint(tmp_path) is None
