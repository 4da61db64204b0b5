"""The running batch of a fused-attention bundle (serve/slot_batch.py), in process: every row in a slot
of one shared KV buffer, written in place by onnxruntime's GroupQueryAttention. Rows that join and
leave between steps get exactly the tokens the plain export gives each alone, the rows in use always
fill slots 0..n-1 with each slot's length its row's, and log-probabilities equal a full forward."""
import numpy as np
import pytest

from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest, log_softmax
from lmspec.runtime.serve.running_batch import RunningBatch
from lmspec.runtime.serve.scheduler import running_batch_for
from lmspec.runtime.serve.slot_batch import SlotBatch

from test_running_batch import schedule, tally


@pytest.fixture(scope="module")
def fused(tiny_fused_bundle):
    return OnnxModel(tiny_fused_bundle, threads=1)


@pytest.fixture(scope="module")
def plain(tiny_bundle):
    return OnnxModel(tiny_bundle, threads=1)


def test_the_bundle_says_its_cache_is_a_shared_buffer_and_gets_slots(fused, plain):
    assert fused.shared_buffer and not plain.shared_buffer
    assert isinstance(running_batch_for(fused, 4), SlotBatch) and isinstance(running_batch_for(plain, 4), RunningBatch)
    # one fused node per layer, and no attention left as MatMul/Softmax
    import onnx
    ops = [node.op_type for node in onnx.load(str(fused.path)).graph.node]
    assert ops.count("GroupQueryAttention") == fused.cache_layers and "Softmax" not in ops


def test_rows_that_join_and_leave_between_steps_get_their_own_tokens(fused, plain):
    texts = ["I had always", "The picture was", "Mrs. Gisburn's", "He"]
    requests = [GenerationRequest(fused.tokenizer.encode(t), n, temperature=0) for t, n in
                zip(texts, (40, 6, 20, 45))]
    requests.append(GenerationRequest(fused.tokenizer.encode("It"), 30, temperature=0.8, top_k=20, seed=5))
    rows = [fused.new_row(i, r) for i, r in enumerate(requests)]
    batch = SlotBatch(fused, capacity=4)
    joins = {0: [rows[0]], 3: [rows[1], rows[2]], 12: [rows[3]], 20: [rows[4]]}
    tokens, reasons, moved, before = {i: [] for i in range(5)}, {}, 0, []
    for events in schedule(batch, joins):
        tally(events, tokens, reasons)
        after = [row.index for row in batch.rows]
        moved += any(a != b for a, b in zip(before, after))  # a leaving row's slot was refilled
        before = after
        for slot, row in enumerate(batch.rows):  # the pending token is not in the cache yet
            assert batch.lengths[slot] == len(row.request.prompt_ids) + len(row.new) - 1
    for i, request in enumerate(requests):
        [expected] = plain.generate([request])
        assert tokens[i] == expected.tokens and reasons[i] == expected.finish_reason == "length", i
    assert moved and not batch.rows


def test_a_row_that_reaches_the_context_ends_with_length_and_generate_goes_on_past_it(fused, plain):
    prompt = fused.tokenizer.encode("I had always thought")
    batch = SlotBatch(fused, capacity=1)
    events = batch.join([fused.new_row(0, GenerationRequest(prompt, 500, temperature=0))])
    while len(batch):
        events += batch.step()
    generated = [e for e in events if e.token is not None]
    assert len(prompt) + len(generated) == fused.context + 1  # the last token is never fed back
    assert events[-1].finish_reason == "length"
    # generate() goes on over a sliding window, as the plain bundle does; rows of different lengths
    requests = [GenerationRequest(prompt, fused.context + 20, temperature=0),
                GenerationRequest(fused.tokenizer.encode("He"), 30, temperature=0)]
    assert [c.tokens for c in fused.generate(requests)] == [c.tokens for c in plain.generate(requests)]


def test_logprobs_and_prompt_logprobs_equal_a_full_forward(fused, plain):
    prompt = fused.tokenizer.encode("The picture was")
    request = GenerationRequest(prompt, 8, temperature=0, logprobs=3, prompt_logprobs=True)
    batch = SlotBatch(fused, capacity=2)
    other = GenerationRequest(fused.tokenizer.encode("I"), 3, temperature=0)  # leaves first: this row moves
    events = batch.join([fused.new_row(1, other), fused.new_row(0, request)])
    while len(batch):
        events += batch.step()
    mine = [e for e in events if e.index == 0]
    generated = [e.token for e in mine]
    logits, _ = plain.forward(np.array([prompt + generated[:-1]], dtype=np.int64))
    reference = log_softmax(logits[0])
    for t in range(1, len(prompt)):
        assert mine[0].prompt[t].logprob == pytest.approx(reference[t - 1, prompt[t]], abs=1e-4)
    for k, event in enumerate(mine):
        row = reference[len(prompt) - 1 + k]
        assert event.scored.logprob == pytest.approx(row[event.token], abs=1e-4)
        assert [t for t, _ in event.scored.top] == list(np.argsort(-row)[:3])


def test_a_batch_refuses_more_rows_than_its_slots(fused):
    batch = SlotBatch(fused, capacity=1)
    rows = [fused.new_row(i, GenerationRequest([1, 2], 5)) for i in range(2)]
    with pytest.raises(ValueError, match="2 rows do not fit: 0 of 1 slots"):
        batch.join(rows)
