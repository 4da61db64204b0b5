"""`lmspec serve`: the real server in a subprocess, spoken to over HTTP (httpx and the official openai
client). Greedy answers must equal OnnxModel.generate's for the same prompt; streams must add up to
the same text; concurrent clients must each get their own answer; every bad request gets a 4xx with
a message, and the server keeps serving."""
import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from runtime_helpers import lmspec_cli, lmspec_main, running_server
from lmspec.runtime.data.chat_template import chat_template_for, check_messages
from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest

NAME = "tiny-char"  # given with --name, so /v1/models must report it rather than the spec's name
MAX_TOKENS = 256
MAX_BODY = 65536


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    with running_server(tiny_bundle, "--name", NAME, "--max-tokens", MAX_TOKENS, "--max-body-bytes", MAX_BODY,
                        "--max-batch", 8, "--threads", 1, log_dir=tmp_path_factory.mktemp("serve")) as (url, proc, err):
        yield url
        assert proc.poll() is None, "the server died"
        assert "Traceback" not in err.read_text(), err.read_text()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return OnnxModel(tiny_bundle, threads=1)


def reference(model, ids, max_tokens, **kw):
    """What the model generates for the prompt on its own, in this process."""
    [c] = model.generate([GenerationRequest(ids, max_tokens, **{"temperature": 0, **kw})])
    return c


def chat_reference(model, messages, max_tokens, **kw):
    prompt = chat_template_for(model.tokenizer).render(check_messages(messages))
    return reference(model, prompt.ids, max_tokens, stop=prompt.stop, stop_ids=prompt.stop_ids, **kw)


def sse_data(response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# ------------------------------------------------------------------------------ the API

def test_health_and_models(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME


def test_greedy_completion_equals_the_onnx_model(client, model):
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "I had always", "max_tokens": 40,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = reference(model, model.tokenizer.encode("I had always"), 40)
    assert body["choices"] == [{"index": 0, "text": expected.text, "logprobs": None, "finish_reason": "length"}]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == NAME
    assert isinstance(body["created"], int)
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}


def test_a_list_of_prompts_gives_a_choice_each_and_stop_strings_cut(client, model):
    prompts = ["I had", "The picture was", "Mrs. Gisburn"]
    free = reference(model, model.tokenizer.encode(prompts[1]), 30).text
    stop = free[12:15]  # something the model is going to write
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 30, "temperature": 0, "stop": [stop]})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, choices):
        expected = reference(model, model.tokenizer.encode(prompt), 30, stop=(stop,))
        assert (choice["text"], choice["finish_reason"]) == (expected.text, expected.finish_reason)
    assert choices[1]["text"] == free[:free.index(stop)] and choices[1]["finish_reason"] == "stop"


def test_seeded_sampling_and_top_k(client, model):
    def text(**kw):
        return client.post("/v1/completions", json={"prompt": "It was", "max_tokens": 30, **kw}).json()["choices"][0]["text"]

    ids = model.tokenizer.encode("It was")
    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7) == reference(model, ids, 30, temperature=1.0,
                                                                                       seed=7).text
    assert text(temperature=1.0, top_k=1, seed=3) == reference(model, ids, 30).text


def test_chat_completion_with_the_plain_text_template(client, model):
    """Without max_tokens, a chat answer may take what the context leaves."""
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Who painted it?"}]
    r = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_tokens = len(chat_template_for(model.tokenizer).render(check_messages(messages)).ids)
    expected = chat_reference(model, messages, model.context - prompt_tokens)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason
    assert body["usage"]["prompt_tokens"] == len(chat_template_for(model.tokenizer).render(
        check_messages(messages)).ids)


