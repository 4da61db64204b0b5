"""Instruction finetuning: the book's Alpaca template, ChatML by control-token id, the loss on the
answers only (prompt and padding contribute nothing), length buckets, the split, `lmspec finetune
instruct` and `lmspec chat` end to end, and their errors as one clear line."""
import json
import random
import subprocess
import sys

import pytest
import torch

from diverging import GoesBad
from runtime_helpers import SHARED_DATA, TESTS_DIR, adapters_only_checkpoint, lmspec_main
from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from lmspec.runtime.checkpoint.store import save_checkpoint
from lmspec.runtime.cli.main import main
from lmspec.compiler.rewrites import spec_record
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.finetune.instruct_data import (
    IGNORE,
    AlpacaTemplate,
    Example,
    ChatMLInstructTemplate,
    TemplateError,
    collate,
    length_buckets,
    make_template,
    pad_id_for,
    padding_fraction,
    read_records,
    split_records,
    tokenize_records,
)
from lmspec.runtime.finetune.instruct_train import masked_loss
from lmspec.runtime.train.metrics import read_metrics
from lmspec.runtime.data.tokenizer import CharTokenizer, FileTokenizer

DATA = SHARED_DATA / "instruction-data.json"
RECORD = {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.",
          "output": "The mouse was chased by the cat."}


def book_format_input(entry):
    """Build a Large Language Model (From Scratch), ch07, verbatim."""
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


# ------------------------------------------------------------------------------------------ templates

@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_prompt_is_the_books_template(bpe, with_input):
    record = RECORD if with_input else RECORD | {"input": ""}
    segments = AlpacaTemplate(bpe).segments(record)
    assert bpe.decode(segments[0].ids) == book_format_input(record) + "\n\n### Response:\n"
    assert bpe.decode(segments[1].ids) == record["output"] + "<|endoftext|>"
    assert segments[1].ids[-1] == bpe.eot_id and [s.trained for s in segments] == [False, True]
    assert ("### Input:" in bpe.decode(segments[0].ids)) == with_input


