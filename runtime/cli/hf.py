"""`lmspec import hf DIR` and `lmspec export hf CHECKPOINT`: Hugging Face model directories in and out
(the work is in runtime/hf/convert.py, the families in runtime/hf/maps/)."""
from __future__ import annotations

import argparse

from lmspec.runtime.cli.options import add_override_options, cli_overrides
from lmspec.runtime.cli.verb import Verb, option_output


def import_hf_options(p) -> None:
    """`lmspec import hf`'s options."""
    p.add_argument("dir", help="a Hugging Face model directory: config.json and model.safetensors (or shards)")
    p.add_argument("--spec", help="the spec the model must match")
    p.add_argument("--emit-spec", metavar="FILE", help="instead of --spec: write the spec for config.json to FILE")
    p.add_argument("-o", "--out", required=True, help="the run directory to create for the checkpoint")
    p.add_argument("--output", dest="out", help=argparse.SUPPRESS)  # its name before every verb said --out
    p.add_argument("--tokenizer", help="a tokenizer to store when DIR has none (or to use instead of DIR's)")
    p.add_argument("--map", metavar="MAP.toml",
                   help="how config.json and the tensors map onto the spec, for any model_type (the README's "
                        "\"Bringing a new family\"); default: the map lmspec ships for DIR's model_type")
    add_override_options(p)


def cmd_import_hf(args) -> int:
    from lmspec.runtime.hf.convert import import_hf

    import_hf(args.dir, args.out, spec=args.spec, overrides=cli_overrides(args.set), model=args.model,
              emit_spec=args.emit_spec, tokenizer=args.tokenizer, map_path=args.map)
    return 0


IMPORT_HF = Verb(
    "import hf",
    ("Import a Hugging Face model directory (config.json + safetensors) as a checkpoint, checked against a "
     "spec."),
    import_hf_options, cmd_import_hf,
    outputs=(option_output("out", directory=True), option_output("emit_spec", directory=False)),
    examples="""examples:
  lmspec import hf ~/models/gpt2 --spec specs/gpt2.arch -o runs/gpt2
  lmspec import hf ~/models/Qwen3-0.6B --spec specs/qwen3-0.6b.arch -o runs/qwen3
  lmspec import hf ~/models/gpt2-tiny --emit-spec gpt2-tiny.arch -o runs/gpt2-tiny
  lmspec import hf ~/models/OLMo-2-0425-1B --spec olmo2.arch --map olmo2.toml -o runs/olmo2
  lmspec import hf ~/models/no-tokenizer --spec my.arch -o runs/x --tokenizer ../shared/data/gpt2-tokenizer""",
)


def cmd_export_hf(args) -> int:
    from lmspec.runtime.hf.convert import export_hf

    export_hf(args.checkpoint, args.out, model_type=args.model_type, map_path=getattr(args, "map", None))
    return 0
