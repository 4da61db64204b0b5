"""The JSON bodies the HTTP API accepts and how they are read: the request's bytes (bounded), strict
pydantic models per route, fields that change nothing (accepted, dropped) or that this server cannot
honour (a 400, never silently dropped), and ApiError, the OpenAI-style 4xx or 5xx answer."""
from __future__ import annotations

import json

from fastapi import Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError


# ------------------------------------------------------------------------------------ errors

class ApiError(Exception):
    """A request the server will not run: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------ request bodies

# Strict types: "5" or 5.0 for max_tokens is a mistake to report, not a value to guess at. Unknown
# fields are refused (parse_body), but for IGNORED ones, which change nothing about the answer.

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None  # a JSON integer is accepted too
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None  # not in OpenAI's API; vLLM and others accept it
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None  # token id (as a string, JSON keys are) -> bias
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None


class CompletionBody(SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]  # text, or token ids
    echo: StrictBool = False
    logprobs: StrictInt | None = None  # the k likeliest tokens at each place (0: the chosen one's only)


class ChatBody(SamplingFields):
    messages: list  # checked by chat_template.check_messages, with messages[i] in its errors
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


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
UNION_FIELDS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of them",
                "stop": "a string or a list of strings", "input": "a string or a list of strings"}

# Fields that change nothing about the answer: accepted and dropped, as OpenAI's own server treats
# them for generation (bookkeeping, caching and routing hints).
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
                     "parallel_tool_calls"})

# Fields that would change the answer in ways this server does not implement, and the values that
# ask for nothing (which are accepted).
UNSUPPORTED = {"suffix": ("a suffix (fill-in-the-middle)", (None, "")),
               "response_format": ("structured output (response_format)", (None, {"type": "text"})),
               "tools": ("tool calls", (None, [])), "functions": ("function calls", (None, [])),
               "tool_choice": ("tool calls", (None, "none")), "function_call": ("function calls", (None, "none")),
               "best_of": ("best_of > 1 (give n instead)", (None, 1)),
               "modalities": ("output other than text", (None, ["text"])), "audio": ("audio output", (None,)),
               "prediction": ("predicted outputs", (None,)), "reasoning_effort": ("reasoning effort", (None,)),
               "web_search_options": ("web search", (None,))}


def check_model(asked: str | None, served: str) -> None:
    """A request may leave the model out; naming another one is a 404, as OpenAI answers."""
    if asked is not None and asked != served:
        raise ApiError(404, f"the model {asked!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def _known_fields(data: dict, model_class: type[BaseModel]) -> dict:
    """`data` without the IGNORED fields; an option this server cannot honour is a 400, never dropped."""
    missing = next((name for name, f in model_class.model_fields.items() if f.is_required() and name not in data), None)
    if missing is not None:  # the field a request lacks says more than the one it has too many of
        raise ApiError(400, f"{missing}: Field required", param=missing)
    kept = {}
    for key, value in data.items():
        if key in model_class.model_fields:
            kept[key] = value
        elif key in UNSUPPORTED:
            what, harmless = UNSUPPORTED[key]
            if value not in harmless:
                raise ApiError(400, f"{key}: this server does not support {what}", param=key)
        elif key not in IGNORED:
            raise ApiError(400, f"{key}: not a field this server knows; it refuses what it cannot honour rather "
                           f"than ignore it", param=key)
    return kept


def _validation_error(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else None
    if field in UNION_FIELDS and first["type"] != "missing":
        return ApiError(400, f"{field} must be {UNION_FIELDS[field]}", param=field)
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return ApiError(400, f"{where}: {first['msg']}", param=field)


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
    if model_class.model_config.get("extra") == "forbid":
        data = _known_fields(data, model_class)
    try:
        return model_class.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None
