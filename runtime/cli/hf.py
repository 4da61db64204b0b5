"""`lmspec import hf DIR` and `lmspec export hf CHECKPOINT`: Hugging Face model directories in and out
(the work is in hf_import, the tables in hf_families)."""
from __future__ import annotations

import sys

from lmspec.runtime.cli.options import cli_overrides


def _fail(verb: str, err: Exception) -> int:
    print(f"lmspec {verb}: error: {err}", file=sys.stderr)
    return 1


def cmd_import_hf(args) -> int:
    from lmspec.runtime.checkpoint.store import CheckpointError
    from lmspec.runtime.hf.convert import HFError, import_hf
    from lmspec.runtime.data.tokenizer import TokenizerError

    try:
        import_hf(args.dir, args.output, spec=args.spec, overrides=cli_overrides(args.set), model=args.model,
                  emit_spec=args.emit_spec, tokenizer=args.tokenizer)
    except (HFError, CheckpointError, TokenizerError) as err:
        return _fail("import hf", err)
    return 0


def cmd_export_hf(args) -> int:
    from lmspec.runtime.checkpoint.store import CheckpointError
    from lmspec.runtime.hf.convert import HFError, export_hf
    from lmspec.runtime.data.tokenizer import TokenizerError

    try:
        export_hf(args.checkpoint, args.output, model_type=args.model_type)
    except (HFError, CheckpointError, TokenizerError) as err:
        return _fail("export hf", err)
    return 0
