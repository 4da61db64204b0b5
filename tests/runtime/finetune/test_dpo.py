"""Preference tuning (DPO): the loss and reward margins against a hand computation, answer
log-probs that count only answer tokens (prompt and padding add nothing), the frozen reference,
log 2 and zero margins at step 0, `lmspec finetune dpo` end to end (held-out margin above zero after
training, whole weights or LoRA adapters), and its errors as one clear line."""
import copy
import json
import math

import pytest
import torch

from runtime_helpers import SHARED_DATA, adapters_only_checkpoint, lmspec_main
from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from lmspec.runtime.cli.main import main
from lmspec.compiler.rewrites import spec_record
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.finetune.dpo import (
    DPOSetup,
    answer_logprobs,
    check_preference_record,
    dpo_loss,
    evaluate_pairs,
    finetune_dpo,
    pair_logprobs,
    tokenize_pairs,
)
from lmspec.runtime.finetune.instruct_data import IGNORE, AlpacaTemplate, collate, read_records
from lmspec.runtime.train.metrics import read_metrics
from lmspec.runtime.train.config import TrainConfig

# Instruction tuning's fixtures (conftest.py): `bpe`, a 400-token byte-level BPE with <|endoftext|> <|pad|>
# <|im_start|> <|im_end|>, and `base_run`, an untrained GPT-2-shaped model of SETTINGS with it. DPO needs no
# pretraining to show a margin: the rejected answers share words (rude ones) the policy learns to avoid.

DATA = SHARED_DATA / "instruction-data-with-preference.json"
SETTINGS = {"layers": 2, "dim": 32, "heads": 2, "context": 256, "vocab": 400, "dropout": 0.0}
RECORD = {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.",
          "output": "The mouse was chased by the cat.", "chosen": "The mouse was chased by the cat.",
          "rejected": "Obviously, the stupid mouse got chased by the cat."}


@pytest.fixture(scope="module")
def model():
    return lower(load_spec("specs/gpt2.arch", SETTINGS), seed=0).eval()


# --------------------------------------------------------------------------------------------- loss

def test_loss_and_margins_equal_a_hand_computation():
    # Per pair: policy and reference log-probs of the chosen and the rejected answer.
    policy_chosen, policy_rejected = torch.tensor([-3.0, -7.0]), torch.tensor([-5.0, -6.0])
    reference_chosen, reference_rejected = torch.tensor([-4.0, -6.5]), torch.tensor([-4.5, -6.5])
    loss, margins = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)
    # pair 0: 0.5 * ((-3 + 4) - (-5 + 4.5)) = 0.5 * 1.5 = 0.75; pair 1: 0.5 * ((-7 + 6.5) - (-6 + 6.5)) = -0.5
    assert margins.tolist() == pytest.approx([0.75, -0.5])
    # -log sigmoid(m) = log(1 + e^-m)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.75)) + math.log(1 + math.exp(0.5))) / 2, rel=1e-6)


def test_answer_logprobs_sum_the_answer_tokens_only():
    # Five positions over a 4-token vocabulary: two prompt targets, two answer targets, one padding.
    targets = torch.tensor([[IGNORE, IGNORE, 2, 1, IGNORE]])
    probs = torch.full((1, 5, 4), 0.25)
    probs[0, 2] = torch.tensor([0.25, 0.125, 0.5, 0.125])  # p(2) = 0.5
    probs[0, 3] = torch.tensor([0.5, 0.25, 0.125, 0.125])  # p(1) = 0.25
    logits = probs.log()
    assert answer_logprobs(logits, targets).item() == pytest.approx(math.log(0.5) + math.log(0.25), abs=1e-6)
    # Other logits at the prompt and padding positions: exactly the same sum.
    other = logits.clone()
    other[0, [0, 1, 4]] = torch.randn(3, 4) * 5
    assert answer_logprobs(other, targets).item() == answer_logprobs(logits, targets).item()


