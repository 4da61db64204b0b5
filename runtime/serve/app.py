"""`lmspec serve`: an exported ONNX model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, the last two
with server-sent events when `stream` is true; POST /tokenize and /detokenize, as vLLM answers them;
GET /metrics for Prometheus (serve/metrics.py). A classifier bundle is served by classifier_app.py
instead (POST /v1/classify), on the same app skeleton: new_app and add_model_routes below.

One worker thread owns the model (serve/scheduler.py): requests are checked and tokenized on the
event loop and queued; between two decode steps the worker takes them into its running batch (up to
--max-batch rows) and drops those that finished, ran out of time or lost their client, so a short
request never waits for a long one. Each token's event goes back to its request's asyncio queue
through `loop.call_soon_threadsafe`. A client that goes away, streaming or not, only marks its
request cancelled: the worker frees its row at the next step.

Every field of a request either does what OpenAI documents (sampling, penalties, logit_bias, n,
logprobs, echo), changes nothing about the answer (user, metadata, ...: IGNORED), or is refused with
a 400 (response_format, tools, unknown fields): an option that would change the answer is never
silently dropped.

Every mistake in a request is answered with a 4xx and an OpenAI-style body,
`{"error": {"message", "type", "param", "code"}}`, and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmspec.runtime.data.chat_template import check_messages, chat_template_for
from lmspec.runtime.export.bundle import bundle_chat_template, session_providers
from lmspec.runtime.serve.http_bodies import (
    ApiError,
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    SamplingFields,
    TokenizeBody,
    check_model,
    parse_body,
    read_json,
)
from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest, check_request
from lmspec.runtime.serve.metrics import ServerMetrics
from lmspec.runtime.serve.page import add_chat_page
from lmspec.runtime.serve.response_logprobs import chat_logprobs, completion_logprobs
from lmspec.runtime.serve.scheduler import RequestTimedOut, Scheduler, ServerClosing, StaticScheduler, Ticket

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our messages share its format

MAX_STOP_SEQUENCES = 4  # OpenAI's limit; each one is searched for at every token
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs (and vLLM's default for logprobs)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready: there is no one to answer."""


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@dataclass(frozen=True)
class ServeSettings:
    name: str
    max_tokens: int
    max_prompt_tokens: int
    max_body_bytes: int
    max_batch: int
    max_choices: int = 16  # prompts x n in one request
    request_timeout: float | None = None  # seconds from arrival to the last token
    batching: str = "continuous"  # or "static", the old scheduler (the baseline bench/serve.py measures)


# ------------------------------------------------------------------------------------ the API

