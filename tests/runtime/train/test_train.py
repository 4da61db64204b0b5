import json
import math

import pytest
import torch
from torch import nn

from diverging import GoesBad
from lmspec.runtime.checkpoint.store import CheckpointError, find_checkpoint, load_checkpoint
from lmspec.runtime.data.token_data import TokenData
from lmspec.runtime.train.metrics import MetricsLog, plot_loss_curve, read_metrics
from lmspec.runtime.train.schedule import learning_rate
from lmspec.runtime.data.tokenizer import CharTokenizer
from lmspec.runtime.errors import ConfigError, TrainingError
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.loop import train

SPEC = {"file": "tests/reference_gpt.py", "overrides": {}}


@pytest.fixture(scope="module")
def verdict(verdict_text):
    tokenizer = CharTokenizer.from_text(verdict_text)
    return tokenizer, TokenData(torch.tensor(tokenizer.encode(verdict_text)))


class InterruptAt(nn.Module):
    """Wraps a model and raises KeyboardInterrupt (as Ctrl-C would) on its n-th training forward."""

    def __init__(self, model: nn.Module, at_call: int | None = None):
        super().__init__()
        self.model = model
        self.context = model.context
        self.calls_left = at_call

    def forward(self, tokens, cache=None):
        if self.training and self.calls_left is not None:
            self.calls_left -= 1
            if self.calls_left == 0:
                raise KeyboardInterrupt
        return self.model(tokens)


# -------------------------------------------------------------------------------------- schedule

def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    rate = lambda step: learning_rate(step, max_lr=1.0, min_lr=0.1, warmup=10, decay_steps=110)  # noqa: E731
    assert [rate(s) for s in range(3)] == pytest.approx([1 / 11, 2 / 11, 3 / 11])
    assert rate(10) == pytest.approx(1.0)
    assert rate(60) == pytest.approx(0.55)  # half way down the cosine
    assert rate(110) == pytest.approx(0.1) and rate(500) == pytest.approx(0.1)
    after = [rate(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_schedule_without_warmup():
    assert learning_rate(0, max_lr=2.0, min_lr=0.0, warmup=0, decay_steps=100) == pytest.approx(2.0)
    assert learning_rate(100, max_lr=2.0, min_lr=0.0, warmup=0, decay_steps=100) == 0.0


# --------------------------------------------------------------------------------------- metrics

def test_metrics_resume_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog.fresh(path)
    for step in range(1, 8):
        log.append({"step": step, "loss": 1.0 / step})
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # the partial line a killed run can leave
    MetricsLog.resumed(path, 5).append({"step": 6, "loss": 9.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25), (5, 0.2), (6, 9.0)]


def test_loss_curve_is_a_png(tmp_path):
    log = MetricsLog.fresh(tmp_path / "m.jsonl")
    for step in range(1, 21):
        record = {"step": step, "loss": 3.0 - step / 10}
        if step % 5 == 0:
            record["val_loss"] = 3.2 - step / 10
        log.append(record)
    plot_loss_curve(tmp_path / "m.jsonl", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


# ---------------------------------------------------------------------------------------- config

def test_config_defaults_follow_the_model():
    cfg = TrainConfig(lr=3e-3).resolved(context=64)
    assert cfg.seq == 64 and cfg.min_lr == pytest.approx(3e-4)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("field, value, message", [
    ("seq", 65, "seq must be between 1 and the model's context 64, got 65"),
    ("steps", 0, "steps must be an integer >= 1, got 0"),
    ("min_lr", 1.0, "min_lr must be between 0 and lr"),
    ("grad_accum", 0, "grad_accum must be an integer >= 1"),
    ("betas", (0.9, 1.0), "betas must be two numbers in"),
    ("grad_clip", -1.0, "grad_clip must be a finite number >= 0"),
    ("lr", float("inf"), "lr must be a finite number > 0, got inf"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number >= 0, got nan"),
    ("seed", -1, r"seed must be an integer >= 0 and < 2\^63, got -1"),
    # lr 1e-3 x 1000: AdamW would scale the weights by 0 each step (the fuzz's 1e12 flipped them to 1e7)
    ("weight_decay", 1000.0, r"lr x weight_decay must be below 1, got 0.001 x 1000 = 1 \(AdamW scales"),
])
def test_bad_config_names_the_setting(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value}).resolved(context=64)


# -------------------------------------------------------------------------------------- training

def test_training_lowers_the_loss(tmp_path, verdict, tiny_gpt):
    tokenizer, data = verdict
    model = tiny_gpt(tokenizer.vocab_size)
    cfg = TrainConfig(steps=30, batch=8, seq=32, lr=1e-2, warmup=5, eval_every=10, eval_batches=4,
                      ckpt_every=10, keep=2, seed=1, log_every=1)
    summary = train(model, tokenizer, data, cfg, tmp_path, SPEC, progress=False)

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    losses = [r["loss"] for r in records]
    assert losses[0] == pytest.approx(math.log(tokenizer.vocab_size), abs=0.3)  # uniform guess at first
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in records)

    assert summary["steps"] == 30 and summary["loss"] == losses[-1] and summary["val_loss"] == vals[-1]
    assert summary["tokens"] == 30 * 8 * 32
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000020", "step_000030"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 30 and ckpt.spec == SPEC and ckpt.tokenizer == tokenizer.to_json()
    assert ckpt.metrics["val_loss"] == vals[-1]


def test_resume_continues_exactly(tmp_path, verdict, tiny_gpt):
    """Stopped by Ctrl-C in step 14 and resumed from the step-8 checkpoint, a run logs the same
    losses as one that never stopped: dropout, batches, optimizer and schedule all line up."""
    tokenizer, data = verdict
    cfg = TrainConfig(steps=20, batch=4, seq=32, lr=1e-2, warmup=4, grad_accum=2, eval_every=5,
                      eval_batches=2, ckpt_every=8, keep=2, seed=3, log_every=1)
    make = lambda init_seed, at_call=None: InterruptAt(  # noqa: E731
        tiny_gpt(tokenizer.vocab_size, init_seed=init_seed, dropout=0.1), at_call)

    straight = make(init_seed=0)
    train(straight, tokenizer, data, cfg, tmp_path / "straight", SPEC, progress=False)

    stopped = make(init_seed=0, at_call=13 * cfg.grad_accum + 1)  # first forward of step 14
    with pytest.raises(KeyboardInterrupt):
        train(stopped, tokenizer, data, cfg, tmp_path / "resumed", SPEC, progress=False)
    assert load_checkpoint(tmp_path / "resumed").step == 8
    assert read_metrics(tmp_path / "resumed" / "metrics.jsonl")[-1]["step"] == 13

    torch.manual_seed(12345)  # a different process state: everything must come from the checkpoint
    resumed = make(init_seed=99)
    summary = train(resumed, tokenizer, data, cfg, tmp_path / "resumed", SPEC, resume=True, progress=False)
    assert summary["start_step"] == 8 and summary["steps"] == 20
    assert summary["config_from_checkpoint"] == {}

    expected = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    got = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 21))
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), a["step"]
        assert b["lr"] == a["lr"]
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-6)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name
    # Dropout really was on, so the RNG really had to be restored.
    assert expected[0]["loss"] != pytest.approx(expected[1]["loss"], abs=1e-6)