def test_streamed_completion_adds_up_to_the_whole(client):
    ask = {"prompt": ["I had always", "She"], "max_tokens": 40, "temperature": 0}
    whole = [c["text"] for c in client.post("/v1/completions", json=ask).json()["choices"]]
    with client.stream("POST", "/v1/completions", json={**ask, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        reasons[choice["index"]] = reasons[choice["index"]] or choice["finish_reason"]
    assert texts == whole and reasons == ["length", "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 80


def test_streamed_chat_adds_up_to_the_whole(client):
    ask = {"messages": [{"role": "user", "content": "Tell me about the picture."}], "max_tokens": 15, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=ask).json()["choices"][0]
    with client.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as r:
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content") or "" for d in deltas) == whole["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_the_official_openai_client(server, model):
    import openai

    api = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in api.models.list()] == [NAME]
    done = api.completions.create(model=NAME, prompt="I had always", max_tokens=30, temperature=0)
    assert done.choices[0].text == reference(model, model.tokenizer.encode("I had always"), 30).text
    streamed = api.completions.create(model=NAME, prompt="I had always", max_tokens=30, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == done.choices[0].text

    messages = [{"role": "user", "content": "Hello, who are you?"}]
    chat = api.chat.completions.create(model=NAME, messages=messages, max_tokens=25, temperature=0)
    assert chat.choices[0].message.content == chat_reference(model, messages, 25).text
    assert chat.usage.completion_tokens > 0
    stream = api.chat.completions.create(model=NAME, messages=messages, max_tokens=25, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == chat.choices[0].message.content
    top_k = api.completions.create(model=NAME, prompt="I had always", max_tokens=30, temperature=1, seed=1,
                                   extra_body={"top_k": 1})
    assert top_k.choices[0].text == done.choices[0].text

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="gpt-4", prompt="I", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context is 64 tokens") as refused:
        api.chat.completions.create(model=NAME, messages=messages, max_tokens=60)
    assert refused.value.code == "context_length_exceeded"


def test_32_concurrent_clients_each_get_their_own_answer(client, model, verdict_text):
    """Distinct prompts of different lengths, half of them streamed, all at once: the server batches
    them (far fewer decode steps than one request after another would take) and each answer equals
    that prompt's greedy answer alone."""
    prompts = [verdict_text[1000 + 137 * i:][:6 + i % 23] for i in range(32)]
    assert len(set(prompts)) == 32
    expected = [reference(model, model.tokenizer.encode(p), 24).text for p in prompts]
    steps_before = client.get("/health").json()["steps"]

    def ask(i):
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            body = {"prompt": prompts[i], "max_tokens": 24, "temperature": 0}
            if i % 2:
                with own.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    return "".join(json.loads(d)["choices"][0]["text"] for d in sse_data(r) if d != "[DONE]")
            return own.post("/v1/completions", json=body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert answers == expected
    assert client.get("/health").json()["steps"] - steps_before < 32 * 24 / 2


def test_a_fused_attention_bundle_serves_the_answers_of_the_plain_one(tiny_fused_bundle, model, verdict_text,
                                                                      tmp_path):
    """The same run exported with --fused-attention: each request in a slot of one shared buffer.
    Twelve clients at once, more than --max-batch 4, with different lengths, so rows leave and
    waiting ones take their slots mid-run; each answer equals the plain bundle's, and so do the
    prompt's log-probabilities."""
    prompts = [verdict_text[2000 + 151 * i:][:4 + 2 * i] for i in range(12)]  # prompt + answer within 64
    lengths = [6 + 7 * (i % 5) for i in range(12)]
    expected = [reference(model, model.tokenizer.encode(p), n).text for p, n in zip(prompts, lengths)]
    with running_server(tiny_fused_bundle, "--max-batch", 4, "--threads", 1, log_dir=tmp_path) as (url, proc, err), \
            httpx.Client(base_url=url, timeout=60) as c:
        def ask(i):
            body = {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0}
            if i % 2:
                with httpx.Client(base_url=url, timeout=60) as own, \
                        own.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    return "".join(json.loads(d)["choices"][0]["text"] for d in sse_data(r) if d != "[DONE]")
            return httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

        with ThreadPoolExecutor(12) as pool:
            assert list(pool.map(ask, range(12))) == expected
        ids = model.tokenizer.encode("The picture was")
        echoed = c.post("/v1/completions", json={"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
                                                 "temperature": 0}).json()["choices"][0]["logprobs"]
        from lmspec.runtime.serve.requests import log_softmax
        logits, _ = model.forward([ids])
        want = log_softmax(logits[0])
        assert echoed["token_logprobs"][1:len(ids)] == pytest.approx([want[t - 1, ids[t]] for t in range(1, len(ids))],
                                                                     abs=1e-4)
        assert c.get("/health").json()["running"] == 0
        assert proc.poll() is None and "Traceback" not in err.read_text()


def test_a_client_leaving_mid_stream_does_not_break_the_worker(client, model):
    with client.stream("POST", "/v1/completions", json={"prompt": "I had", "max_tokens": 55,
                                                        "temperature": 0, "stream": True}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # The connection is closed with most of the stream unread; the next request is served as usual.
    r = client.post("/v1/completions", json={"prompt": "The picture", "max_tokens": 20, "temperature": 0})
    assert r.json()["choices"][0]["text"] == reference(model, model.tokenizer.encode("The picture"), 20).text


def test_logprobs_echo_and_token_prompts_as_lm_eval_asks(client, model):
    """lm-eval-harness's loglikelihood request: token ids, echo, logprobs=1, max_tokens=1; every prompt
    token after the first gets its log-probability under the model, the first gets null."""
    from lmspec.runtime.serve.requests import log_softmax

    ids = model.tokenizer.encode("The picture was")
    r = client.post("/v1/completions", json={"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    generated = reference(model, ids, 1)
    assert choice["text"] == "The picture was" + generated.text
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    logits, _ = model.forward([ids + generated.tokens])
    expected = log_softmax(logits[0])
    for t in range(1, len(ids) + 1):
        token = ids[t] if t < len(ids) else generated.tokens[0]
        assert lp["token_logprobs"][t] == pytest.approx(expected[t - 1, token], abs=1e-4)
        [(best, value)] = lp["top_logprobs"][t].items()
        assert value == pytest.approx(expected[t - 1].max(), abs=1e-4)
    # Without echo, only the generated tokens; streamed, the chunks' logprobs add up to the same.
    ask = {"prompt": "I had", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    whole = client.post("/v1/completions", json=ask).json()["choices"][0]
    assert len(whole["logprobs"]["tokens"]) == 12 and all(len(t) == 2 for t in whole["logprobs"]["top_logprobs"])
    with client.stream("POST", "/v1/completions", json={**ask, "stream": True}) as s:
        chunks = [json.loads(d)["choices"][0] for d in sse_data(s) if d != "[DONE]"]
    assert sum((c["logprobs"]["token_logprobs"] for c in chunks), []) == whole["logprobs"]["token_logprobs"]
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_n_choices_seeds_bias_and_chat_logprobs(client, model):
    ask = {"prompt": ["I had", "It was"], "n": 3, "max_tokens": 10, "temperature": 1.0, "seed": 11}
    first, again = (client.post("/v1/completions", json=ask).json() for _ in range(2))
    assert [c["index"] for c in first["choices"]] == list(range(6)) and first == {**again, "id": first["id"],
                                                                                   "created": first["created"]}
    texts = [c["text"] for c in first["choices"]]
    assert len(set(texts[:3])) > 1  # three samples of one prompt, not one sample thrice
    assert first["usage"]["prompt_tokens"] == 3 * sum(len(model.tokenizer.encode(p)) for p in ask["prompt"])
    # logit_bias applied: a +100 bias makes greedy decoding write that token only.
    token = model.tokenizer.encode("e")[0]
    forced = client.post("/v1/completions", json={"prompt": "I had", "max_tokens": 5, "temperature": 0,
                                                  "logit_bias": {str(token): 100}}).json()
    assert forced["choices"][0]["text"] == "eeeee"
    # Chat: one content entry per token of the answer, each with its top_logprobs, best first.
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                     "max_tokens": 8, "temperature": 0, "logprobs": True,
                                                     "top_logprobs": 2}).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    for choice in chat["choices"]:
        content = choice["logprobs"]["content"]
        assert "".join(e["token"] for e in content) == choice["message"]["content"]
        for e in content:
            assert [t["logprob"] for t in e["top_logprobs"]] == sorted((t["logprob"] for t in e["top_logprobs"]),
                                                                       reverse=True)
            assert e["top_logprobs"][0]["token"] == e["token"] and e["bytes"] == list(e["token"].encode())


def test_tokenize_and_detokenize_as_vllm_answers_them(client, model):
    ids = model.tokenizer.encode("I had always")
    assert client.post("/tokenize", json={"prompt": "I had always"}).json() == {
        "count": len(ids), "max_model_len": model.context, "tokens": ids}
    assert client.post("/detokenize", json={"model": NAME, "tokens": ids}).json() == {"prompt": "I had always"}
    messages = [{"role": "user", "content": "hi"}]
    chat = client.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == chat_template_for(model.tokenizer).render(check_messages(messages)).ids
    for route, body, status, words in (
            ("/tokenize", {"prompt": "I", "messages": messages}, 400, "not both"),
            ("/tokenize", {"prompt": "naïve ☃"}, 400, "vocabulary"),
            ("/tokenize", {"model": "gpt-4", "prompt": "I"}, 404, "'gpt-4' does not exist"),
            ("/detokenize", {"tokens": [model.vocab_size]}, 400, f"tokens[0]: {model.vocab_size} is outside"),
            ("/detokenize", {"tokens": ["a"]}, 400, "tokens")):
        r = client.post(route, json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], (route, body, r.text)


def test_metrics_count_requests_tokens_and_batches_for_prometheus(client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(r.text) for s in family.samples}

    before = scrape()
    ok = client.post("/v1/completions", json={"prompt": "I had", "max_tokens": 5, "temperature": 0}).json()
    assert client.post("/v1/completions", json={"prompt": 5}).status_code == 400
    after = scrape()

    def grew(name, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("lmspec_requests_total", route="/v1/completions", status="200") == 1
    assert grew("lmspec_requests_total", route="/v1/completions", status="400") == 1
    assert grew("lmspec_prompt_tokens_total") == ok["usage"]["prompt_tokens"]
    assert grew("lmspec_generation_tokens_total") == ok["usage"]["completion_tokens"]
    assert grew("lmspec_request_seconds_count", route="/v1/completions") == 2
    assert grew("lmspec_batch_size_count") >= 1 and after[("lmspec_queue_depth", ())] == 0


# ------------------------------------------------------------------------------ errors

def too_long_prompt(model):
    return "the " * (model.context // 4 + 1)


ERRORS = [
    # (route, body (bytes are sent as they are), status, words of the message)
    ("/v1/completions", b'{"prompt": "I had", ', 400, "not valid JSON"),
    ("/v1/completions", b'[1, 2]', 400, "must be a JSON object"),
    ("/v1/completions", b'{"prompt": "I", "temperature": NaN}', 400, "not valid JSON"),
    ("/v1/completions", {"prompt": "I" * (MAX_BODY + 10)}, 413, "larger than"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "I"}, 404, "'gpt-4' does not exist"),
    ("/v1/completions", {"prompt": too_long_prompt}, 400, "accepts at most 64"),
    ("/v1/completions", {"prompt": "I", "max_tokens": -1}, 400, "max_tokens must be >= 0"),
    ("/v1/completions", {"prompt": "I", "max_tokens": 2.5}, 400, "max_tokens: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "I", "max_tokens": "5"}, 400, "max_tokens: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "I", "max_tokens": MAX_TOKENS + 1}, 400, f"limit of {MAX_TOKENS}"),
    ("/v1/completions", {"prompt": "I", "temperature": -0.5}, 400, "temperature must be between 0 and 2"),
    ("/v1/completions", {"prompt": "I", "temperature": 2.5}, 400, "temperature must be between 0 and 2"),
    ("/v1/completions", {"prompt": "I", "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ("/v1/completions", {"prompt": "I", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "I", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "I", "top_k": 0}, 400, "top_k must be >= 1"),
    ("/v1/completions", {"prompt": "I", "n": 0}, 400, "n must be >= 1"),
    ("/v1/completions", {"prompt": ["I", "a"], "n": 9}, 400, "asks for 18 completions (prompts x n); this server "
                                                             "gives at most 16"),
    ("/v1/completions", {"prompt": "I", "max_tokens": 64}, 400, "context is 64 tokens, and this request asks for 65"),
    ("/v1/completions", {"prompt": [3, 1000000]}, 400, "prompt[0]: token id 1000000 is outside the vocabulary"),
    ("/v1/completions", {"prompt": "I", "logprobs": 21}, 400, "logprobs must be between 0 and 20"),
    ("/v1/completions", {"prompt": "I", "presence_penalty": 2.5}, 400, "presence_penalty must be between -2 and 2"),
    ("/v1/completions", {"prompt": "I", "logit_bias": {"x": 1}}, 400, "logit_bias: 'x' is not a token id"),
    ("/v1/completions", {"prompt": "I", "logit_bias": {"3": 101}}, 400, "between -100 and 100"),
    ("/v1/completions", {"prompt": "I", "suffix": "end"}, 400, "suffix: this server does not support"),
    ("/v1/completions", {"prompt": "I", "min_p": 0.1}, 400, "min_p: not a field this server knows"),
    ("/v1/completions", {"prompt": "I", "stop": 5}, 400, "stop must be a string or a list of strings"),
    ("/v1/completions", {"prompt": "I", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("/v1/completions", {"prompt": "I", "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt must be a string, a list of strings, a list of token ids"),
    ("/v1/completions", {"prompt": []}, 400, "non-empty list"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt: Field required"),
    ("/v1/completions", {"prompt": "I", "seed": "x"}, 400, "seed: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "naïve ☃"}, 400, "is not in the tokenizer's vocabulary"),
    ("/v1/completions", {"prompt": ["I", ""]}, 400, "prompt[1]: the prompt is empty"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400, "too deeply"),
    ("/v1/completions", {"prompt": "I", "best_of": 3}, 400, "best_of > 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format: this server does not"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools: this server does not support tool calls"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Grüße 👋"}]}, 400,
     "messages[0].content: character 'ü'"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role must be one of"),
    ("/v1/chat/completions", {"messages": []}, 400, "non-empty list"),
    ("/v1/chat/completions", {"prompt": "I"}, 400, "messages: Field required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS + 1}, 400,
     f"limit of {MAX_TOKENS}"),
]


def test_each_bad_request_gets_a_4xx_and_the_server_keeps_serving(client, model):
    for route, body, status, words in ERRORS:
        if isinstance(body, bytes):
            r = client.post(route, content=body, headers={"content-type": "application/json"})
        else:
            body = {k: v(model) if callable(v) else v for k, v in body.items()}
            r = client.post(route, json=body)
        assert r.status_code == status, (route, body if len(str(body)) < 200 else "...", r.text)
        error = r.json()["error"]
        assert words in error["message"], (words, error)
        assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
        assert client.get("/health").status_code == 200
    assert client.post("/v1/completions", json={"prompt": "I", "max_tokens": 3}).status_code == 200


def test_unknown_routes_and_methods_answer_json(client):
    r = client.get("/v1/engines")
    assert r.status_code == 404 and "no route GET /v1/engines" in r.json()["error"]["message"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "does not accept GET" in r.json()["error"]["message"]
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------------------ the command

def test_a_missing_bundle_is_a_one_line_error(tmp_path):
    out = lmspec_cli("serve", tmp_path / "nothing.onnx")
    assert out.returncode == 1
    assert "nothing.onnx: no such ONNX model" in out.stderr and "Traceback" not in out.stderr


def test_a_taken_port_is_a_one_line_error(tiny_bundle, server):
    port = server.rsplit(":", 1)[1]
    out = lmspec_cli("serve", tiny_bundle, "--port", port)
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_bad_options_are_usage_errors(tiny_bundle):
    # refused before a server starts: through main() in this process
    for args, words in ((("--max-batch", "0"), "argument --max-batch: must be an integer >= 1, got 0"),
                        (("--drain-seconds", "-1"), "argument --drain-seconds: must be a finite number >= 0, got -1"),
                        (("--request-timeout", "0"), "argument --request-timeout: must be a finite number > 0, got 0"),
                        (("--read-timeout", "nan"), "argument --read-timeout: must be a finite number > 0, got nan"),
                        (("--max-choices", "0"), "argument --max-choices: must be an integer >= 1, got 0"),
                        (("--port", "70000"), "argument --port: must be an integer >= 0 and <= 65535, got 70000")):
        out = lmspec_main("serve", tiny_bundle, *args)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_listening_socket_is_tcp_so_small_answers_are_not_delayed():
    """asyncio sets TCP_NODELAY on connections only when the socket's protocol is IPPROTO_TCP; without
    it each small response waits ~40 ms for the client's delayed ACK."""
    from lmspec.runtime.cli.serve import _bind

    with _bind("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP


def test_the_server_never_imports_torch(tiny_bundle):
    code = ("import sys\nfrom lmspec.runtime.serve.language_model import OnnxModel\n"
            "from lmspec.runtime.serve.app import ServeSettings, create_app\n"
            f"create_app(OnnxModel({str(tiny_bundle)!r}), ServeSettings('m', 16, 64, 1024, 4))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_binding_beyond_loopback_warns(tiny_bundle, tmp_path):
    with running_server(tiny_bundle, "--host", "0.0.0.0", log_dir=tmp_path) as (url, _, err):
        assert "warning: listening on 0.0.0.0" in err.read_text()
        assert url.startswith("http://0.0.0.0:")


# ------------------------------------------------------------------------------ ChatML end to end

@pytest.fixture(scope="module")
def chatml_bundle(tmp_path_factory, verdict_text) -> Path:
    """A BPE model (with <|im_start|>/<|im_end|>) whose random weights are set so that it always
    predicts <|im_end|>: a chat answer must end at once, the token not in its text."""
    import torch

    from lmspec.compiler.loader import load_spec
    from lmspec.compiler.lower import lower
    from lmspec.runtime.checkpoint.store import save_checkpoint
    from lmspec.compiler.rewrites import spec_record
    from lmspec.runtime.export.from_checkpoint import export_bundle
    from lmspec.runtime.data.tokenizer_training import train_bpe

    work = tmp_path_factory.mktemp("chatml")
    tokenizer = train_bpe(iter([verdict_text]), 400, work / "tok.json")
    end = tokenizer.tokenizer.token_to_id("<|im_end|>")
    overrides = {"vocab": tokenizer.vocab_size, "layers": 1, "dim": 32, "heads": 2, "context": 64}
    graph = load_spec("specs/tiny.arch", overrides=overrides)
    model = lower(graph, seed=0)
    with torch.no_grad():
        u = torch.randn(32, generator=torch.Generator().manual_seed(0))
        model.get_parameter("ln_f.weight").zero_()  # every final hidden state becomes u ...
        model.get_parameter("ln_f.bias").copy_(u)
        model.get_parameter("wte.weight")[end] = 10 * u  # ... whose largest logit is then <|im_end|>'s
    save_checkpoint(work / "run", step=0, model=model, optimizer=None, rng=None, train_config={}, metrics={},
                    tokenizer=tokenizer.to_json(), spec=spec_record(graph, overrides))
    export_bundle(str(work / "run"), str(work / "chat.onnx"), log=lambda *_: None)
    return work / "chat.onnx"


def test_chatml_answers_end_at_im_end(chatml_bundle, tmp_path):
    bundle = OnnxModel(chatml_bundle)
    messages = [{"role": "user", "content": "Who painted it? <|im_end|>"}]
    prompt = chat_template_for(bundle.tokenizer).render(check_messages(messages))
    assert prompt.stop_ids == (bundle.tokenizer.tokenizer.token_to_id("<|im_end|>"),)
    with running_server(chatml_bundle, log_dir=tmp_path) as (url, _, _):
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 10, "temperature": 0})
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "" and body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"] == {"prompt_tokens": len(prompt.ids), "completion_tokens": 1,
                                 "total_tokens": len(prompt.ids) + 1}
        # A plain completion has no chat template, so <|im_end|> does not end it.
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "It was", "max_tokens": 3, "temperature": 0})
        assert r.json()["choices"][0] == {"index": 0, "text": "<|im_end|>" * 3, "logprobs": None,
                                          "finish_reason": "length"}
