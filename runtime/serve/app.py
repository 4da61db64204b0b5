"""`lmspec serve`: an exported ONNX model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, the last two
with server-sent events when `stream` is true; POST /tokenize and /detokenize, as vLLM answers them;
GET /metrics for Prometheus (serve/metrics.py). A classifier bundle is served by classifier_app.py
instead (POST /v1/classify), on the same app skeleton: new_app and add_model_routes below.

One worker thread owns the model: requests are checked and tokenized on the event loop, queued, and
the worker takes up to --max-batch of them at a time and generates for them together as one batch
(static batching: a request that arrives while a batch runs waits for the next one). Each token's
event goes back to its request's asyncio queue through `loop.call_soon_threadsafe`. A client that
goes away only marks its request cancelled: the worker stops sending to it, skips it if it has not
started, and ends a batch early when no one is left listening.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmspec.runtime.data.chat_template import check_messages, chat_template_for
from lmspec.runtime.export.bundle import session_providers
from lmspec.runtime.serve.language_model import GenerationRequest, OnnxModel, check_request
from lmspec.runtime.serve.metrics import ServerMetrics
from lmspec.runtime.serve.scheduler import Scheduler, Ticket

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our messages share its format

MAX_STOP_SEQUENCES = 4  # OpenAI's limit; each one is searched for at every token
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


# ------------------------------------------------------------------------------------ errors

class ApiError(Exception):
    """A request the server will not run: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


# ------------------------------------------------------------------------------ request bodies

# Strict types: "5" or 5.0 for max_tokens is a mistake to report, not a value to guess at. Fields
# this server does not implement are ignored where leaving them out changes only the sampling
# (penalties, logit_bias, user, ...), as other OpenAI-compatible servers do, so that clients which
# always send them still work; the others are refused (UNSUPPORTED).

class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None  # a JSON integer is accepted too
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None  # not in OpenAI's API; vLLM and others accept it
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None


class CompletionBody(_Sampling):
    prompt: StrictStr | list[StrictStr]


class ChatBody(_Sampling):
    messages: list  # checked by chat_template.check_messages, with messages[i] in its errors
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens


class TokenizeBody(BaseModel):
    """POST /tokenize, as vLLM reads it: a prompt, or chat messages rendered as /v1/chat/completions would."""
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list | None = None


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    tokens: list[StrictInt]


# Fields that take one of several types: pydantic reports a failure per type; one sentence says it better.
UNION_FIELDS = {"prompt": "a string or a list of strings", "stop": "a string or a list of strings",
                "input": "a string or a list of strings"}


# Options whose silent omission would hand a client something other than what it asked for.
UNSUPPORTED = {"echo": "echoing the prompt", "suffix": "a suffix", "logprobs": "log-probabilities",
               "top_logprobs": "log-probabilities", "tools": "tool calls", "functions": "function calls"}


