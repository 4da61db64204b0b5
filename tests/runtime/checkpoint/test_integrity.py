"""Checksums of checkpoint files: recorded for every file a save writes, verified by every reader, a
flipped byte a located error that names the intact earlier checkpoint, which then resumes exactly."""
import json
import shutil
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from lmspec.runtime.checkpoint.integrity import check_run
from lmspec.runtime.checkpoint.store import (
    OPTIMIZER_DCP_DIR, CheckpointError, load_checkpoint, read_optimizer_by_name, save_checkpoint,
)
from lmspec.runtime.checksum import file_checksum
from lmspec.runtime.cli.main import main
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.steps import make_optimizer
from runtime_helpers import ROOT, SMALL, VERDICT, lmspec_cli, lmspec_main, losses

VOCAB = 20
TRAIN = ["train", str(ROOT / "specs" / "tiny.arch"), *SMALL, "--data", str(VERDICT), "--steps", "40",
         "--ckpt-every", "20", "--eval-every", "20", "--eval-batches", "2", "--warmup", "5", "--batch", "4",
         "--threads", "1", "--no-progress", "--sample-tokens", "0", "--set", "dropout=0.1"]


def flip(path, from_end=100):
    """Flip one bit of one byte near the end of a file: in the tensor data, past the safetensors header."""
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x01
    path.write_bytes(bytes(data))


def meta(step_dir) -> dict:
    return json.loads((step_dir / "meta.json").read_text())


def _save(run_dir, step, model, optimizer=None, **extra):
    fields = dict(rng={"torch_cpu": torch.get_rng_state()}, train_config={}, metrics={},
                  tokenizer='{"kind": "char", "chars": "ab"}', spec={"file": "x.arch"})
    return save_checkpoint(run_dir, step=step, model=model, optimizer=optimizer, **(fields | extra))


def _trained(tiny_gpt):
    model = tiny_gpt(VOCAB)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    x = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()
    optimizer.step()
    return model, optimizer


# ------------------------------------------------------------------------------------ the store

def test_every_file_a_save_writes_has_its_checksum_in_meta(tmp_path, tiny_gpt):
    model, optimizer = _trained(tiny_gpt)
    step_dir = _save(tmp_path, 1, model, optimizer)
    sums = meta(step_dir)["checksums"]
    assert sorted(sums) == sorted(p.name for p in step_dir.iterdir() if p.name != "meta.json") == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    for name, value in sums.items():
        assert value.startswith("xxh3_128:") and value == file_checksum(step_dir / name)


@pytest.mark.parametrize("file, read", [
    ("model.safetensors", lambda ckpt, model, opt: ckpt.load_model(model)),
    ("optimizer.safetensors", lambda ckpt, model, opt: ckpt.load_optimizer(opt, model)),
    ("rng.safetensors", lambda ckpt, model, opt: ckpt.rng_states()),
])
def test_a_flipped_byte_is_a_located_error_naming_the_intact_checkpoint(tmp_path, tiny_gpt, file, read):
    model, optimizer = _trained(tiny_gpt)
    _save(tmp_path, 1, model, optimizer)
    newest = _save(tmp_path, 2, model, optimizer)
    flip(newest / file)
    ckpt = load_checkpoint(tmp_path)  # the metadata and the weights' header are fine
    with pytest.raises(CheckpointError) as caught:
        read(ckpt, model, optimizer)
    assert str(caught.value) == (
        f"{newest / file}: checksum mismatch (the file is corrupt); step_000001 is intact: load "
        f"{tmp_path / 'checkpoints' / 'step_000001'} instead, or resume from it with "
        f"`echo step_000001 > {tmp_path / 'checkpoints' / 'latest'}` and `lmspec train … --resume`")
    flip(tmp_path / "checkpoints" / "step_000001" / file)  # now neither is intact
    with pytest.raises(CheckpointError, match=f"{file}: checksum mismatch .* no earlier checkpoint of this run is "
                                              f"intact; restore the file from a copy"):
        read(ckpt, model, optimizer)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp in one process, as asked