def test_chatml_uses_the_control_token_ids(bpe):
    start, end = (bpe.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Bye now."}]}
    segments = ChatMLInstructTemplate(bpe).segments(record)
    ids = [t for s in segments for t in s.ids]
    assert bpe.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                               "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                               "<|im_start|>assistant\nBye now.<|im_end|>")
    assert ids.count(start) == 5 and ids.count(end) == 5
    answers = [s for s in segments if s.trained]  # each answer with its <|im_end|>, nothing else
    assert [bpe.decode(s.ids) for s in answers] == ["Hello.<|im_end|>", "Bye now.<|im_end|>"]
    assert all(s.ids[-1] == end for s in answers)
    # An Alpaca record reads as one user turn.
    alpaca = ChatMLInstructTemplate(bpe).segments(RECORD)
    assert bpe.decode(alpaca[0].ids).endswith(f"user\n{RECORD['instruction']}\n\n{RECORD['input']}<|im_end|>\n"
                                              "<|im_start|>assistant\n")


def test_chatml_needs_a_tokenizer_with_its_tokens():
    with pytest.raises(TemplateError, match="<|im_start|>"):
        make_template("chatml", CharTokenizer.from_text("abc"))


def test_pad_token_is_pad_else_end_of_text(bpe):
    assert pad_id_for(bpe) == bpe.tokenizer.token_to_id("<|pad|>")
    gpt2 = FileTokenizer.from_path(SHARED_DATA / "gpt2-tokenizer")
    assert pad_id_for(gpt2) == 50256


# ------------------------------------------------------------------------------------------ masking

def _example(template, record, max_length=1000):
    return tokenize_records([record], template, max_length).examples[0]


def test_masks_line_up_with_the_answer(bpe):
    template = AlpacaTemplate(bpe)
    prompt, answer = (s.ids for s in template.segments(RECORD))
    other = _example(template, RECORD | {"output": "No."})
    x, y = collate([_example(template, RECORD), other], pad_id_for(bpe))
    n = len(prompt) + len(answer) - 1
    assert x.shape == (2, n) and x[0].tolist() == (prompt + answer)[:-1]
    kept = (y[0] != IGNORE).nonzero().flatten().tolist()
    assert kept == list(range(len(prompt) - 1, n))  # the first answer token is predicted from the last prompt token
    assert y[0, len(prompt) - 1] == answer[0] and y[0, -1] == bpe.eot_id
    assert y[0, kept].tolist() == answer
    short = len(other) - 1  # the shorter row: padded inputs, ignored targets
    assert (x[1, short:] == pad_id_for(bpe)).all() and (y[1, short:] == IGNORE).all()
    assert y[1][y[1] != IGNORE].tolist() == bpe.encode("No.") + [bpe.eot_id]


def test_prompt_tokens_contribute_nothing_to_the_loss(bpe):
    template = AlpacaTemplate(bpe)
    a = _example(template, RECORD)
    prompt = len(template.segments(RECORD)[0].ids)
    b = Example(a.ids[:prompt][::-1] + a.ids[prompt:], a.trained)  # other prompt tokens, the same answer
    x_a, y_a = collate([a], 1)
    x_b, y_b = collate([b], 1)
    answer = len(template.segments(RECORD)[1].ids)
    assert torch.equal(y_a[:, -answer:], y_b[:, -answer:]) and not torch.equal(x_a[:, :-answer], x_b[:, :-answer])
    # Same logits at the answer positions, anything at the prompt positions: the same loss, exactly.
    torch.manual_seed(0)
    tail = torch.randn(1, answer, bpe.vocab_size)
    logits_a = torch.cat([torch.randn(1, y_a.shape[1] - answer, bpe.vocab_size), tail], 1).requires_grad_()
    logits_b = torch.cat([torch.randn(1, y_b.shape[1] - answer, bpe.vocab_size), tail], 1)
    loss = masked_loss(logits_a, y_a)
    assert loss.item() == masked_loss(logits_b, y_b).item()
    loss.backward()
    assert (logits_a.grad[:, :-answer] == 0).all() and (logits_a.grad[:, -answer:] != 0).any()


def test_padding_does_not_change_the_loss(bpe):
    graph = load_spec("specs/gpt2.arch", {"layers": 1, "dim": 32, "heads": 2, "context": 256, "vocab": 400,
                                          "dropout": 0.0})
    model = lower(graph, seed=0).eval()
    template = AlpacaTemplate(bpe)
    example = _example(template, RECORD)
    longer = _example(template, RECORD | {"output": RECORD["output"] + " And the dog watched them both." * 3})
    with torch.no_grad():
        alone = masked_loss(model(collate([example], 1)[0]), collate([example], 1)[1])
        x, y = collate([example, longer], 1)  # the first row now carries padding
        padded = masked_loss(model(x[:1]), y[:1])
    assert x.shape[1] > len(example) - 1
    assert padded.item() == pytest.approx(alone.item(), abs=1e-6)


def test_long_examples_are_cut_at_the_end_or_left_out(bpe):
    template = AlpacaTemplate(bpe)
    prompt = len(template.segments(RECORD)[0].ids)
    cut = tokenize_records([RECORD], template, prompt + 2)
    assert cut.truncated == 1 and len(cut.examples[0]) == prompt + 3
    assert cut.examples[0].trained[prompt - 1:] == [False, True, True, True]
    gone = tokenize_records([RECORD], template, prompt - 5)  # the prompt alone fills the window
    assert gone.examples == [None] and gone.dropped == 1


def test_characters_a_char_vocabulary_lacks_leave_the_record_out():
    chars = CharTokenizer.from_text(book_format_input(RECORD) + "\n\n### Response:\n" + RECORD["output"])
    template = AlpacaTemplate(chars)  # no end-of-text token: the answer ends with the next instruction's header
    assert chars.decode(template.segments(RECORD)[1].ids).endswith("\n\n### Instruction:")
    out = tokenize_records([RECORD, RECORD | {"output": "Zürich!"}], template, 1000)
    assert out.examples[0] is not None and out.examples[1] is None and out.unencodable == 1


# ------------------------------------------------------------------------------------ batches, split

def test_buckets_cover_every_example_once_and_pad_less_than_random_batches():
    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(203)]
    epoch0, epoch1 = (length_buckets(lengths, 8, seed=1, epoch=e) for e in (0, 1))
    for batches in (epoch0, epoch1):
        assert sorted(i for b in batches for i in b) == list(range(203))
    assert epoch0 != epoch1 and epoch0 == length_buckets(lengths, 8, seed=1, epoch=0)
    order = list(range(203))
    rng.shuffle(order)
    shuffled = [order[i:i + 8] for i in range(0, 203, 8)]
    assert padding_fraction(epoch0, lengths) < padding_fraction(shuffled, lengths) / 5


def test_split_is_the_books_85_5_10_and_seeded():
    train, val, test = split_records(range(1100), (0.85, 0.05, 0.1), seed=123)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert sorted(train + val + test) == list(range(1100))
    assert split_records(range(1100), (0.85, 0.05, 0.1), seed=123) == (train, val, test)
    assert split_records(range(1100), (0.85, 0.05, 0.1), seed=124)[0] != train


