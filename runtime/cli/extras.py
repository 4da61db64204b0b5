"""Which of the package's extras installs each third-party module a verb may import, so that a missing
one becomes one line saying what to install: `pip install lmspec` alone runs check, fmt, diff, info
and plan (lark and networkx); the extras bring the rest.

pyproject.toml's [project.optional-dependencies] is the source of truth; tests/test_slim_install.py
keeps EXTRAS equal to it (each distribution here is imported under its own name).
"""
from __future__ import annotations

# extra -> the third-party modules it installs, besides the core's lark and networkx; for a verb whose
# own extra lacks a module (`classify` of an exported classifier needs onnxruntime), the first extra
# here that holds it is the one named
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "safetensors", "numpy", "tokenizers", "tqdm", "matplotlib", "datasketch", "xxhash",
              "jinja2", "pyarrow", "zstandard"),
    "serve": ("onnxruntime", "numpy", "tokenizers", "fastapi", "uvicorn", "prometheus_client", "jinja2"),
    "export": ("torch", "safetensors", "numpy", "tokenizers", "onnx", "onnxscript", "onnxruntime", "xxhash", "jinja2",
               "gguf"),
    "graph": ("pydot", "matplotlib"),  # `lmspec info --graph`
    "watch": ("tensorboard",),  # `--log tensorboard` of train and the finetune verbs
}

# a verb (its first word) -> the extra it needs; check, fmt, diff and plan need none, and info only
# for --graph
VERB_EXTRAS: dict[str, str] = {
    "info": "graph",
    "train": "train", "sample": "train", "plot": "train", "data": "train", "tokenizer": "train", "import": "train",
    "finetune": "train", "classify": "train", "chat": "train", "eval": "train", "lora": "train",
    "export": "export",
    "generate": "serve", "serve": "serve",
}


# the oldest torch the train and export extras accept (pyproject.toml's pin; the suite runs on it):
# older ones lack APIs lmspec calls (fully_shard's public path, get_total_norm, the ONNX exporter's
# dynamic shapes), and would fail inside a run
MIN_TORCH = (2, 11)


def old_torch_report(verb: str) -> str | None:
    """The one line `lmspec VERB` prints when the verb runs torch and the installed torch is older
    than MIN_TORCH (an environment pip did not resolve, e.g. with --no-deps); None otherwise."""
    from importlib.metadata import PackageNotFoundError, version

    if "torch" not in EXTRAS.get(VERB_EXTRAS.get(verb.partition(" ")[0], ""), ()):
        return None
    try:
        installed = version("torch")
    except PackageNotFoundError:  # not installed: missing_extra_report says so when it is imported
        return None
    numbers = tuple(int(part) for part in installed.split("+")[0].split(".")[:2] if part.isdigit())
    if len(numbers) < 2 or numbers >= MIN_TORCH:
        return None
    wanted = ".".join(map(str, MIN_TORCH))
    return f"lmspec {verb}: error: needs torch {wanted} or newer, and torch {installed} is installed: " \
           f"pip install 'torch>={wanted}'"


def extra_for(verb: str, module: str) -> str | None:
    """The extra that installs `module` (a ModuleNotFoundError's name) for `verb`: the verb's own
    extra when it holds the module, else the first that does; None for a module no extra installs."""
    top = module.partition(".")[0]
    holding = [extra for extra, modules in EXTRAS.items() if top in modules]
    own = VERB_EXTRAS.get(verb.partition(" ")[0])
    return own if own in holding else (holding[0] if holding else None)


def missing_extra_report(verb: str, module: str) -> str | None:
    """The one line `lmspec VERB` prints when `module` is not installed, or None when no extra holds it."""
    extra = extra_for(verb, module)
    if extra is None:
        return None
    top = module.partition(".")[0]
    return f"lmspec {verb}: error: needs the {extra} extra ({top} is not installed): pip install 'lmspec[{extra}]'"
