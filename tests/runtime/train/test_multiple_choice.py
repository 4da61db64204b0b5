"""`lmspec eval --multiple-choice`: each choice's log-probability equals a direct forward pass with
log_softmax on lm-eval's tokens (the context's trailing whitespace moved onto the choice, a long
context cut on the left), acc / acc_norm / acc_bytes follow lm-eval's definitions on hand-made
items, batching changes nothing, and every bad input is one located line."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime_helpers import VERDICT, lmspec_cli, train_bpe_lm
from lmspec.runtime.checkpoint.models import load_model
from lmspec.runtime.checkpoint.store import load_checkpoint
from lmspec.runtime.cli.main import main
from lmspec.runtime.data.tokenizer import CharTokenizer, load_tokenizer
from lmspec.runtime.train.multiple_choice import Item, Scores, encode_pair, score

CONTEXT = 32

ITEMS = [  # a context that ends in a space, choices of very different lengths, one context longer than CONTEXT
    {"context": "The man who had been", "choices": [" painting", " zzzz", " a"], "answer": 0},
    {"context": "Mrs. Gisburn ", "choices": ["was", "had", "xjzq"], "answer": 1},
    {"context": "She laughed, and", "choices": [" said", " the picture was hung in the drawing-room", " qq"],
     "answer": 1},
    {"context": "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it "
                "was no great surprise to me to hear that, in the height of his glory, he had",
     "choices": [" dropped his painting", " xx", " married"], "gold": 2},
    {"context": "\"Yes, I", "choices": [" know", " knew", " k"], "label": 0},
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A byte-level BPE and a language model trained 3 steps with it (context 32)."""
    root = tmp_path_factory.mktemp("multiple_choice")
    tok, run = train_bpe_lm(root, CONTEXT)
    items = root / "items.jsonl"
    items.write_text("".join(json.dumps(i) + "\n" for i in ITEMS), encoding="utf-8")
    return run, items


def reference_loglikelihood(model, encode, context: str, choice: str, window: int | None) -> float:
    """lm-eval's tokens (TemplateLM._encode_pair), the last window + 1 of them kept, scored one whole
    forward pass of one sequence, in float64."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + choice
    context_ids = encode(stripped)
    ids = context_ids + encode(stripped + continuation)[len(context_ids):]
    n = len(ids) - len(context_ids)
    if window is not None:
        ids = ids[-(window + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    logp = F.log_softmax(logits.double(), dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n, len(ids)))


def expected_accuracies(items: list[dict], lls: list[list[float]]) -> dict:
    """lm-eval's ConfigurableTask.process_results for multiple_choice, with numpy as it does."""
    right = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for item, ll in zip(items, lls):
        ll, gold = np.array(ll), item.get("answer", item.get("gold", item.get("label")))
        right["acc"] += int(np.argmax(ll) == gold)
        right["acc_norm"] += int(np.argmax(ll / np.array([float(len(c)) for c in item["choices"]])) == gold)
        right["acc_bytes"] += int(np.argmax(ll / np.array([float(len(c.encode())) for c in item["choices"]])) == gold)
    return {k: v / len(items) for k, v in right.items()}


# ----------------------------------------------------------------------------------- the numbers

def test_accuracies_follow_lm_evals_definitions_on_hand_made_scores():
    """acc: the highest sum; acc_norm: per character of the choice; acc_bytes: per UTF-8 byte; the
    first of equals wins (numpy.argmax)."""
    items = [Item("c", ("a", "bbbb"), 1), Item("c", ("é", "ab"), 0), Item("c", ("x", "y"), 0),
             Item("c", ("cc", "d"), 1), Item("c", ("aaaa", "b"), 0)]
    lls = [[-2.0, -4.0], [-3.0, -4.0], [-1.0, -1.0], [-1.0, -5.0], [-4.4, -1.2]]
    summary = Scores(items, lls).summary()
    # right by sum: items 2, 3; per character: 1, 3, 5; per byte ("é" is two): 1, 2, 3, 5
    assert summary == {"items": 5, "choices": 10, "acc": 0.4, "acc_norm": 0.6, "acc_bytes": 0.8, "truncated": 0}
    as_dicts = [{"choices": list(i.choices), "answer": i.answer} for i in items]
    assert expected_accuracies(as_dicts, lls) == {"acc": 0.4, "acc_norm": 0.6, "acc_bytes": 0.8}


def test_choice_scores_equal_a_direct_forward_pass_whatever_the_batch(tiny_gpt):
    text = "the quick brown fox jumps over a lazy dog, then sleeps."
    tokenizer = CharTokenizer.from_text(text)
    model = tiny_gpt(tokenizer.vocab_size, init_seed=3, context=CONTEXT).eval()
    items = [Item("the quick ", ("brown", "lazy dog", "x"), 0), Item("a", (" dog", " fox jumps"), 1),
             Item("then sleeps over the quick brown fox, the lazy dog jumps over a", (" fox", " dog, then"), 0)]
    one = score(model, tokenizer.encode, items, CONTEXT, batch=1)
    many = score(model, tokenizer.encode, items, CONTEXT, batch=5)
    assert one.truncated == many.truncated == 2  # the long context, once for each choice
    for item, a, b in zip(items, one.loglikelihoods, many.loglikelihoods):
        want = [reference_loglikelihood(model, tokenizer.encode, item.context, c, CONTEXT) for c in item.choices]
        assert a == pytest.approx(want, abs=1e-4) and b == pytest.approx(a, abs=1e-5)