def test_a_sharded_optimizer_has_a_checksum_per_file_and_each_is_verified(tmp_path, tiny_gpt):
    """optimizer.dcp/ as an FSDP run stages it (here written by one process): every file recorded."""
    model, optimizer = _trained(tiny_gpt)
    staging = tmp_path / "checkpoints" / ".tmp-dcp-step_000001"
    staging.mkdir(parents=True)
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(staging), no_dist=True)
    step_dir = _save(tmp_path, 1, model, None, move_in={OPTIMIZER_DCP_DIR: staging})
    sums = meta(step_dir)["checksums"]
    written = sorted(p.relative_to(step_dir).as_posix() for p in (step_dir / OPTIMIZER_DCP_DIR).iterdir())
    assert written == ["optimizer.dcp/.metadata", "optimizer.dcp/__0_0.distcp"]
    assert set(written) <= set(sums)
    before = read_optimizer_by_name(step_dir)["state"]
    shard = step_dir / OPTIMIZER_DCP_DIR / "__0_0.distcp"
    flip(shard)
    with pytest.raises(CheckpointError, match=f"^{shard}: checksum mismatch \\(the file is corrupt\\); no earlier"):
        read_optimizer_by_name(step_dir)
    fresh = make_optimizer(model, TrainConfig(lr=1e-2))
    with pytest.raises(CheckpointError, match=f"^{shard}: checksum mismatch"):
        load_checkpoint(tmp_path).load_optimizer(fresh, model)
    flip(shard)  # flipped back: the same state as before
    after = read_optimizer_by_name(step_dir)["state"]
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])


