"""The ONNX bundle format: finding, reading and checking a bundle, and opening an onnxruntime session
of it on the providers asked for. No torch on this path.

A bundle is the ONNX file and, beside it, `<name>.lmspec.json` (see `bundle_sidecar`): the
tokenizer, the cache layout and what generation needs (context, end-of-text id), and for a model
that has one its chat template (`chat_template`: the Jinja text and the special tokens it uses,
which `generate --chat` and `serve` render; see runtime/data/chat_template.py). Text generation with
it is runtime/serve/language_model.py.

The sidecar's "kind" says what the model is: a language model (also when it has none, as the first
bundles do) or a classifier, whose sidecar adds its labels, max length and pad id, and which
runtime/serve/classifier.py runs instead.

`--provider` picks onnxruntime's execution providers (`session_providers`); a provider that this
onnxruntime lacks, or that a session leaves out, is a one-line ProviderError rather than a quiet
run on the CPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lmspec.runtime.data.chat_template import template_record_problem
from lmspec.runtime.data.tokenizer import TokenizerError, load_tokenizer
from lmspec.runtime.errors import BundleError, ProviderError

BUNDLE_FORMAT = "lmspec-onnx"
BUNDLE_VERSION = 1
SIDECAR_SUFFIX = ".lmspec.json"
LANGUAGE_MODEL, CLASSIFIER = "language_model", "classifier"  # a sidecar's "kind"
SHARED_BUFFER = "shared"  # a sidecar's cache "buffer" for a fused-attention export (compiler/onnx_export.py)
CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"
# What each `--provider` name means to onnxruntime, in order of preference: the CPU stays last for the
# odd operator a GPU provider has no kernel for (onnxruntime places such nodes there itself).
PROVIDERS = {"cpu": [CPU_PROVIDER], "cuda": [CUDA_PROVIDER, CPU_PROVIDER]}


def bundle_sidecar(onnx_path: str | os.PathLike) -> Path:
    """The metadata file beside an ONNX model: model.onnx -> model.lmspec.json."""
    path = Path(onnx_path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def find_model_file(path: str | os.PathLike) -> Path:
    """The ONNX file meant by `path`: the file itself, or the one model in a directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.glob("*.onnx") if bundle_sidecar(p).is_file())
        if len(found) != 1:
            what = "no exported model" if not found else f"{len(found)} models ({', '.join(p.name for p in found)})"
            raise BundleError(f"{path}: holds {what}; name the .onnx file")
        return found[0]
    if not path.is_file():
        raise BundleError(f"{path}: no such ONNX model (export one with `lmspec export`)")
    return path


def is_bundle_path(path: str | os.PathLike) -> bool:
    """Whether `path` means an exported bundle rather than a checkpoint: a .onnx file (there or not),
    or a directory holding one."""
    path = Path(path)
    return path.suffix == ".onnx" or (path.is_dir() and any(path.glob("*.onnx")))


def read_sidecar(onnx_path: Path) -> dict:
    """The sidecar beside `onnx_path`, checked: a BundleError that names the file for anything
    missing, of another format or version, or malformed."""
    path = bundle_sidecar(onnx_path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; it holds the tokenizer and settings that {onnx_path.name} needs "
                          f"(export with `lmspec export` writes both)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable or not JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not an lmspec ONNX bundle (format is not {BUNDLE_FORMAT!r})")
    if meta.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: version {meta.get('version')!r}; this lmspec reads version {BUNDLE_VERSION}")
    for key, kind in (("name", str), ("context", int), ("vocab_size", int), ("tokenizer", str)):
        if not isinstance(meta.get(key), kind):
            raise BundleError(f"{path}: corrupt: {key!r} missing or not a {kind.__name__}")
    cache = meta.get("cache")
    if cache is not None and not (isinstance(cache, dict) and isinstance(cache.get("layers"), int)
                                  and len(cache.get("kv_heads", [])) == cache["layers"]
                                  and len(cache.get("head_dim", [])) == cache["layers"]):
        raise BundleError(f"{path}: corrupt: 'cache' does not describe the layers")
    kept = (cache or {}).get("kept")
    if kept is not None and not (isinstance(kept, list) and len(kept) == cache["layers"] and all(
            k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1) for k in kept)):
        raise BundleError(f"{path}: corrupt: the cache's 'kept' is not, for each layer, null or a number of positions")
    if bundle_kind(meta) not in (LANGUAGE_MODEL, CLASSIFIER):
        raise BundleError(f"{path}: corrupt: 'kind' is {meta['kind']!r}, not {LANGUAGE_MODEL!r} or {CLASSIFIER!r}")
    if bundle_kind(meta) == CLASSIFIER:
        _check_classifier_fields(path, meta)
    if "chat_template" in meta and (problem := template_record_problem(meta["chat_template"])) is not None:
        raise BundleError(f"{path}: corrupt: 'chat_template' {problem}")
    return meta