def test_pairs_train_exactly_each_answer_and_its_end_token(bpe):
    pairs, truncated = tokenize_pairs([RECORD], AlpacaTemplate(bpe), 256)
    assert truncated == 0
    for example, answer in ((pairs[0].chosen, RECORD["chosen"]), (pairs[0].rejected, RECORD["rejected"])):
        _, y = collate([example], 1)
        assert y[y != IGNORE].tolist() == bpe.encode(answer) + [bpe.eot_id]
    # The same prompt before both answers.
    prompt = len(AlpacaTemplate(bpe).prompt_of(RECORD | {"output": ""}))
    assert pairs[0].chosen.ids[:prompt] == pairs[0].rejected.ids[:prompt]


def test_prompt_tokens_are_not_scored_and_padding_changes_nothing(bpe, model):
    template = AlpacaTemplate(bpe)
    short, long = tokenize_pairs([RECORD, RECORD | {"rejected": RECORD["rejected"] + " Whatever." * 12}],
                                 template, 256)[0]
    with torch.no_grad():
        alone = pair_logprobs(model, [short], pad_id=1)
        padded = pair_logprobs(model, [short, long], pad_id=1)  # the short pair's rows now carry padding
        other_pad = pair_logprobs(model, [short, long], pad_id=7)
    assert len(long) > len(short)
    for side in (0, 1):
        assert padded[side][0].item() == pytest.approx(alone[side][0].item(), abs=1e-4)
        assert other_pad[side][0].item() == pytest.approx(alone[side][0].item(), abs=1e-4)
    # The summed log-probs are those of the answer tokens alone: recompute them token by token.
    x, y = collate([short.chosen], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(x), -1)[0]
    prompt = len(template.prompt_of(RECORD | {"output": ""}))
    by_hand = sum(logp[t - 1, short.chosen.ids[t]].item() for t in range(prompt, len(short.chosen)))
    assert alone[0][0].item() == pytest.approx(by_hand, abs=1e-4)


# ------------------------------------------------------------------------------------ the reference

def _pairs(bpe, n):
    records = read_records(DATA, check=check_preference_record)[:n]
    return [p for p in tokenize_pairs(records, AlpacaTemplate(bpe), 256)[0] if p is not None]