def test_records_from_json_list_and_jsonl(tmp_path):
    assert len(read_records(DATA)) == 1100
    lines = tmp_path / "chat.jsonl"
    lines.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello."}]}) + "\n\n"
                     + json.dumps(RECORD) + "\n")
    assert len(read_records(lines)) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORD, RECORD, {"prompt": "x"}]))
    with pytest.raises(DataError, match="record 2: has neither 'instruction' nor 'messages'"):
        read_records(bad)


# --------------------------------------------------------------------------------------- end to end

def test_finetune_then_chat_over_a_pipe(tmp_path, base_run, bpe):
    out = tmp_path / "ft"
    result = lmspec_main("finetune", "instruct", base_run, "--data", DATA, "--out", out, "--limit", "48",
                        "--epochs", "2", "--batch", "8", "--lr", "3e-3", "--eval-every", "3", "--no-progress",
                        "--responses", tmp_path / "answers.jsonl", "--response-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "48 records: 40 train, 4 validation, 4 test" in result.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(0, 11))  # 5 steps an epoch, two epochs, and step 0
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 5 and val[-1] < val[0]  # steps 0, 3, 6, 9, 10
    steps = records[1:]  # the loss is read at each validation: tokens/s and peak memory since the last read
    assert [r["step"] for r in steps if "tokens_per_s" in r] == [3, 6, 9, 10]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in steps if "tokens_per_s" in r)
    assert all(r["grad_norm"] > 0 for r in steps) and all(a["tokens"] < b["tokens"] for a, b in zip(steps, steps[1:]))
    assert "step 10 (epoch 2.00)" in result.stdout
    meta = json.loads(next((out / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["train_config"]["template"] == "alpaca" and meta["train_config"]["finetune"] == "instruct"
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(isinstance(a["model_response"], str) and "instruction" in a for a in answers)

    from lmspec.runtime.checkpoint.models import load_model
    assert load_model(out).model.context == 256
    chat = subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", "chat", str(out), "--max-tokens", "12"],
                          input="Name a colour.\n\nAnd another one?\n", capture_output=True, text=True,
                          cwd=TESTS_DIR.parent, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) >= 2 and "Traceback" not in chat.stderr


def test_a_validation_loss_that_is_not_finite_stops_the_run_with_the_steps_before_it_logged(tmp_path, bpe):
    # before: logged as NaN (not JSON), and the run went on to save the weights
    from lmspec.runtime.errors import TrainingError
    from lmspec.runtime.finetune.instruct_train import InstructSetup, finetune_instruct
    from lmspec.runtime.train.config import TrainConfig
    graph = load_spec("specs/gpt2.arch", {"layers": 1, "dim": 16, "heads": 2, "context": 256, "vocab": 400})
    examples = tokenize_records([RECORD] * 12, make_template("alpaca", bpe), 256).examples
    cfg = TrainConfig(steps=12, batch=1, seq=256, eval_every=4, log_every=10, keep=1).resolved(256)
    with pytest.raises(TrainingError, match="the validation loss became nan at step 8: the weights are no longer "
                                            "finite; try a lower --lr or --weight-decay"):
        finetune_instruct(GoesBad(lower(graph, seed=0), after=6, part="validation"), bpe, examples, examples[:2], cfg,
                          InstructSetup("alpaca", pad_id_for(bpe), epochs=1), tmp_path, {}, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(9))  # step 8's training record, without its NaN
    assert "val_loss" in records[4] and "val_loss" not in records[8]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("part, message", [
    ("loss", "the loss became nan at step 7; try a lower --lr"),
    # before: a NaN gradient norm was logged as null, as fp16's skipped steps are, and its update kept
    ("gradient", "the gradient norm became nan at step 7, so its update left weights that are not finite"),
])
def test_a_diverging_loss_is_named_by_its_step_and_leaves_no_checkpoint(tmp_path, bpe, part, message):
    """The loss is read every log_every (10) steps, not at each: step 7 goes bad and step 10's read
    names it; steps 1 to 6 are in the metrics, and nothing is saved."""
    from lmspec.runtime.errors import TrainingError
    from lmspec.runtime.finetune.instruct_train import InstructSetup, finetune_instruct
    from lmspec.runtime.train.config import TrainConfig
    graph = load_spec("specs/gpt2.arch", {"layers": 1, "dim": 16, "heads": 2, "context": 256, "vocab": 400})
    examples = tokenize_records([RECORD] * 12, make_template("alpaca", bpe), 256).examples
    cfg = TrainConfig(steps=12, batch=1, seq=256, eval_every=0, log_every=10, keep=1).resolved(256)
    with pytest.raises(TrainingError, match=message):
        finetune_instruct(GoesBad(lower(graph, seed=0), after=6, part=part), bpe, examples, [], cfg,
                          InstructSetup("alpaca", pad_id_for(bpe), epochs=1), tmp_path, {}, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(7))
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in records[1:])
    assert not (tmp_path / "checkpoints").exists()


class ScriptedModel(torch.nn.Module):
    """Predicts `script` token by token after any prompt, and records the prompts it was given."""

    context = 256

    def __init__(self, vocab: int, script: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.script, self.prompts, self.seen = vocab, script, [], 0

    def forward(self, tokens, cache=None):  # no cache: generate passes the whole window each time
        ids = tokens[0].tolist()
        if len(ids) != self.seen + 1:  # not the last call's window and one new token: a new prompt
            self.prompts.append(ids)
        self.seen = len(ids)
        made = len(ids) - len(self.prompts[-1])
        logits = torch.zeros(1, tokens.shape[1], self.vocab)
        logits[0, -1, self.script[min(made, len(self.script) - 1)]] = 1.0
        return logits


def test_chat_stops_at_the_end_token_and_keeps_the_conversation(bpe):
    import io
    from types import SimpleNamespace

    from lmspec.runtime.cli.instruct import converse
    from lmspec.runtime.data.chat_template import JinjaTemplate, builtin_chat_template
    hello = bpe.encode(" Hello")
    template = JinjaTemplate(bpe, builtin_chat_template("alpaca", bpe))  # what an Alpaca checkpoint records
    model = ScriptedModel(bpe.vocab_size, hello + [bpe.eot_id] + bpe.encode(" more text"))
    out = io.StringIO()
    args = SimpleNamespace(max_tokens=20, temperature=0.0, top_k=None, seed=None, system=None)
    converse(model, bpe, template, io.StringIO("first\n\nsecond\n"), out, args)
    assert out.getvalue() == " Hello\n Hello\n"  # stopped at <|endoftext|>, which is not printed
    assert bpe.decode(model.prompts[0]) == template_text("first")
    assert bpe.decode(model.prompts[-1]) == template_text("first") + " Hello<|endoftext|>" + template_text("second")


def template_text(instruction: str) -> str:
    return book_format_input({"instruction": instruction, "input": ""}) + "\n\n### Response:\n"


def test_lora_chatml_run_saves_only_the_adapters_and_chats(tmp_path, base_run, bpe, capsys, monkeypatch):

    from lmspec.runtime.checkpoint.models import load_model
    out = tmp_path / "lora"
    code = main(["finetune", "instruct", str(base_run), "--data", str(DATA), "--out", str(out), "--limit", "20",
                 "--epochs", "1", "--template", "chatml", "--lora", "2", "--lr", "1e-2", "--eval-every", "0",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    meta = adapters_only_checkpoint(out, base_run)
    assert meta["train_config"]["template"] == "chatml"
    assert load_model(out).graph is not None  # adapters on their base, found by the record
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("Hi there\n"))
    assert main(["chat", str(out), "--max-tokens", "5", "--temperature", "0.7", "--seed", "1"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # one answer, whatever its text


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("no_instruction", "record 1: has neither 'instruction' nor 'messages'"),
    ("chatml_char", "needs the tokens <|im_start|> and <|im_end|>"),
])
def test_errors_are_one_clear_line(tmp_path, base_run, capsys, case, message):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([RECORD, {"question": "?"}]))
    checkpoint, extra = base_run, []
    if case == "missing":
        data = tmp_path / "nope.json"
    if case == "chatml_char":
        graph = load_spec("specs/tiny.arch", {"layers": 1, "dim": 16, "heads": 2, "context": 32, "vocab": 20})
        checkpoint = tmp_path / "char"
        data.write_text(json.dumps([RECORD]))
        save_checkpoint(checkpoint, step=0, model=lower(graph), optimizer=None, rng=None, train_config={},
                        metrics={}, tokenizer=CharTokenizer.from_text("abcdefghij").to_json(),
                        spec=spec_record(graph, {"layers": 1, "dim": 16, "heads": 2, "context": 32, "vocab": 20}))
        extra = ["--template", "chatml"]
    code = main(["finetune", "instruct", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0 and err.startswith("lmspec finetune instruct: error:")


# ---------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_validation_loss_falls_through_the_first_epoch(tmp_path, base_run):
    """The whole instruction set, the book's 85/5/10 split, one epoch evaluated every 20 steps."""
    out = tmp_path / "ft"
    result = lmspec_main("finetune", "instruct", base_run, "--data", DATA, "--out", out, "--epochs", "1",
                        "--batch", "8", "--lr", "2e-3", "--eval-every", "20", "--no-progress")
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    val = [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert len(val) >= 6
    assert all(b < a for a, b in zip(val, val[1:])), val
