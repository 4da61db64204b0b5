"""Every error a user can cause while running a model, as the command line reports them: one
`lmspec VERB: error: ...` line and exit 1 (exit 2 for a usage error), caught once by the CLI.

All derive from lmspec.dsl.errors.UserError, as the spec's own errors (SpecError) and the
compiler's (RewriteError, ExportError) do; anything else that reaches the CLI is a bug in lmspec.
"""
from __future__ import annotations

from lmspec.dsl.errors import UserError

__all__ = ["UserError", "UsageError", "DeviceError", "ProviderError", "DataError", "TokenizerError", "ChatError",
           "TemplateError", "CheckpointError", "ConfigError", "TrainingError", "HFError", "GGUFError", "BundleError",
           "DiffInputError", "WriteError", "RunLockedError"]


class UsageError(UserError):
    """What the user typed cannot work: a missing option, two that conflict, a value out of range."""
    exit_code = 2


class DataError(UserError, ValueError):
    """Training data that cannot be used; the message names the file or the problem."""


class TokenizerError(UserError, ValueError):
    """A tokenizer file or serialised tokenizer that cannot be used; the message names it."""


class ChatError(UserError, ValueError):
    """Messages that cannot be made into a prompt; the message says which and why."""


class TemplateError(UserError, ValueError):
    """A template this tokenizer or record cannot be written in; the message says why."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not fit the model; the message names the file."""


class ConfigError(UserError, ValueError):
    """A training setting that cannot work; the message names the setting."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (the loss diverged, or the run directory is in the way)."""


class HFError(UserError):
    """A Hugging Face directory that cannot be imported, or a checkpoint that cannot be exported."""


class GGUFError(UserError):
    """A checkpoint llama.cpp could not run as its spec computes it; the message names the option."""


class BundleError(UserError):
    """An ONNX bundle that is missing, incomplete or corrupt; the message names the file."""


class ProviderError(UsageError):
    """An execution provider that is not there: not built into this onnxruntime, or not started by it."""


class DeviceError(UsageError):
    """A device that is not there (no CUDA, no such GPU, more ranks on a node than GPUs)."""


class DiffInputError(UserError):
    """A side that is missing or not a readable checkpoint: one line, exit 1."""


class WriteError(UserError):
    """A file or directory that cannot be written: a read-only folder, a full disk, a path that runs
    through a file. The message names the path the user gave and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return self.args[0]


class RunLockedError(UserError):
    """A run directory that another live process is writing (runtime/checkpoint/run_lock.py)."""