def test_step_zero_is_log_two_with_zero_margins(bpe, model):
    pairs = _pairs(bpe, 12)
    found = evaluate_pairs(model, copy.deepcopy(model), pairs, batch=4, pad_id=1, beta=0.1)
    assert found["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert found["margin"] == pytest.approx(0, abs=1e-6) and found["accuracy"] == 0


def test_reference_stays_frozen_while_the_policy_learns(tmp_path, bpe, model):
    pairs = _pairs(bpe, 16)
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    cfg = TrainConfig(steps=4, batch=4, lr=1e-3, warmup=0, eval_every=0, keep=1).resolved(256)
    spec = spec_record(load_spec("specs/gpt2.arch", SETTINGS), SETTINGS)
    summary = finetune_dpo(policy, reference, bpe, pairs[:16], pairs[:4], cfg, DPOSetup("alpaca", 1, epochs=1),
                           tmp_path / "run", spec, progress=False)
    assert summary["steps"] == 4
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert not reference.training
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


# ------------------------------------------------------------------------------------------ records

def test_preference_records_alpaca_and_chat(bpe):
    check_preference_record(RECORD, "r")
    chat = {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "What now?"}
    check_preference_record(chat, "r")
    from lmspec.runtime.finetune.instruct_data import ChatMLInstructTemplate
    pair = tokenize_pairs([chat], ChatMLInstructTemplate(bpe), 256)[0][0]
    _, y = collate([pair.rejected], 1)
    assert bpe.decode(y[y != IGNORE].tolist()) == "What now?<|im_end|>"
    with pytest.raises(DataError, match="r: has no 'rejected' answer"):
        check_preference_record({k: v for k, v in RECORD.items() if k != "rejected"}, "r")
    with pytest.raises(DataError, match="'chosen' must be a string"):
        check_preference_record(RECORD | {"chosen": 3}, "r")


# --------------------------------------------------------------------------------------- end to end

def test_finetune_dpo_raises_the_held_out_margin(tmp_path, base_run, capsys):
    out = tmp_path / "dpo"
    code = main(["finetune", "dpo", str(base_run), "--data", str(DATA), "--out", str(out), "--limit", "120",
                 "--split", "0.7,0.3,0", "--epochs", "3", "--lr", "1e-3", "--eval-every", "10", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    print(captured.out)
    assert "120 records: 84 train, 36 validation, 0 test pairs" in captured.out
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(34))  # 11 steps an epoch, three epochs, and step 0
    evals = [r for r in records if "val_margin" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 33]
    # every step: its gradient norm and the tokens so far; each read of the device (every 10 steps
    # and at the last): tokens/s and peak memory since the one before
    steps = records[1:]
    assert all(r["grad_norm"] > 0 for r in steps) and all(a["tokens"] < b["tokens"] for a, b in zip(steps, steps[1:]))
    assert [r["step"] for r in steps if "tokens_per_s" in r] == [10, 20, 30, 33]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in steps if "tokens_per_s" in r)
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6) and evals[0]["val_margin"] == 0
    assert evals[-1]["val_margin"] > 0 and evals[-1]["val_accuracy"] > 0.5 and evals[-1]["val_loss"] < math.log(2)
    assert evals[-1]["train_margin"] > evals[-1]["val_margin"] > 0  # trained pairs lead, held-out ones follow
    meta = json.loads(next((out / "checkpoints").glob("step_*/meta.json")).read_text())
    config = meta["train_config"]
    assert (config["finetune"], config["template"], config["beta"]) == ("dpo", "alpaca", 0.1)
    assert "base" not in meta["spec"] and meta["metrics"]["val_margin"] == evals[-1]["val_margin"]
    png = (out / "loss.png").read_bytes()
    assert f"loss curve {out / 'loss.png'}" in captured.out and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[20:24], "big") == 640  # IHDR height: two 320-pixel panels, loss and margin

    from lmspec.runtime.checkpoint.models import load_model
    assert load_model(out).model.context == 256


def test_lora_dpo_saves_only_the_adapters(tmp_path, base_run, capsys):

    from lmspec.runtime.checkpoint.models import load_model
    out = tmp_path / "lora"
    code = main(["finetune", "dpo", str(base_run), "--data", str(DATA), "--out", str(out), "--limit", "24",
                 "--lora", "2", "--lr", "1e-2", "--beta", "0.5", "--eval-every", "0", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    meta = adapters_only_checkpoint(out, base_run)
    assert meta["train_config"]["beta"] == 0.5
    assert load_model(out).graph is not None


@pytest.mark.parametrize("case, message, code", [
    ("missing", "no such file", 1),
    ("no_rejected", "record 1: has no 'rejected' answer", 1),
])
def test_errors_are_one_clear_line(tmp_path, base_run, capsys, case, message, code):
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([RECORD, {k: v for k, v in RECORD.items() if k != "rejected"}]))
    if case == "missing":
        data = tmp_path / "nope.json"
    got = main(["finetune", "dpo", str(base_run), "--data", str(data), "--out", str(tmp_path / "o"),
                "--no-progress"])
    err = capsys.readouterr().err
    assert got == code and message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0 and err.startswith("lmspec finetune dpo: error:")


# ---------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_held_out_margin_rises_above_zero_on_the_whole_preference_set(tmp_path, base_run):
    """The whole preference file, the book's 85/5/10 split: 55 held-out pairs, one epoch."""
    out = tmp_path / "dpo"
    result = lmspec_main("finetune", "dpo", base_run, "--data", DATA, "--out", out, "--epochs", "1",
                         "--lr", "1e-3", "--eval-every", "20", "--no-progress")
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val_margin" in r]
    assert evals[0]["val_margin"] == 0 and evals[-1]["val_margin"] > 0 and evals[-1]["val_accuracy"] > 0.5