class Api:
    """Request checking, tokenization and response shapes, around one model and its scheduler."""

    def __init__(self, model: OnnxModel, settings: ServeSettings):
        self.model, self.settings = model, settings
        worker = StaticScheduler if settings.batching == "static" else Scheduler
        self.scheduler = worker(model, settings.max_batch, settings.request_timeout)
        self.template = chat_template_for(model.tokenizer, bundle_chat_template(model.meta))  # its own, or ChatML/plain
        self.metrics = ServerMetrics(self.scheduler.queued, settings.max_batch)
        self.scheduler.observe_batch = self.metrics.batch_size.observe
        self.closing = False  # set on SIGTERM: new requests get a 503 while the running ones drain

    # -- checks

    def sampling(self, body: SamplingFields, choices_per_prompt_count: int) -> dict:
        """GenerationRequest arguments from a body's sampling fields, each checked (max_tokens is
        checked here against the server's limit, and per prompt against the context by max_tokens_for)."""
        if body.n is not None and body.n < 1:
            raise ApiError(400, f"n must be >= 1, got {body.n}", param="n")
        choices = choices_per_prompt_count * (body.n or 1)
        if choices > self.settings.max_choices:
            raise ApiError(400, f"this request asks for {choices} completions (prompts x n); this server gives at "
                           f"most {self.settings.max_choices} per request", param="n")
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be between 0 and 2 (0 is greedy), got {temperature}",
                           param="temperature")
        if body.top_p is not None and not 0 < body.top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
        if body.top_k is not None and body.top_k < 1:
            raise ApiError(400, f"top_k must be >= 1, got {body.top_k}", param="top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(body, name)
            if value is not None and not -2 <= value <= 2:
                raise ApiError(400, f"{name} must be between -2 and 2, got {value}", param=name)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
        # numpy seeds must be >= 0; OpenAI's may be any 64-bit integer: fold them in, keeping them distinct.
        seed = None if body.seed is None else body.seed % 2**64
        return dict(temperature=float(temperature), top_k=body.top_k, seed=seed,
                    top_p=None if body.top_p is None else float(body.top_p), stop=tuple(s for s in stops if s),
                    presence_penalty=float(body.presence_penalty or 0), frequency_penalty=float(body.frequency_penalty or 0),
                    logit_bias=self.logit_bias(body.logit_bias))

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        checked = {}
        for key, value in bias.items():
            if not key.isdigit() or not int(key) < self.model.vocab_size:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model's vocabulary "
                               f"(0 to {self.model.vocab_size - 1})", param="logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias[{key}]: a bias is between -100 and 100, got {value}",
                               param="logit_bias")
            checked[int(key)] = float(value)
        return checked

    def max_tokens_for(self, prompt_tokens: int, asked: int | None, default: int, param: str) -> int:
        """What a prompt may generate: `asked`, if the context holds it; else as much as the context
        leaves, at most `default` and the server's --max-tokens."""
        context = self.model.context
        if asked is not None:
            if asked < 0:
                raise ApiError(400, f"max_tokens must be >= 0, got {asked}", param="max_tokens")
            if asked > self.settings.max_tokens:
                raise ApiError(400, f"max_tokens {asked} is above this server's limit of {self.settings.max_tokens}",
                               param="max_tokens")
            if prompt_tokens + asked > context:
                raise ApiError(400, f"{param}: this model's context is {context} tokens, and this request asks for "
                               f"{prompt_tokens + asked} ({prompt_tokens} in the prompt, {asked} to generate): "
                               f"shorten the prompt or lower max_tokens", param="max_tokens",
                               code="context_length_exceeded")
            return asked
        if prompt_tokens >= context:
            raise ApiError(400, f"{param}: the prompt is {prompt_tokens} tokens, the whole of this model's context "
                           f"({context}): nothing is left to generate", param=param.split("[")[0],
                           code="context_length_exceeded")
        return min(default, self.settings.max_tokens, context - prompt_tokens)

    def check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids and self.model.eot_id is not None:
            ids = [self.model.eot_id]  # an empty prompt: start as a new document does
        if len(ids) > self.settings.max_prompt_tokens:
            raise ApiError(400, f"{param}: the prompt is {len(ids)} tokens; this server accepts at most "
                           f"{self.settings.max_prompt_tokens}", param=param.split("[")[0],
                           code="context_length_exceeded")
        return ids

    def checked(self, request: GenerationRequest, param: str) -> GenerationRequest:
        try:
            check_request(request, self.model.vocab_size)
        except ValueError as err:
            raise ApiError(400, f"{param}: {err}", param=param.split("[")[0]) from None
        return request

    @staticmethod
    def copies(request: GenerationRequest, n: int) -> list[GenerationRequest]:
        """n choices of one prompt; with a seed, each its own stream of random numbers from it."""
        if n == 1:
            return [request]
        return [replace(request, seed=None if request.seed is None else (request.seed, j)) for j in range(n)]

    # -- requests

    def completion_requests(self, body: CompletionBody) -> list[GenerationRequest]:
        """One request per prompt and choice, in OpenAI's order: prompt 0's n choices first."""
        check_model(body.model, self.settings.name)
        prompts = _prompts(body.prompt)
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        args = self.sampling(body, len(prompts))
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {body.logprobs}", param="logprobs")
        requests = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 and not isinstance(body.prompt, list) else f"prompt[{i}]"
            if isinstance(prompt, str):
                try:
                    ids = self.model.tokenizer.encode(prompt)
                except ValueError as err:  # TokenizerError: a character the vocabulary lacks
                    raise ApiError(400, f"{param}: {err}", param="prompt") from None
            else:
                ids = list(prompt)
            ids = self.check_prompt(ids, param)
            max_tokens = self.max_tokens_for(len(ids), body.max_tokens, DEFAULT_COMPLETION_TOKENS, param)
            request = self.checked(GenerationRequest(ids, max_tokens, logprobs=body.logprobs,
                                                     prompt_logprobs=body.echo and body.logprobs is not None, **args),
                                   param)
            requests += self.copies(request, body.n or 1)
        return requests

    def chat_requests(self, body: ChatBody) -> list[GenerationRequest]:
        check_model(body.model, self.settings.name)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        args = self.sampling(body, 1)
        if body.top_logprobs is not None:
            if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                raise ApiError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {body.top_logprobs}",
                               param="top_logprobs")
            if not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        try:
            prompt = self.template.render(check_messages(body.messages))
        except ValueError as err:  # ChatError: a malformed message, or text the vocabulary cannot encode
            raise ApiError(400, str(err), param="messages") from None
        args["stop"] += prompt.stop
        ids = self.check_prompt(prompt.ids, "messages")
        max_tokens = self.max_tokens_for(len(ids), asked, self.settings.max_tokens, "messages")
        request = GenerationRequest(ids, max_tokens, stop_ids=prompt.stop_ids,
                                    logprobs=(body.top_logprobs or 0) if body.logprobs else None, **args)
        return self.copies(self.checked(request, "messages"), body.n or 1)

    def tokenize(self, body: TokenizeBody) -> dict:
        """The ids the server would feed the model for a prompt, or for chat messages (template applied)."""
        check_model(body.model, self.settings.name)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt (a string) or messages (a chat), not both or neither")
        try:
            if body.prompt is not None:
                ids = self.model.tokenizer.encode(body.prompt)
            else:
                ids = self.template.render(check_messages(body.messages)).ids
        except ValueError as err:  # a character the vocabulary lacks, or a malformed message
            raise ApiError(400, f"{'prompt' if body.prompt is not None else 'messages'}: {err}") from None
        return {"count": len(ids), "max_model_len": self.model.context, "tokens": list(ids)}

    def detokenize(self, body: DetokenizeBody) -> dict:
        check_model(body.model, self.settings.name)
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < self.model.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"tokens[{bad}]: {body.tokens[bad]} is outside the vocabulary of "
                           f"{self.model.vocab_size:,}", param="tokens")
        return {"prompt": self.model.tokenizer.decode(body.tokens)}

    def stop_tokens(self, request: GenerationRequest) -> set[int]:
        """The tokens that end an answer without being part of its text."""
        eot = {self.model.eot_id} if request.stop_at_eot and self.model.eot_id is not None else set()
        return set(request.stop_ids) | eot

    # -- running them

    def drain(self, seconds: float) -> None:
        """Shutting down: refuse new requests, and give the running ones `seconds` to finish. Called
        from a signal handler, so it only sets values."""
        self.closing = True
        self.scheduler.drain(seconds)

    def open(self) -> None:
        if self.closing:
            raise ApiError(503, "the server is shutting down: send this request to another one, or again later",
                           kind="server_error", code="server_shutting_down")

    async def events(self, requests: list[GenerationRequest]):
        """(choice, TokenEvent) pairs for the requests, as the worker produces them, until each is finished."""
        self.open()
        ticket = Ticket(asyncio.get_running_loop())
        self.scheduler.submit(ticket, requests)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
        left = len(requests)
        try:
            while left:
                choice, event = await ticket.events.get()
                if isinstance(event, Exception):
                    raise _failure(event)
                if event.token is not None:
                    self.metrics.generation_tokens.inc()
                if event.finish_reason is not None:
                    left -= 1
                yield choice, event
        finally:  # finished, failed, or the client went away (the task was cancelled)
            ticket.cancelled = True

    async def complete(self, requests: list[GenerationRequest]) -> tuple[list[Answer], dict]:
        """Each request's answer, and their usage."""
        answers = [Answer() for _ in requests]
        async for choice, event in self.events(requests):
            answers[choice].add(event)
        return answers, self.usage(requests, sum(a.generated for a in answers))

    @staticmethod
    def usage(requests: list[GenerationRequest], generated: int) -> dict:
        """completion_tokens counts every token the model generated, a stop token included."""
        prompt = sum(len(r.prompt_ids) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


@dataclass
class Answer:
    """One choice's events gathered: its text, how it ended, and the scores of its tokens."""

    text: str = ""
    finish_reason: str | None = None
    generated: int = 0
    scored: list = field(default_factory=list)  # Scored, one per generated token (a stop token's too)
    prompt: list | None = None  # Scored per prompt token, when the prompt's log-probabilities were asked

    def add(self, event) -> None:
        self.text += event.text
        self.generated += event.token is not None
        if event.scored is not None:
            self.scored.append(event.scored)
        if event.prompt is not None:
            self.prompt = event.prompt
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


def _failure(err: Exception) -> ApiError:
    if isinstance(err, RequestTimedOut):
        return ApiError(408, str(err), code="request_timeout")
    if isinstance(err, ServerClosing):
        return ApiError(503, str(err), kind="server_error", code="server_shutting_down")
    return ApiError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error")


def _prompts(prompt) -> list:
    """A completion body's prompts: each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]  # one prompt given as token ids
    return list(prompt)


# ------------------------------------------------------------------------------------ the app

def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def new_app(lifespan) -> FastAPI:
    """An app whose every error, ours or the framework's (no route, wrong method, a crash), is answered
    with the OpenAI-style error body."""
    # No /docs: the routes read their bodies themselves (to bound their size), so there is no schema to show.
    app = FastAPI(title="lmspec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}"
        else:
            message = str(err.detail)
        return _error_response(ApiError(err.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        return _error_response(ApiError(400, "; ".join(e["msg"] for e in err.errors())))

    @app.exception_handler(ClientGone)
    async def client_gone(_request, _err):
        return Response(status_code=499)  # nginx's "client closed request": never read, logged as such

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):
        return _error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error"))

    return app


def add_model_routes(app: FastAPI, card: dict, health: Callable[[], dict]) -> None:
    """GET /health (`health()`'s fields after the status) and GET /v1/models[/NAME] (`card` is the one
    model's entry), the same on every server."""
    name = card["id"]

    @app.get("/health")
    async def health_route():
        return {"status": "ok", "model": name, **health()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{asked:path}")
    async def one_model(asked: str):
        if asked != name:
            raise ApiError(404, f"the model {asked!r} does not exist", param="model", code="model_not_found")
        return card


def model_card(name: str, path: Path, **extra) -> dict:
    return {"id": name, "object": "model", "created": int(path.stat().st_mtime), "owned_by": "lmspec", **extra}


def refuse_routes(app: FastAPI, paths: tuple[str, ...], message: str) -> None:
    """POST routes this kind of model cannot answer: a 400 that says which routes it can, rather than
    a bare "no route"."""
    async def refuse():
        raise ApiError(400, message, code="unsupported_for_model")

    for path in paths:
        app.post(path)(refuse)


COMPLETION_ROUTES = ("/v1/completions", "/v1/chat/completions")


def create_app(model: OnnxModel, settings: ServeSettings):
    return app_for(Api(model, settings))


def app_for(api: Api):
    """The ASGI app that serves `api`: its routes, measured for /metrics."""
    model, settings = api.model, api.settings

    @asynccontextmanager
    async def lifespan(_app):
        api.scheduler.start()
        yield
        api.scheduler.stop()

    app = new_app(lifespan)
    app.state.api = api
    # vLLM's name for the context; the page shows these limits.
    card = model_card(settings.name, model.path, max_model_len=model.context, max_tokens=settings.max_tokens,
                      max_prompt_tokens=settings.max_prompt_tokens)
    add_model_routes(app, card, api.scheduler.health)
    add_chat_page(app)
    refuse_routes(app, ("/v1/classify",), f"{settings.name} is a language model, not a classifier: it answers "
                  f"{' and '.join(COMPLETION_ROUTES)}")

    @app.post("/v1/completions")
    async def completions(request: Request):
        api.open()
        body = parse_body(CompletionBody, await read_json(request, settings.max_body_bytes))
        requests = api.completion_requests(body)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": settings.name}
        if body.stream:
            return StreamingResponse(_stream_completion(api, body, requests, head),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        answers, usage = await while_connected(request, api.complete(requests))
        decode = model.tokenizer.decode
        choices = []
        for i, (req, answer) in enumerate(zip(requests, answers)):
            prefix = decode(req.prompt_ids) if body.echo else ""
            scores = (answer.prompt or []) + answer.scored if body.echo else answer.scored
            logprobs = None if body.logprobs is None else completion_logprobs(decode, scores)
            choices.append({"index": i, "text": prefix + answer.text, "logprobs": logprobs,
                            "finish_reason": answer.finish_reason})
        return {**head, "choices": choices, "usage": usage}

    @app.get("/metrics")
    async def metrics():
        text, kind = api.metrics.exposition()
        return Response(text, media_type=kind)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return api.tokenize(parse_body(TokenizeBody, await read_json(request, settings.max_body_bytes)))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return api.detokenize(parse_body(DetokenizeBody, await read_json(request, settings.max_body_bytes)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        api.open()
        body = parse_body(ChatBody, await read_json(request, settings.max_body_bytes))
        requests = api.chat_requests(body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": settings.name}
        if body.stream:
            head["object"] = "chat.completion.chunk"
            return StreamingResponse(_stream_chat(api, body, requests, head),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        answers, usage = await while_connected(request, api.complete(requests))
        choices = []
        for i, (req, answer) in enumerate(zip(requests, answers)):
            logprobs = chat_logprobs(model.tokenizer.decode, _answer_scores(api, req, answer.scored)) \
                if body.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": answer.text},
                            "logprobs": logprobs, "finish_reason": answer.finish_reason})
        return {**head, "choices": choices, "usage": usage}

    return api.metrics.measured(app)


async def while_connected(request: Request, work):
    """`await work`, unless the client disconnects first: then the work is cancelled (which frees its
    rows in the batch at the next step) and ClientGone raised. A streamed response needs none of this:
    Starlette cancels a stream whose client has gone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not task.done()
        if gone:
            task.cancel()
    if gone:
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message from the server is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _answer_scores(api: Api, request: GenerationRequest, scored: list) -> list:
    """A chat answer's token scores, without the token that ended it (it is not in the text)."""
    stops = api.stop_tokens(request)
    return [s for s in scored if s.token not in stops] if scored and scored[-1].token in stops else scored


async def _stream_completion(api: Api, body: CompletionBody, requests: list[GenerationRequest], head: dict):
    decode = api.model.tokenizer.decode
    generated = 0
    pending = [[] for _ in requests]  # scores of tokens whose text has not been sent yet
    offsets = [0] * len(requests)
    started = [False] * len(requests)
    try:
        async for choice, event in api.events(requests):
            generated += event.token is not None
            text = event.text
            if not started[choice]:
                started[choice] = True
                if body.echo:
                    text = decode(requests[choice].prompt_ids) + text
                    pending[choice] += event.prompt or []
            if event.scored is not None:
                pending[choice].append(event.scored)
            if text or event.finish_reason:  # empty deltas (text held back) say nothing
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(decode, pending[choice], offsets[choice])
                    pending[choice] = []
                offsets[choice] += len(text)
                yield _sse({**head, "choices": [{"index": choice, "text": text, "logprobs": logprobs,
                                                 "finish_reason": event.finish_reason}]})
    except ApiError as err:  # the status line is long gone: report the failure in the stream
        yield _sse(err.body())
        yield _sse("[DONE]")
        return
    if _include_usage(body):
        yield _sse({**head, "choices": [], "usage": api.usage(requests, generated)})
    yield _sse("[DONE]")


async def _stream_chat(api: Api, body: ChatBody, requests: list[GenerationRequest], head: dict):
    decode = api.model.tokenizer.decode
    for i in range(len(requests)):
        yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
    generated = 0
    pending = [[] for _ in requests]
    try:
        async for choice, event in api.events(requests):
            generated += event.token is not None
            if event.scored is not None:
                pending[choice].append(event.scored)
            if event.text or event.finish_reason:
                logprobs = None
                if body.logprobs:
                    logprobs = chat_logprobs(decode, _answer_scores(api, requests[choice], pending[choice])
                                             if event.finish_reason else pending[choice])
                    pending[choice] = []
                if event.text:
                    yield _sse({**head, "choices": [{"index": choice, "delta": {"content": event.text},
                                                     "logprobs": logprobs, "finish_reason": None}]})
                    logprobs = None
                if event.finish_reason:
                    yield _sse({**head, "choices": [{"index": choice, "delta": {}, "logprobs": logprobs,
                                                     "finish_reason": event.finish_reason}]})
    except ApiError as err:
        yield _sse(err.body())
        yield _sse("[DONE]")
        return
    if _include_usage(body):
        yield _sse({**head, "choices": [], "usage": api.usage(requests, generated)})
    yield _sse("[DONE]")


# ------------------------------------------------------------------------------------ the command


@dataclass(frozen=True)
class Served:
    """What `lmspec serve` runs: the app, the model's name, what the start-up line says it answers,
    and notes for stderr."""
    app: FastAPI
    name: str
    answers: str
    notes: tuple[str, ...] = ()
    drain: Callable[[float], None] | None = None  # on SIGTERM: stop taking requests, finish the others


def served_language_model(path: Path, args) -> Served:
    model = OnnxModel(path, providers=session_providers(args.provider), threads=args.threads)
    settings = ServeSettings(name=args.name or model.name, max_tokens=args.max_tokens,
                             max_prompt_tokens=min(args.max_prompt_tokens or model.context, model.context),
                             max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
                             max_choices=args.max_choices, request_timeout=args.request_timeout,
                             batching=args.batching)
    notes = ()
    if args.max_prompt_tokens and args.max_prompt_tokens > model.context:
        notes = (f"--max-prompt-tokens {args.max_prompt_tokens} is beyond the model's context: prompts are "
                 f"accepted up to {model.context} tokens",)
    how = "continuous batching" if settings.batching == "continuous" else "static batches"
    api = Api(model, settings)
    return Served(app_for(api), settings.name, f"OpenAI-compatible; {how} of up to {settings.max_batch}", notes,
                  drain=api.drain)