def test_evaluation_does_not_change_training(tmp_path, verdict, tiny_gpt):
    # Evaluating draws nothing from the training RNG, so how often it runs cannot move the losses.
    tokenizer, data = verdict
    losses = []
    for name, eval_every, eval_batches in (("often", 1, 3), ("never", 0, 0)):
        cfg = TrainConfig(steps=6, batch=2, seq=16, lr=1e-2, warmup=1, eval_every=eval_every,
                          eval_batches=eval_batches, log_every=1)
        train(tiny_gpt(tokenizer.vocab_size, dropout=0.2), tokenizer, data, cfg, tmp_path / name, SPEC,
              progress=False)
        losses.append([r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")])
    assert losses[0] == losses[1]


def test_resume_takes_the_trajectory_settings_from_the_checkpoint(tmp_path, verdict, tiny_gpt):
    tokenizer, data = verdict
    cfg = TrainConfig(steps=4, batch=2, seq=16, lr=1e-2, warmup=1, eval_batches=1, ckpt_every=2, log_every=1)
    train(tiny_gpt(tokenizer.vocab_size), tokenizer, data, cfg, tmp_path, SPEC, progress=False)
    longer = TrainConfig(steps=6, batch=2, seq=16, lr=5e-2, warmup=1, eval_batches=1, log_every=1)
    summary = train(tiny_gpt(tokenizer.vocab_size), tokenizer, data, longer, tmp_path, SPEC,
                    resume=True, progress=False)
    assert summary["config_from_checkpoint"] == {"lr": {"given": 5e-2, "used": 1e-2}}
    assert summary["config"]["lr"] == 1e-2 and summary["steps"] == 6
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 7))


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path, verdict, tiny_gpt):
    tokenizer, data = verdict
    cfg = TrainConfig(steps=2, batch=2, seq=16, warmup=0, eval_batches=0)
    train(tiny_gpt(tokenizer.vocab_size), tokenizer, data, cfg, tmp_path, SPEC, progress=False)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(tiny_gpt(tokenizer.vocab_size), tokenizer, data, cfg, tmp_path, SPEC, progress=False)


