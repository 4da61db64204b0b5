"""`lmspec generate` and `lmspec serve`: an exported bundle run by onnxruntime, once or behind HTTP
(the app and its models live in runtime/serve/). No torch on these paths."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from lmspec.dsl.errors import UserError
from lmspec.runtime.cli.numbers import AT_LEAST_0, AT_LEAST_1, NOT_NEGATIVE, PORT, POSITIVE, THREADS
from lmspec.runtime.cli.options import add_provider_option, add_sampling_options
from lmspec.runtime.cli.verb import Verb
from lmspec.runtime.errors import DataError, TokenizerError, UsageError

API_KEY_VARIABLE = "LMSPEC_API_KEY"  # the key in the environment: out of `ps` and shell history


def generate_options(p) -> None:
    """`lmspec generate`'s options."""
    p.add_argument("model", help="an exported .onnx file, or a directory holding one")
    p.add_argument("--prompt", action="append", help="text to continue; repeat for a batch of prompts")
    p.add_argument("--prompts-file", help="a file with one prompt per line (batched)")
    add_sampling_options(p)
    p.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop when this text appears (repeatable; \\n means a newline)")
    p.add_argument("--threads", type=THREADS, help="onnxruntime intra-op threads")
    add_provider_option(p)
    p.add_argument("--json", action="store_true", help="print the completions as JSON")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user's message, rendered with the model's chat template (the one it was "
                        "finetuned or imported with; else ChatML or plain text); the answer stops where the "
                        "template ends one")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before each prompt")


def cmd_generate(args) -> int:
    from lmspec.runtime.export.bundle import session_providers
    from lmspec.runtime.serve.language_model import OnnxModel
    from lmspec.runtime.serve.requests import GenerationRequest, check_request

    providers = session_providers(args.provider)  # a provider this onnxruntime lacks: said before any loading
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            prompts += [line for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if line]
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{args.prompts_file}: cannot read prompts: {err}") from None
    if not prompts:
        prompts = [""]
    if args.system is not None and not args.chat:
        raise UsageError("--system: only with --chat")
    model = OnnxModel(args.model, providers=providers, threads=args.threads)
    template = _chat_template(model) if args.chat else None
    requests = []
    for prompt in prompts:
        ids, stop, stop_ids = _chat_prompt(template, prompt, args.system) if template else (None, (), ())
        try:
            if ids is None:
                ids = model.tokenizer.encode(prompt) if prompt else [model.eot_id if model.eot_id is not None else 0]
        except (ValueError, TokenizerError) as err:
            raise TokenizerError(f"prompt {prompt!r}: {err}") from None
        requests.append(GenerationRequest(ids, args.max_tokens, args.temperature, args.top_k, args.top_p,
                                          args.seed, stop=_stop_strings(args.stop) + stop, stop_ids=stop_ids))
    try:
        for request in requests:
            check_request(request, model.vocab_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    started = time.perf_counter()
    try:
        if len(requests) == 1 and not args.json:
            sys.stdout.write("" if args.chat else prompts[0])  # a chat prints the answer alone
            for event in model.stream(requests):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        completions = model.generate(requests)
    except ValueError as err:
        raise UsageError(str(err)) from None
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps([{"prompt": p, "text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason,
                           "prompt_tokens": len(r.prompt_ids)}
                          for p, c, r in zip(prompts, completions, requests)], ensure_ascii=False, indent=1))
    else:
        for prompt, c in zip(prompts, completions):
            print(c.text if args.chat else prompt + c.text)
            print("---")
        total = sum(len(c.tokens) for c in completions)
        print(f"{total} tokens in {seconds:.2f} s", file=sys.stderr)
    return 0


def _chat_template(model):
    """The bundle's own chat template, else ChatML or plain text (as `serve` renders chats)."""
    from lmspec.runtime.data.chat_template import chat_template_for
    from lmspec.runtime.export.bundle import bundle_chat_template

    return chat_template_for(model.tokenizer, bundle_chat_template(model.meta))


def _chat_prompt(template, text: str, system: str | None) -> tuple[list[int], tuple[str, ...], tuple[int, ...]]:
    """(ids, stop strings, stop ids) of `text` as a user's message; a ChatError is one line."""
    prompt = template.render(([("system", system)] if system else []) + [("user", text)])
    return prompt.ids, prompt.stop, prompt.stop_ids


GENERATE = Verb(
    "generate",
    "Generate text from an exported ONNX model with onnxruntime (no PyTorch).",
    generate_options, cmd_generate,
    examples="""examples:
  lmspec generate exported/tiny.onnx --prompt "The " --max-tokens 100
  lmspec generate exported/tiny.onnx --prompt "def " --prompt "The module" --temperature 0
  lmspec generate exported/ --prompt "Q:" --stop "\\n" --top-p 0.9 --seed 1
  lmspec generate exported/assistant.onnx --chat --prompt "Name three primary colours." --temperature 0""",
)


def _check_args(args) -> None:
    for origin in args.cors_origin:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise UsageError(f"--cors-origin {origin}: an origin is a scheme and a host, such as https://app.example")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here rather than by uvicorn so that a taken port is a one-line error
    and --port 0 can report the port it got."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    # With the protocol given (IPPROTO_TCP), asyncio sets TCP_NODELAY on each connection; with 0 it
    # does not, and every small response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def served_bundle(args):
    """The server (serve/app.py's Served) for the bundle's kind: a language model, or a classifier
    (serve/classifier_app.py)."""
    from lmspec.runtime.export.bundle import CLASSIFIER, bundle_kind, find_model_file, read_sidecar
    from lmspec.runtime.serve.app import served_language_model
    from lmspec.runtime.serve.classifier_app import served_classifier
    path = find_model_file(args.model)
    if bundle_kind(read_sidecar(path)) == CLASSIFIER:
        return served_classifier(path, args)
    return served_language_model(path, args)