def _check_classifier_fields(path: Path, meta: dict) -> None:
    labels = meta.get("labels")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
        raise BundleError(f"{path}: corrupt: a classifier's 'labels' must be a list of at least two names")
    for key, least in (("max_length", 1), ("pad_id", 0)):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise BundleError(f"{path}: corrupt: a classifier's {key!r} missing or not an integer >= {least}")
    if meta["max_length"] > meta["context"]:  # longer texts would run past the position table
        raise BundleError(f"{path}: corrupt: 'max_length' {meta['max_length']} exceeds the context {meta['context']}")


def bundle_kind(meta: dict) -> str:
    return meta.get("kind", LANGUAGE_MODEL)


def bundle_chat_template(meta: dict) -> dict | None:
    """The model's own chat template ({"source", "template", "special_tokens"}: the Jinja text it was
    finetuned or imported with), or None for a bundle without one (chat_template_for then falls back)."""
    return meta.get("chat_template")


def bundle_tokenizer(onnx_path: Path, meta: dict):
    try:
        return load_tokenizer(meta["tokenizer"])
    except TokenizerError as err:
        raise BundleError(f"{bundle_sidecar(onnx_path)}: its tokenizer is unusable: {err}") from None


def session_providers(name: str = "cpu") -> list[str]:
    """onnxruntime's providers for `--provider NAME`; a ProviderError, before any model is loaded,
    when this onnxruntime is built without the one asked for (the CPU wheel has no CUDA)."""
    import onnxruntime as ort

    if name not in PROVIDERS:
        raise ProviderError(f"--provider {name!r}: expected {' or '.join(PROVIDERS)}")
    wanted = PROVIDERS[name][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise ProviderError(f"--provider {name}: this onnxruntime ({ort.__version__}, providers: "
                            f"{', '.join(available)}) has no {_short(wanted)} provider; install "
                            f"onnxruntime-gpu in place of onnxruntime, or use --provider cpu")
    return list(PROVIDERS[name])


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def _option(providers: list[str]) -> str:
    """The `--provider` that asks for these providers, for messages: 'cuda', or onnxruntime's own name."""
    return next((name for name, listed in PROVIDERS.items() if listed[0] == providers[0]), providers[0])


def check_session_providers(session, providers: list[str], onnx_path: Path) -> None:
    """A ProviderError when the session runs without the provider asked for first: onnxruntime lists
    the CUDA provider yet drops it, with no more than a logged warning, when it cannot start it (no
    driver, no GPU, a missing CUDA or cuDNN library), and the model would run on the CPU unnoticed."""
    used = session.get_providers()
    if providers[0] not in used:
        import onnxruntime as ort
        raise ProviderError(f"--provider {_option(providers)}: onnxruntime {ort.__version__} could not start its "
                            f"{_short(providers[0])} provider for {onnx_path.name} (the session has only "
                            f"{', '.join(used)}); check the driver (nvidia-smi) and the CUDA and cuDNN libraries "
                            f"this onnxruntime-gpu needs, or use --provider cpu")


def session_options(threads: int | None = None):
    """onnxruntime's options for lmspec's sessions: `threads` (default: onnxruntime's), and errors
    only in its log. Its one warning on an export is that `logits_to_keep` (an initializer the caller
    may override, compiler/onnx_last_logits.py) is not a constant, which is meant."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def open_session(onnx_path: Path, threads: int | None = None, providers: list[str] | None = None):
    """An onnxruntime session of the bundle's model on `providers` (default: the CPU's, see
    `session_providers`); a BundleError for a file onnxruntime cannot load, a ProviderError for a
    session without the provider asked for."""
    import onnxruntime as ort

    providers = providers or [CPU_PROVIDER]
    options = session_options(threads)
    # Without this, onnxruntime answers a GPU provider that fails to start by printing to stdout (into
    # `lmspec generate`'s text) and quietly retrying on the CPU.
    fallback = {} if providers == [CPU_PROVIDER] else {"enable_fallback": 0}
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=providers, **fallback)
    except Exception as err:  # onnxruntime raises its own exception types for a corrupt file
        on = "" if providers == [CPU_PROVIDER] else f" with --provider {_option(providers)}"
        raise BundleError(f"{onnx_path}: onnxruntime cannot load it{on}: {str(err).splitlines()[0]}") from None
    check_session_providers(session, providers, onnx_path)
    return session
