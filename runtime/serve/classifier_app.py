"""`lmspec serve` for an exported classifier (a run of `lmspec finetune classify`): POST /v1/classify
answers each text's class probabilities, computed by OnnxClassifier exactly as `lmspec classify
BUNDLE` computes them, beside GET /health and GET /v1/models. The completion routes answer a 400
that points to /v1/classify. No torch on this path either.

The app skeleton (error bodies, body size limit, model routes) is serve.py's. onnxruntime runs in
one worker thread, so that the event loop keeps accepting and answering while a batch is classified.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictStr

from lmspec.runtime.serve.classifier import OnnxClassifier
from lmspec.runtime.export.bundle import CLASSIFIER, session_providers
from lmspec.runtime.serve.app import COMPLETION_ROUTES, Served, add_model_routes, model_card, new_app, refuse_routes
from lmspec.runtime.serve.http_bodies import ApiError, check_model, parse_body, read_json

MAX_TEXTS = 256  # per request: one request cannot hold the worker for long


class ClassifyBody(BaseModel):
    # as the completion bodies: a field that changes nothing (user, metadata) is dropped, any other
    # unknown one is a 400 rather than silently ignored
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr]


@dataclass(frozen=True)
class ClassifierSettings:
    name: str
    max_body_bytes: int
    max_texts: int = MAX_TEXTS


def texts_to_classify(body: ClassifyBody, settings: ClassifierSettings) -> list[str]:
    """The body's texts, checked. An empty string is a text like any other (`lmspec classify ""`
    classifies it too); an empty list is a mistake."""
    check_model(body.model, settings.name)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input: give a string or a non-empty list of strings", param="input")
    if len(texts) > settings.max_texts:
        raise ApiError(400, f"input: {len(texts)} texts; this server classifies at most {settings.max_texts} "
                       f"per request", param="input")
    return texts


def predictions(labels: list[str], probs: np.ndarray) -> list[dict]:
    """One entry per text, in request order: the most probable label, its probability, and every label's."""
    return [{"index": i, "label": labels[int(row.argmax())], "score": float(row.max()),
             "scores": dict(zip(labels, map(float, row)))} for i, row in enumerate(probs)]


def create_classifier_app(classifier: OnnxClassifier, settings: ClassifierSettings) -> FastAPI:
    # One thread, as the language model's one worker: onnxruntime already spreads a batch over its
    # intra-op threads, and the text encoder counts replaced characters in shared state.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmspec-classify")

    @asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown(wait=True, cancel_futures=True)

    app = new_app(lifespan)
    add_model_routes(app, model_card(settings.name, classifier.path, kind=CLASSIFIER, labels=classifier.labels),
                     lambda: {"kind": CLASSIFIER})
    refuse_routes(app, COMPLETION_ROUTES, f"{settings.name} is a classifier ({', '.join(classifier.labels)}), "
                  f"not a language model: it does not generate text; use POST /v1/classify")

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = parse_body(ClassifyBody, await read_json(request, settings.max_body_bytes))
        texts = texts_to_classify(body, settings)
        probs = await asyncio.get_running_loop().run_in_executor(pool, classifier.probabilities, texts)
        return {"object": "list", "model": settings.name, "data": predictions(classifier.labels, probs)}

    return app


def served_classifier(path: Path, args) -> Served:
    """`lmspec serve` of a classifier bundle; the generation limits (--max-tokens, --max-batch, ...)
    do not apply to it."""
    classifier = OnnxClassifier(path, threads=args.threads, providers=session_providers(args.provider))
    settings = ClassifierSettings(args.name or classifier.meta["name"], args.max_body_bytes)
    return Served(create_classifier_app(classifier, settings), settings.name,
                  f"a classifier of {', '.join(classifier.labels)}: POST /v1/classify, up to "
                  f"{settings.max_texts} texts a request")