def check_model(asked: str | None, served: str) -> None:
    """A request may leave the model out; naming another one is a 404, as OpenAI answers."""
    if asked is not None and asked != served:
        raise ApiError(404, f"the model {asked!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def _reject_unsupported(data: dict) -> None:
    for option, what in UNSUPPORTED.items():
        if data.get(option) not in (None, False, "", []):
            raise ApiError(400, f"{option}: this server does not support {what}", param=option)
    if data.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of: this server generates one completion per prompt (best_of=1)", param="best_of")


def _validation_error(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else None
    if field in UNION_FIELDS and first["type"] != "missing":
        return ApiError(400, f"{field} must be {UNION_FIELDS[field]}", param=field)
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return ApiError(400, f"{where}: {first['msg']}", param=field)


@dataclass(frozen=True)
class ServeSettings:
    name: str
    max_tokens: int
    max_prompt_tokens: int
    max_body_bytes: int
    max_batch: int


# ------------------------------------------------------------------------------------ the API

class Api:
    """Request checking, tokenization and response shapes, around one model and its scheduler."""

    def __init__(self, model: OnnxModel, settings: ServeSettings):
        self.model, self.settings = model, settings
        self.scheduler = Scheduler(model, settings.max_batch)
        self.template = chat_template_for(model.tokenizer)
        self.metrics = ServerMetrics(self.scheduler.queue.qsize, settings.max_batch)
        self.scheduler.observe_batch = self.metrics.batch_size.observe

    # -- checks

    def sampling(self, body: _Sampling, max_tokens: int | None, default_max_tokens: int) -> dict:
        """GenerationRequest arguments from a body's sampling fields, each checked."""
        if body.n not in (None, 1):
            raise ApiError(400, f"n={body.n}: this server generates one choice per prompt (n=1)", param="n")
        max_tokens = min(default_max_tokens, self.settings.max_tokens) if max_tokens is None else max_tokens
        if max_tokens < 0:
            raise ApiError(400, f"max_tokens must be >= 0, got {max_tokens}", param="max_tokens")
        if max_tokens > self.settings.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {self.settings.max_tokens}",
                           param="max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be between 0 and 2 (0 is greedy), got {temperature}",
                           param="temperature")
        if body.top_p is not None and not 0 < body.top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
        if body.top_k is not None and body.top_k < 1:
            raise ApiError(400, f"top_k must be >= 1, got {body.top_k}", param="top_k")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
        # numpy seeds must be >= 0; OpenAI's may be any 64-bit integer: fold them in, keeping them distinct.
        seed = None if body.seed is None else body.seed % 2**64
        return dict(max_tokens=max_tokens, temperature=float(temperature), top_k=body.top_k,
                    top_p=None if body.top_p is None else float(body.top_p), seed=seed,
                    stop=tuple(s for s in stops if s))

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

    # -- requests

    def completion_requests(self, body: CompletionBody) -> list[GenerationRequest]:
        check_model(body.model, self.settings.name)
        args = self.sampling(body, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        requests = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
            try:
                ids = self.model.tokenizer.encode(prompt)
            except ValueError as err:  # TokenizerError: a character the vocabulary lacks
                raise ApiError(400, f"{param}: {err}", param="prompt") from None
            requests.append(self.checked(GenerationRequest(self.check_prompt(ids, param), **args), param))
        return requests

    def chat_request(self, body: ChatBody) -> GenerationRequest:
        check_model(body.model, self.settings.name)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        args = self.sampling(body, max_tokens, self.settings.max_tokens)
        try:
            prompt = self.template.render(check_messages(body.messages))
        except ValueError as err:  # ChatError: a malformed message, or text the vocabulary cannot encode
            raise ApiError(400, str(err), param="messages") from None
        args["stop"] += prompt.stop
        request = GenerationRequest(self.check_prompt(prompt.ids, "messages"), stop_ids=prompt.stop_ids, **args)
        return self.checked(request, "messages")

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

    # -- running them

    async def events(self, requests: list[GenerationRequest]):
        """(choice, TokenEvent) pairs for the requests, as the worker produces them, until each is finished."""
        ticket = Ticket(asyncio.get_running_loop())
        self.scheduler.submit(ticket, requests)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
        left = len(requests)
        try:
            while left:
                choice, event = await ticket.events.get()
                if isinstance(event, Exception):
                    raise ApiError(500, f"generation failed: {type(event).__name__}: {event}", kind="server_error")
                if event.token is not None:
                    self.metrics.generation_tokens.inc()
                if event.finish_reason is not None:
                    left -= 1
                yield choice, event
        finally:  # finished, failed, or the client went away (the task was cancelled)
            ticket.cancelled = True

    async def complete(self, requests: list[GenerationRequest]) -> tuple[list[str], list[str], dict]:
        """The texts and finish reasons of the requests, and their usage."""
        texts, reasons = [""] * len(requests), [""] * len(requests)
        generated = 0
        async for choice, event in self.events(requests):
            texts[choice] += event.text
            generated += event.token is not None
            if event.finish_reason is not None:
                reasons[choice] = event.finish_reason
        return texts, reasons, self.usage(requests, generated)

    @staticmethod
    def usage(requests: list[GenerationRequest], generated: int) -> dict:
        """completion_tokens counts every token the model generated, a stop token included."""
        prompt = sum(len(r.prompt_ids) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


# ------------------------------------------------------------------------------------ the app

async def read_json(request: Request, limit: int) -> object:
    """The request's JSON body, read no further than `limit` bytes."""
    too_large = ApiError(413, f"the request body is larger than this server's limit of {limit:,} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise ApiError(400, "the request body nests arrays or objects too deeply") from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")  # Python's json reads NaN and Infinity; JSON has neither


def parse_body(model_class: type[BaseModel], data: object) -> BaseModel:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _reject_unsupported(data)
    try:
        return model_class.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None


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
    api = Api(model, settings)

    @asynccontextmanager
    async def lifespan(_app):
        api.scheduler.start()
        yield
        api.scheduler.stop()

    app = new_app(lifespan)
    app.state.api = api
    add_model_routes(app, model_card(settings.name, model.path),
                     lambda: {"queued": api.scheduler.queue.qsize(), "batches": api.scheduler.batches})
    refuse_routes(app, ("/v1/classify",), f"{settings.name} is a language model, not a classifier: it answers "
                  f"{' and '.join(COMPLETION_ROUTES)}")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(CompletionBody, await read_json(request, settings.max_body_bytes))
        requests = api.completion_requests(body)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": settings.name}
        if body.stream:
            return StreamingResponse(_stream_completion(api, requests, head, _include_usage(body)),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        texts, reasons, usage = await api.complete(requests)
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
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
        body = parse_body(ChatBody, await read_json(request, settings.max_body_bytes))
        generation = api.chat_request(body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": settings.name}
        if body.stream:
            head["object"] = "chat.completion.chunk"
            return StreamingResponse(_stream_chat(api, generation, head, _include_usage(body)),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        [text], [reason], usage = await api.complete([generation])
        message = {"role": "assistant", "content": text}
        return {**head, "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
                "usage": usage}

    return api.metrics.measured(app)


def _include_usage(body: _Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _stream_completion(api: Api, requests: list[GenerationRequest], head: dict, include_usage: bool):
    generated = 0
    try:
        async for choice, event in api.events(requests):
            generated += event.token is not None
            if event.text or event.finish_reason:  # empty deltas (text held back) say nothing
                yield _sse({**head, "choices": [{"index": choice, "text": event.text, "logprobs": None,
                                                 "finish_reason": event.finish_reason}]})
    except ApiError as err:  # the status line is long gone: report the failure in the stream
        yield _sse(err.body())
        return
    if include_usage:
        yield _sse({**head, "choices": [], "usage": api.usage(requests, generated)})
    yield _sse("[DONE]")


async def _stream_chat(api: Api, request: GenerationRequest, head: dict, include_usage: bool):
    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]})
    generated = 0
    try:
        async for _, event in api.events([request]):
            generated += event.token is not None
            if event.text:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"content": event.text}, "logprobs": None,
                                                 "finish_reason": None}]})
            if event.finish_reason:
                yield _sse({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                 "finish_reason": event.finish_reason}]})
    except ApiError as err:
        yield _sse(err.body())
        return
    if include_usage:
        yield _sse({**head, "choices": [], "usage": api.usage([request], generated)})
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


def served_language_model(path: Path, args) -> Served:
    model = OnnxModel(path, providers=session_providers(args.provider), threads=args.threads)
    settings = ServeSettings(name=args.name or model.name, max_tokens=args.max_tokens,
                             max_prompt_tokens=args.max_prompt_tokens or model.context,
                             max_body_bytes=args.max_body_bytes, max_batch=args.max_batch)
    notes = ()
    if settings.max_prompt_tokens > model.context:
        notes = (f"prompts longer than the model's context ({model.context} tokens) are cut to their last "
                 f"{model.context} tokens",)
    return Served(create_app(model, settings), settings.name,
                  f"OpenAI-compatible; batches of up to {settings.max_batch}", notes)