def test_the_tokens_are_lm_evals_own():
    """encode_pair against lm-eval's TemplateLM._encode_pair, on a BPE where the moved space matters."""
    template = pytest.importorskip("lm_eval.api.model").TemplateLM
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the man who had been painting was the man"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    encode = lambda s: tok.encode(s).ids  # noqa: E731

    class Stub:
        backend = "causal"

        def tok_encode(self, s, **_):
            return encode(s)

    for context, choice in [("the man ", "was"), ("the man", " who had"), ("who had been  \n", "painting"),
                            ("the", "man")]:
        assert encode_pair(encode, context, choice) == template._encode_pair(Stub(), context, choice)
    assert encode_pair(encode, "the man ", "was")[1] == encode(" was")  # the space went with the choice


# --------------------------------------------------------------------------------------- the verb

def test_eval_multiple_choice_reports_what_a_direct_computation_gives(lm, tmp_path, capsys):
    run, items = lm
    report = tmp_path / "mc.json"
    assert main(["eval", str(run), "--multiple-choice", str(items), "--batch", "2", "--format", "json",
                 "--out", str(report)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(report.read_text()) == result
    loaded = load_model(run)
    encode = load_tokenizer(loaded.checkpoint.tokenizer).encode
    lls = [[reference_loglikelihood(loaded.model, encode, i["context"], c, CONTEXT) for c in i["choices"]]
           for i in ITEMS]
    expected = expected_accuracies(ITEMS, lls)
    assert {k: result[k] for k in expected} == expected
    long = sum(len(encode(i["context"] + c)) > CONTEXT + 1 for i in ITEMS for c in i["choices"])
    assert long >= 3  # item 4's context, and any other that runs over
    assert result["task"] == "multiple-choice" and result["kind"] == "language-model"
    assert result["items"] == 5 and result["choices"] == 15 and result["truncated"] == long
    assert main(["eval", str(run), "--multiple-choice", str(items)]) == 0
    human = capsys.readouterr().out
    assert "5 multiple-choice items, 15 choices" in human
    n = round(expected["acc_norm"] * 5)
    assert f"acc_norm   {expected['acc_norm']:>7.4f}  {n}/5" in human
    assert f"{long} of 15 choices had their context cut on the left to fit the model's context of 32 tokens" in human


def test_bad_items_are_one_located_line(lm, tmp_path, capsys):
    run, _ = lm
    good = json.dumps(ITEMS[0])
    files = {
        "malformed": good + "\n{\"context\": \"x\", \"choices\": [\"a\"\n",
        "list": "[1, 2]\n",
        "no_context": json.dumps({"choices": ["a"], "answer": 0}),
        "choices_str": json.dumps({"context": "x", "choices": "a b", "answer": 0}),
        "no_choices": json.dumps({"context": "x", "choices": [], "answer": 0}),
        "empty_choice": json.dumps({"context": "x", "choices": ["a", ""], "answer": 0}),
        "out_of_range": good + "\n\n" + json.dumps({"context": "x", "choices": ["a", "b", "c"], "answer": 3}),
        "negative": json.dumps({"context": "x", "choices": ["a"], "answer": -1}),
        "not_int": json.dumps({"context": "x", "choices": ["a", "b"], "answer": "1"}),
        "no_answer": json.dumps({"context": "x", "choices": ["a", "b"]}),
        "blank": "\n  \n",
        "empty_context": json.dumps({"context": "", "choices": [" a"], "answer": 0}),
        "long_choice": json.dumps({"context": "x", "choices": [" word" * 40], "answer": 0}),
    }
    for name, text in files.items():
        (tmp_path / f"{name}.jsonl").write_text(text + "\n", encoding="utf-8")
    where = lambda name, line: f"{tmp_path / name}.jsonl:{line}: "  # noqa: E731
    encode = load_tokenizer(load_checkpoint(run).tokenizer).encode
    cases = [
        ("missing", f"{tmp_path / 'missing'}.jsonl: no such file"),
        ("malformed", where("malformed", 2) + "not valid JSON"),
        ("list", where("list", 1) + "must be an object with context, choices and answer"),
        ("no_context", where("no_context", 1) + "context is missing"),
        ("choices_str", where("choices_str", 1) + "choices must be a list of strings"),
        ("no_choices", where("no_choices", 1) + "choices is empty"),
        ("empty_choice", where("empty_choice", 1) + "choice 1 is empty"),
        ("out_of_range", where("out_of_range", 3) + "answer 3 is out of range for 3 choices (0 to 2)"),
        ("negative", where("negative", 1) + "answer -1 is out of range for 1 choices"),
        ("not_int", where("not_int", 1) + "answer must be an integer index into choices, not '1'"),
        ("no_answer", where("no_answer", 1) + "answer is missing"),
        ("blank", f"{tmp_path / 'blank'}.jsonl: holds no items"),
        ("empty_context", where("empty_context", 1) + "the context is empty"),
        ("long_choice", where("long_choice", 1) + f"choice 0 is {len(encode(' word' * 40))} tokens, more than the "
                                                  "model's context of 32"),
    ]
    for name, message in cases:
        assert main(["eval", str(run), "--multiple-choice", str(tmp_path / f"{name}.jsonl")]) == 1, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
    assert main(["eval", str(run), "--multiple-choice", str(tmp_path / "blank.jsonl"), "--data", str(VERDICT)]) == 2
    assert "--multiple-choice scores its own items; drop --data" in capsys.readouterr().err
    proc = lmspec_cli("eval", run, "--multiple-choice", tmp_path / "out_of_range.jsonl", "--format", "json")
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("lmspec eval: error: " + where("out_of_range", 3)
                                   + "answer 3 is out of range for 3 choices (0 to 2)")
