"""The running batch behind `lmspec serve`, in process: requests that join and leave between decode
steps get exactly the tokens each gets alone, the shared cache never grows past the longest row in
it, and the per-token options (logprobs, prompt logprobs, logit_bias, penalties) compute what OpenAI
defines, checked against full forwards of the model."""
from collections import Counter

import numpy as np
import pytest

from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest, adjusted_logits, log_softmax
from lmspec.runtime.serve.running_batch import RunningBatch


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return OnnxModel(tiny_bundle, threads=1)


def alone(model, request):
    [c] = model.generate([request])
    return c


def full_logits(model, ids):
    """Logits at every place of `ids`, from one forward with an empty cache (no batch, no padding)."""
    logits, _ = model.forward(np.array([ids], dtype=np.int64))
    return logits[0]


def schedule(batch, joins: dict, steps: int = 200):
    """Drive a running batch: the rows of joins[step] join before that step; yields each step's events."""
    step = 0
    while step < steps and (len(batch) or any(s >= step for s in joins)):
        events = batch.join(joins[step]) if step in joins else []
        yield events + batch.step()
        step += 1


def tally(events, tokens: dict, reasons: dict) -> None:
    for e in events:
        if e.token is not None:
            tokens[e.index].append(e.token)
        if e.finish_reason:
            reasons[e.index] = e.finish_reason


@pytest.mark.parametrize("slack", [0, 10**9], ids=["cohorts-apart", "cohorts-merged"])
def test_rows_that_join_and_leave_between_steps_get_their_own_tokens(model, slack):
    """Whether the rows that joined at different steps run as separate cohorts (no padding) or
    merged into one (padded on the left), each gets exactly its tokens alone, and each cohort's cache
    is exactly as long as its longest row."""
    texts = ["I had always", "The picture was", "Mrs. Gisburn's", "He"]
    requests = [GenerationRequest(model.tokenizer.encode(t), n, temperature=0) for t, n in
                zip(texts, (40, 6, 20, 45))]
    requests.append(GenerationRequest(model.tokenizer.encode("It"), 30, temperature=0.8, top_k=20, seed=5))
    rows = [model.new_row(i, r) for i, r in enumerate(requests)]
    batch = RunningBatch(model)
    batch.merge_slack = slack
    joins = {0: [rows[0]], 3: [rows[1], rows[2]], 12: [rows[3]], 20: [rows[4]]}
    tokens, reasons, cohorts, sizes = {i: [] for i in range(5)}, {}, set(), []
    for events in schedule(batch, joins):
        tally(events, tokens, reasons)
        cohorts.add(len(batch.cohorts))
        for cohort in batch.cohorts:
            longest = max(len(r.request.prompt_ids) + len(r.new) - 1 for r in cohort.rows)
            sizes.append((cohort.mask.shape[1], longest, cohort.past[0].shape[2]))
    for i, request in enumerate(requests):
        expected = alone(model, request)
        assert tokens[i] == expected.tokens and reasons[i] == expected.finish_reason == "length", i
    assert all(mask == longest == past for mask, longest, past in sizes)
    assert max(cohorts) == (1 if slack else 3) and not batch.rows and not batch.cohorts


def test_a_row_that_reaches_the_context_ends_with_length(model):
    prompt = model.tokenizer.encode("I had always thought")
    batch = RunningBatch(model)
    row = model.new_row(0, GenerationRequest(prompt, 500, temperature=0))
    events = batch.join([row])
    while batch.rows:
        events += batch.step()
    generated = [e for e in events if e.token is not None]
    assert len(prompt) + len(generated) == model.context + 1  # the last token is never fed back
    assert events[-1].finish_reason == "length"


def test_logprobs_and_prompt_logprobs_equal_a_full_forward(model):
    prompt = model.tokenizer.encode("The picture was")
    request = GenerationRequest(prompt, 8, temperature=0, logprobs=3, prompt_logprobs=True)
    batch = RunningBatch(model)
    other = GenerationRequest(model.tokenizer.encode("I"), 20, temperature=0)  # left padding in the batch
    events = batch.join([model.new_row(1, other), model.new_row(0, request)])
    while batch.rows:
        events += batch.step()
    mine = [e for e in events if e.index == 0]
    generated = [e.token for e in mine]
    reference = log_softmax(full_logits(model, prompt + generated[:-1]))
    assert mine[0].prompt[0].token == prompt[0] and mine[0].prompt[0].logprob is None
    for t in range(1, len(prompt)):
        scored = mine[0].prompt[t]
        assert scored.token == prompt[t]
        assert scored.logprob == pytest.approx(reference[t - 1, prompt[t]], abs=1e-4)
    for k, event in enumerate(mine):
        row = reference[len(prompt) - 1 + k]
        assert event.scored.token == event.token and event.scored.logprob == pytest.approx(row[event.token], abs=1e-4)
        best = np.argsort(-row)[:3]
        assert [t for t, _ in event.scored.top] == list(best)  # greedy: the chosen token is the likeliest
        assert event.scored.top[0][0] == event.token


def test_logit_bias_and_penalties_change_the_logits_as_openai_defines(model):
    logits = np.linspace(-1, 1, model.vocab_size).astype(np.float32)
    request = GenerationRequest([1], 1, logit_bias={3: 5.0, 7: -100.0}, presence_penalty=0.5, frequency_penalty=0.25)
    counts = Counter({3: 2, 9: 1})
    got = adjusted_logits(logits, request, counts)
    expected = logits.astype(np.float64)
    expected[3] += 5.0 - 2 * 0.25 - 0.5
    expected[7] -= 100.0
    expected[9] -= 0.25 + 0.5
    assert np.allclose(got, expected)

    prompt = model.tokenizer.encode("I had always")
    greedy = alone(model, GenerationRequest(prompt, 12, temperature=0))
    first = greedy.tokens[0]
    banned = alone(model, GenerationRequest(prompt, 12, temperature=0, logit_bias={first: -100.0}))
    assert first not in banned.tokens
    forced = alone(model, GenerationRequest(prompt, 12, temperature=0, logit_bias={5: 100.0}))
    assert forced.tokens == [5] * 12
    # A strong frequency penalty stops greedy decoding from repeating any token many times.
    repeated = max(Counter(alone(model, GenerationRequest(prompt, 40, temperature=0)).tokens).values())
    penalised = alone(model, GenerationRequest(prompt, 40, temperature=0, frequency_penalty=2.0, presence_penalty=2.0))
    assert max(Counter(penalised.tokens).values()) < repeated