def test_resume_without_a_checkpoint(tmp_path, verdict, tiny_gpt):
    tokenizer, data = verdict
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        train(tiny_gpt(tokenizer.vocab_size), tokenizer, data, TrainConfig(steps=2), tmp_path, SPEC,
              resume=True, progress=False)


def test_resume_with_another_tokenizer(tmp_path, verdict, tiny_gpt):
    tokenizer, data = verdict
    cfg = TrainConfig(steps=1, batch=2, seq=16, warmup=0, eval_batches=0)
    train(tiny_gpt(tokenizer.vocab_size), tokenizer, data, cfg, tmp_path, SPEC, progress=False)
    other = CharTokenizer(tokenizer.chars[::-1])
    with pytest.raises(CheckpointError, match="different tokenizer"):
        train(tiny_gpt(tokenizer.vocab_size), other, data, cfg, tmp_path, SPEC, resume=True, progress=False)


def test_model_vocab_smaller_than_the_tokenizer(tmp_path, verdict, tiny_gpt):
    tokenizer, data = verdict
    with pytest.raises(ConfigError, match=f"the model predicts 10 tokens but the tokenizer has {tokenizer.vocab_size}"):
        train(tiny_gpt(10), tokenizer, data, TrainConfig(steps=1, batch=1, seq=8), tmp_path, SPEC, progress=False)


def test_sequence_longer_than_the_data(tmp_path, tiny_gpt):
    tokenizer = CharTokenizer.from_text("abcdefgh")
    data = TokenData(torch.tensor(tokenizer.encode("abcdefgh" * 3)))
    with pytest.raises(Exception, match="training split has 21 tokens"):
        train(tiny_gpt(8), tokenizer, data, TrainConfig(steps=1, seq=32), tmp_path, SPEC, progress=False)


def test_what_counts_as_diverging():
    from lmspec.runtime.train.divergence import divergence

    nan, inf = float("nan"), float("inf")
    assert divergence(3, loss=2.5, grad_norm=1e6, val_loss=3.0) is None  # large is not diverged
    assert divergence(3, loss=nan) == "the loss became nan at step 3"
    assert divergence(3, loss=2.5, grad_norm=inf).startswith("the gradient norm became inf at step 3")
    assert divergence(3, loss=2.5, grad_norm=inf, scaled=True) is None  # fp16: the scaler skips the step
    assert divergence(3, loss=2.5, grad_norm=None) is None  # a loop that reads no norm
    assert divergence(3, val_loss=nan, evaluated="evaluated train loss") == (
        "the evaluated train loss became nan at step 3: the weights are no longer finite")


@pytest.mark.parametrize("part, evaluating, message", [
    # before: a NaN gradient norm (logged as null, as fp16's skipped steps are) let AdamW write NaN weights
    # into the next checkpoint, and `sample` of it failed inside torch.multinomial
    ("gradient", False,
     r"the gradient norm became nan at step 7, so its update left weights that are not finite"),
    ("validation", True, r"the validation loss became nan at step 8: the weights are no longer finite"),
])
def test_a_gradient_or_validation_loss_that_is_not_finite_stops_training_before_a_checkpoint(
        tmp_path, verdict, tiny_gpt, part, evaluating, message):
    tokenizer, data = verdict
    cfg = TrainConfig(steps=20, batch=1, seq=8, log_every=10, ckpt_every=4, eval_every=4,
                      eval_batches=1 if evaluating else 0)
    with pytest.raises(TrainingError, match=message + r"; .*step_000004\)"):
        train(GoesBad(tiny_gpt(tokenizer.vocab_size), after=6, part=part), tokenizer, data, cfg, tmp_path, SPEC, progress=False)
    assert find_checkpoint(tmp_path).name == "step_000004"


def test_diverging_loss_stops_training_before_a_checkpoint_holds_it(tmp_path, verdict, tiny_gpt):
    tokenizer, data = verdict
    # The loss is read only at the logged and checkpointed steps (4, 8, 10, ...): step 7 goes bad, and
    # step 8's read names it, before step 8's checkpoint is written.
    cfg = TrainConfig(steps=20, batch=1, seq=8, log_every=10, ckpt_every=4, eval_batches=0)
    with pytest.raises(TrainingError, match=r"the loss became nan at step 7; .*step_000004\)"):
        train(GoesBad(tiny_gpt(tokenizer.vocab_size), after=6), tokenizer, data, cfg, tmp_path, SPEC, progress=False)
    assert find_checkpoint(tmp_path).name == "step_000004"