def serve_options(p) -> None:
    """`lmspec serve`'s options."""
    p.add_argument("model", help="an exported .onnx file (language model or classifier), or a directory holding one")
    p.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: loopback only; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=PORT, default=8000, help="TCP port to listen on (0: a free one, printed)")
    p.add_argument("--name", help="the model name clients ask for (default: the spec's model name)")
    p.add_argument("--max-tokens", type=AT_LEAST_0, default=1024,
                    help="the most tokens one request may generate (language models)")
    p.add_argument("--max-prompt-tokens", type=AT_LEAST_1,
                    help="the longest prompt accepted (language models; default: the context)")
    p.add_argument("--max-body-bytes", type=AT_LEAST_1, default=1 << 20, help="the largest request body accepted")
    p.add_argument("--max-batch", type=AT_LEAST_1, default=16,
                    help="the most requests generated together: they join and leave the running batch between "
                         "decode steps (language models)")
    p.add_argument("--max-choices", type=AT_LEAST_1, default=16,
                   help="the most completions one request may ask for, prompts x n (language models)")
    p.add_argument("--request-timeout", type=POSITIVE, metavar="S",
                   help="seconds a request may take from arrival to its last token; it is stopped after, with a 408 "
                        "(default: no limit)")
    p.add_argument("--drain-seconds", type=NOT_NEGATIVE, default=30.0, metavar="S",
                   help="on SIGTERM or Ctrl-C, seconds the requests in flight may take to finish; those still "
                        "running after are ended with a 503 error (default: 30)")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous (the default), or static: whole batches, one after the other (the old "
                        "scheduler, kept to measure against)")
    p.add_argument("--threads", type=THREADS, help="onnxruntime intra-op threads")
    add_provider_option(p)
    p.add_argument("--api-key", metavar="KEY", default=argparse.SUPPRESS,
                   help=f"require `Authorization: Bearer KEY` on every route but /health and the chat page at / "
                        f"(default: ${API_KEY_VARIABLE} when set, else no key)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", default=[],
                   help="a web origin (https://app.example) whose pages may call the server; repeatable "
                        "(default: none)")
    p.add_argument("--read-timeout", type=POSITIVE, default=30.0, metavar="S",
                   help="seconds a request's headers may take to arrive (the connection closes after), and each "
                        "part of its body (408 after)")
    p.add_argument("--idle-timeout", type=POSITIVE, default=5.0, metavar="S",
                   help="seconds an idle keep-alive connection stays open")


def cmd_serve(args) -> int:
    import uvicorn

    from lmspec.runtime.export.bundle import session_providers
    from lmspec.runtime.serve.draining import DrainingServer
    from lmspec.runtime.serve.guard import guarded, header_timeout_protocol

    _check_args(args)
    session_providers(args.provider)  # a provider this onnxruntime lacks: said before the bundle is read
    served = served_bundle(args)
    try:
        sock = _bind(args.host, args.port)
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    address, port = sock.getsockname()[:2]
    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_VARIABLE) or None
    if not _is_loopback(address) and api_key is None:
        print(f"lmspec serve: warning: listening on {address}, reachable from other machines; this server "
              f"has no authentication (give --api-key, or use --host 127.0.0.1 to keep it local)", file=sys.stderr)
    app = guarded(served.app, api_key=api_key, loopback_only=_is_loopback(address), read_timeout=args.read_timeout,
                  cors_origins=args.cors_origin)
    for note in served.notes:
        print(f"lmspec serve: note: {note}", file=sys.stderr)
    host = f"[{address}]" if ":" in address else address
    print(f"serving {served.name} at http://{host}:{port}/v1 ({served.answers}; Ctrl-C stops)", flush=True)
    # The drain ends every request by the deadline; uvicorn's own grace period is only a backstop.
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=args.drain_seconds + 5,
                            timeout_keep_alive=args.idle_timeout, http=header_timeout_protocol(args.read_timeout))
    DrainingServer(config, served.drain, args.drain_seconds).run(sockets=[sock])
    return 0


SERVE = Verb(
    "serve",
    ("Serve an exported ONNX model over HTTP: a language model with an OpenAI-compatible API (/v1/completions, "
     "/v1/chat/completions), a classifier with POST /v1/classify."),
    serve_options, cmd_serve,
    examples="""examples:
  lmspec serve exported/tiny.onnx
  lmspec serve exported/tiny.onnx --port 8080 --max-tokens 256
  curl localhost:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"model": "tiny", "prompt": "The ", "max_tokens": 50}'
  LMSPEC_API_KEY=$(openssl rand -hex 16) lmspec serve exported/tiny.onnx --host 0.0.0.0   # clients send the key
  lmspec serve exported/tiny.onnx --cors-origin https://app.example   # pages of that origin may call it
  lmspec serve exported/tiny.onnx --max-batch 32 --request-timeout 120 --drain-seconds 10
  curl localhost:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"prompt": "The cat", "max_tokens": 1, "echo": true, "logprobs": 1}'   # prompt log-probabilities
  lmspec serve exported/spam/                  # a classifier bundle: POST /v1/classify
  curl localhost:8000/v1/classify -H 'content-type: application/json' \\
       -d '{"input": ["WINNER!! Claim your prize now", "see you at 6?"]}'""",
)


def _stop_strings(values: list[str] | None) -> tuple[str, ...]:
    # Written on a command line, "\n" arrives as a backslash and an n: let it mean a newline.
    return tuple(v.encode("utf-8").decode("unicode_escape") if "\\" in v else v for v in values or [])
