"""Options several verbs share, and turning what the user typed into values: `--set`, `--provider`."""
from __future__ import annotations

from lmspec.runtime.errors import UsageError


def cli_overrides(pairs: list[str]) -> dict:
    """The `--set NAME=VALUE` options as a dict of hyper-parameters."""
    from lmspec.compiler import parse_overrides
    try:
        return parse_overrides(pairs)
    except ValueError as err:
        raise UsageError(str(err)) from None


PROVIDER_HELP = ("where onnxruntime runs the exported model: cpu (default), or cuda (onnxruntime's CUDA provider: "
                 "needs onnxruntime-gpu installed in place of onnxruntime)")


def add_provider_option(parser) -> None:
    """--provider, for every verb that runs an exported model in onnxruntime; declared here, where the
    command line can afford it, rather than beside onnx_model.PROVIDERS, which imports numpy and the
    tokenizers."""
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help=PROVIDER_HELP)