def test_checkpoints_from_before_checksums_load_unchecked(tmp_path, tiny_gpt):
    model, optimizer = _trained(tiny_gpt)
    step_dir = _save(tmp_path, 1, model, optimizer)
    old = meta(step_dir)
    del old["checksums"]
    (step_dir / "meta.json").write_text(json.dumps(old))
    fresh = tiny_gpt(VOCAB, init_seed=5)
    load_checkpoint(tmp_path).load_model(fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    [report] = check_run(tmp_path)
    assert report.unrecorded and not report.problems and not report.intact


def test_a_checksum_of_an_unknown_algorithm_or_a_malformed_one_is_refused(tmp_path, tiny_gpt):
    step_dir = _save(tmp_path, 1, tiny_gpt(VOCAB))
    record = meta(step_dir)
    record["checksums"]["model.safetensors"] = "blake9:00ff"
    (step_dir / "meta.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be verified: unknown checksum algorithm "
                                              "'blake9' \\(written by a newer lmspec\\?\\)"):
        load_checkpoint(tmp_path).load_model(tiny_gpt(VOCAB))
    record["checksums"]["model.safetensors"] = "not a checksum"
    (step_dir / "meta.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="meta.json: field 'checksums' is corrupt"):
        load_checkpoint(tmp_path).load_model(tiny_gpt(VOCAB))


# ------------------------------------------------------------------- the command line, one run

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """40 steps of the tiny model, checkpoints at steps 20 and 40: the uninterrupted reference."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    assert main([*TRAIN, "--out", str(run)]) == 0
    return run


def test_every_reader_refuses_flipped_weights_and_the_intact_checkpoint_resumes_exactly(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    checkpoints = copy / "checkpoints"
    weights = checkpoints / "step_000040" / "model.safetensors"
    flip(weights)
    located = (f"{weights}: checksum mismatch (the file is corrupt); step_000020 is intact: load "
               f"{checkpoints / 'step_000020'} instead, or resume from it with "
               f"`echo step_000020 > {checkpoints / 'latest'}` and `lmspec train … --resume`")
    capsys.readouterr()
    for argv in (["sample", copy, "--prompt", "I had", "--max-tokens", "3"],
                 ["eval", copy, "--data", VERDICT, "--max-tokens", "200"],
                 ["export", copy, "-o", tmp_path / "model.onnx"],
                 ["export", "hf", copy, "-o", tmp_path / "hf"],
                 [*TRAIN, "--out", copy, "--resume"]):
        assert main(list(map(str, argv))) == 1, argv
        err = capsys.readouterr().err
        assert err == f"lmspec {argv[0] if argv[1] != 'hf' else 'export hf'}: error: {located}\n", argv
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "hf").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000020", "step_000040"]

    verify = lmspec_cli("data", "verify", copy)  # a process of its own: the real exit status
    assert verify.returncode == 1, verify.stderr
    assert f"ok        {checkpoints / 'step_000020'} (3 files verified)" in verify.stdout
    assert f"damaged   {weights}: checksum mismatch (the file is corrupt)" in verify.stdout
    assert verify.stderr == (f"lmspec data verify: error: 1 damaged file: {weights}; step_000020 is intact: load "
                             f"{checkpoints / 'step_000020'} instead, or resume from it with "
                             f"`echo step_000020 > {checkpoints / 'latest'}` and `lmspec train … --resume`\n")

    # what the message says to do: resume from step 20, which redoes steps 21-40 exactly
    (checkpoints / "latest").write_text("step_000020\n")
    assert main([*TRAIN, "--out", str(copy), "--resume"]) == 0
    assert losses(copy) == losses(run)  # every step's loss, bit for bit
    redone, reference = meta(checkpoints / "step_000040"), meta(run / "checkpoints" / "step_000040")
    for file in ("model.safetensors", "rng.safetensors"):  # the same bytes
        assert redone["checksums"][file] == reference["checksums"][file]
    # AdamW's state the same too (the file's bytes may differ: safetensors orders its metadata as it likes)
    state = [read_optimizer_by_name(r / "checkpoints" / "step_000040") for r in (copy, run)]
    assert state[0]["param_groups"] == state[1]["param_groups"]
    assert all(torch.equal(v, state[1]["state"][n][k]) for n, values in state[0]["state"].items()
               for k, v in values.items())
    capsys.readouterr()
    assert main(["data", "verify", str(copy)]) == 0
    assert capsys.readouterr().out.count(" files verified)") == 2


@pytest.mark.parametrize("file", ["optimizer.safetensors", "rng.safetensors"])
def test_resume_refuses_a_flipped_optimizer_or_rng_file(run, tmp_path, capsys, file):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    damaged = copy / "checkpoints" / "step_000040" / file
    flip(damaged)
    capsys.readouterr()
    assert main([*TRAIN, "--out", str(copy), "--resume"]) == 1
    assert capsys.readouterr().err.startswith(
        f"lmspec train: error: {damaged}: checksum mismatch (the file is corrupt); step_000020 is intact: ")
    assert losses(copy) == losses(run)  # nothing was trained or logged on top of it


# ------------------------------------------------------------------------------ several ranks

@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on gloo")
def test_an_fsdp_checkpoint_records_every_ranks_files(tmp_path):
    import subprocess
    run = tmp_path / "fsdp"
    args = [*TRAIN, "--steps", "20", "--batch", "2", "--out", str(run)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "lmspec.runtime", *args, "--strategy", "fsdp"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    step_dir = run / "checkpoints" / "step_000020"
    sums = meta(step_dir)["checksums"]
    on_disk = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
    assert sorted(sums) == [f for f in on_disk if f != "meta.json"]
    assert {"optimizer.dcp/__0_0.distcp", "optimizer.dcp/__1_0.distcp", "optimizer.dcp/.metadata"} <= set(sums)
    assert all(sums[f] == file_checksum(step_dir / f) for f in sums)
    shard = step_dir / "optimizer.dcp" / "__1_0.distcp"  # written by rank 1
    flip(shard)
    resumed = lmspec_main(*args, "--resume")  # on one process: the whole AdamW state read from both shards
    assert resumed.returncode == 1
    assert resumed.stderr.startswith(f"lmspec train: error: {shard}: checksum mismatch (the file is corrupt)")
