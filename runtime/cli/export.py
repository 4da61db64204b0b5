"""`lmspec export`: a checkpoint to an ONNX bundle (the steps are runtime/export/from_checkpoint.py),
or with `export hf` to a Hugging Face model directory (runtime/cli/hf.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from lmspec.runtime.cli.verb import Output, Verb
from lmspec.runtime.errors import UsageError


def export_options(p) -> None:
    """`lmspec export`'s options."""
    p.add_argument("checkpoint", help="a run directory or a checkpoint directory (or `hf` then one)")
    p.add_argument("hf_checkpoint", nargs="?", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    p.add_argument("-o", "--out", required=True,
                   help="the .onnx file to write (its <name>.lmspec.json goes beside it), or a directory; "
                        "for `export hf`, the model directory to create")
    p.add_argument("--output", dest="out", help=argparse.SUPPRESS)  # its name before every verb said --out
    p.add_argument("--model-type", help="export hf: the Hugging Face model_type to write (default: the imported "
                                        "model's, else inferred from the parameter names)")
    p.add_argument("--map", metavar="MAP.toml", help="export hf: the family's map (default: the one the checkpoint "
                                                      "was imported by, else the shipped map that fits)")
    p.add_argument("--opset", type=int, help="ONNX opset, 18 to 23 (default: 20)")
    p.add_argument("--optimize", action="store_true",
                   help="apply onnxruntime's graph optimisations and transformer fusions")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="int8: dynamic quantisation of the MatMul weights; int4: block-wise weight-only 4-bit "
                        "weights (onnxruntime's MatMulNBits, blocks of 32), what laptops run (both CPU)")
    p.add_argument("--fp16", action="store_true", help="convert to float16 (for GPU execution providers)")
    p.add_argument("--fused-attention", action="store_true",
                   help="attention as onnxruntime's fused GroupQueryAttention kernel over a KV cache that is one "
                        "buffer per layer, updated in place (onnxruntime-genai's layout): faster decoding, and "
                        "rows of different lengths batch without padding (what `lmspec serve` wants)")


def cmd_export(args) -> int:
    from lmspec.runtime.export.from_checkpoint import export_bundle
    if getattr(args, "hf_checkpoint", None) is not None:  # lmspec export hf CHECKPOINT -o DIR
        if args.checkpoint != "hf":
            raise UsageError(f"unexpected argument {args.hf_checkpoint!r} (did you mean `lmspec export hf "
                             f"{args.hf_checkpoint}`?)")
        onnx_only = [flag for flag, used in (("--opset", args.opset is not None), ("--optimize", args.optimize),
                                             ("--quantize", args.quantize), ("--fp16", args.fp16),
                                             ("--fused-attention", args.fused_attention)) if used]
        if onnx_only:
            raise UsageError(f"{', '.join(onnx_only)}: only for ONNX export, not `export hf`")
        from lmspec.runtime.cli.hf import cmd_export_hf
        args.checkpoint, args.verb_name = args.hf_checkpoint, "export hf"  # errors then read `lmspec export hf: ...`
        return cmd_export_hf(args)
    if args.checkpoint == "hf" and not Path("hf").exists():
        raise UsageError("export hf: name the checkpoint: lmspec export hf CHECKPOINT -o DIR")
    for flag, used in (("--model-type", getattr(args, "model_type", None)), ("--map", getattr(args, "map", None))):
        if used:
            raise UsageError(f"{flag} is only for `lmspec export hf`")

    meta = export_bundle(args.checkpoint, args.out, opset=args.opset, optimize=args.optimize,
                         quantize=args.quantize, fp16=args.fp16, fused_attention=args.fused_attention)
    return 0 if meta else 1


def _onnx_file(args) -> str | None:
    from lmspec.runtime.export.from_checkpoint import output_path
    return None if args.hf_checkpoint is not None else str(output_path(args.out))


def _hf_directory(args) -> str | None:
    return args.out if args.hf_checkpoint is not None else None


EXPORT = Verb(
    "export",
    ("Export a checkpoint to ONNX with a KV cache, checked against PyTorch; `export hf CHECKPOINT -o DIR` "
     "writes a Hugging Face model directory instead."),
    export_options, cmd_export,
    outputs=(Output(_onnx_file, directory=False), Output(_hf_directory, directory=True)),
    examples="""examples:
  lmspec export runs/tiny -o exported/tiny.onnx
  lmspec export runs/gpt2 -o exported/gpt2-int8.onnx --optimize --quantize int8
  lmspec export runs/gpt2 -o exported/gpt2-int4.onnx --quantize int4      # 4-bit weight blocks, for laptops
  lmspec export runs/gpt2 -o exported/gpt2-serve.onnx --fused-attention   # for lmspec serve
  lmspec export hf runs/qwen3 -o hf/qwen3       # a Hugging Face model directory (config.json, model.safetensors)""",
)
