"""`lmspec export`: a checkpoint to an ONNX bundle (the steps are runtime/export/from_checkpoint.py),
with `export hf` to a Hugging Face model directory (runtime/cli/hf.py), with `export gguf` to one
GGUF file for llama.cpp (runtime/export/gguf_file.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from lmspec.runtime.cli.verb import Output, Verb
from lmspec.runtime.errors import UsageError
from lmspec.runtime.export.gguf_file import GGUF_TYPES

FORMATS = ("hf", "gguf")  # `lmspec export FORMAT CHECKPOINT`; without one, ONNX


def export_options(p) -> None:
    """`lmspec export`'s options."""
    p.add_argument("checkpoint", help="a run directory or a checkpoint directory (or `hf` or `gguf` then one)")
    p.add_argument("format_checkpoint", nargs="?", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    p.add_argument("-o", "--out", required=True,
                   help="the .onnx file to write (its <name>.lmspec.json goes beside it), or a directory; "
                        "for `export hf`, the model directory to create; for `export gguf`, the .gguf file "
                        "(or a directory, for DIR/model.gguf)")
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
    p.add_argument("--eval-data", metavar="FILE",
                   help="with --quantize: held-out text (any format `train --data` reads) for the loss each of "
                        "fp32, int8 and int4 gets in export's report (default: the validation split of the "
                        "checkpoint's run, when its config.toml names the data)")
    p.add_argument("--no-report", action="store_true",
                   help="with --quantize: skip the report (sizes, held-out loss and decode speed of fp32, int8 "
                        "and int4, each built and run)")
    p.add_argument("--fp16", action="store_true", help="convert to float16 (for GPU execution providers)")
    p.add_argument("--fused-attention", action="store_true",
                   help="attention as onnxruntime's fused GroupQueryAttention kernel over a KV cache that is one "
                        "buffer per layer, updated in place (onnxruntime-genai's layout): faster decoding, and "
                        "rows of different lengths batch without padding (what `lmspec serve` wants)")
    p.add_argument("--type", choices=GGUF_TYPES,
                   help="export gguf: the weights' type: f16 (the default), q8_0 (llama.cpp's 8-bit blocks of "
                        "32, half the size) or f32; norms and vectors stay f32, as llama.cpp's converter does")


def cmd_export(args) -> int:
    from lmspec.runtime.export.from_checkpoint import export_bundle
    fmt = _format(args)
    onnx_only = [flag for flag, used in (("--opset", args.opset is not None), ("--optimize", args.optimize),
                                         ("--quantize", args.quantize), ("--fp16", args.fp16),
                                         ("--fused-attention", args.fused_attention),
                                         ("--eval-data", args.eval_data), ("--no-report", args.no_report)) if used]
    only_for = {"--model-type": ("hf", getattr(args, "model_type", None)), "--map": ("hf", getattr(args, "map", None)),
                "--type": ("gguf", args.type)}
    for flag, (owner, used) in only_for.items():
        if used and fmt != owner:
            raise UsageError(f"{flag} is only for `lmspec export {owner}`")
    if fmt is not None:
        if onnx_only:
            raise UsageError(f"{', '.join(onnx_only)}: only for ONNX export, not `export {fmt}`")
        args.checkpoint, args.verb_name = args.format_checkpoint, f"export {fmt}"  # errors read `lmspec export hf: ...`
        if fmt == "hf":
            from lmspec.runtime.cli.hf import cmd_export_hf
            return cmd_export_hf(args)
        from lmspec.runtime.export.gguf_file import export_gguf
        export_gguf(args.checkpoint, args.out, args.type or "f16")
        return 0

    measure = None
    if args.eval_data is not None and (args.quantize is None or args.no_report):
        raise UsageError("--eval-data: held-out text for the report on what --quantize costs, "
                         + ("which --no-report skips" if args.quantize else "and no --quantize was given"))
    if args.quantize and not args.no_report and not args.fp16:
        from lmspec.runtime.serve.quantized_report import report_on_quantizing
        measure = report_on_quantizing(args.checkpoint, args.eval_data, args.quantize)
    meta = export_bundle(args.checkpoint, args.out, opset=args.opset, optimize=args.optimize,
                         quantize=args.quantize, fp16=args.fp16, fused_attention=args.fused_attention,
                         measure=measure)
    return 0 if meta else 1


def _format(args) -> str | None:
    """"hf" or "gguf" for `lmspec export FORMAT CHECKPOINT`, None for ONNX."""
    if args.format_checkpoint is not None:
        if args.checkpoint not in FORMATS:
            raise UsageError(f"unexpected argument {args.format_checkpoint!r} (did you mean `lmspec export hf "
                             f"{args.format_checkpoint}` or `lmspec export gguf {args.format_checkpoint}`?)")
        return args.checkpoint
    if args.checkpoint in FORMATS and not Path(args.checkpoint).exists():
        raise UsageError(f"export {args.checkpoint}: name the checkpoint: lmspec export {args.checkpoint} "
                         f"CHECKPOINT -o {'DIR' if args.checkpoint == 'hf' else 'model.gguf'}")
    return None


def _onnx_file(args) -> str | None:
    from lmspec.runtime.export.from_checkpoint import output_path
    return None if args.format_checkpoint is not None else str(output_path(args.out))


def _hf_directory(args) -> str | None:
    return args.out if args.format_checkpoint is not None and args.checkpoint == "hf" else None


def _gguf_file(args) -> str | None:
    from lmspec.runtime.export.gguf_file import gguf_output_path
    return str(gguf_output_path(args.out)) if args.format_checkpoint is not None and args.checkpoint == "gguf" else None


EXPORT = Verb(
    "export",
    ("Export a checkpoint to ONNX with a KV cache, checked against PyTorch; `export hf CHECKPOINT -o DIR` "
     "writes a Hugging Face model directory instead, `export gguf CHECKPOINT -o FILE.gguf` a GGUF file for "
     "llama.cpp and Ollama."),
    export_options, cmd_export,
    outputs=(Output(_onnx_file, directory=False), Output(_hf_directory, directory=True),
             Output(_gguf_file, directory=False)),
    examples="""examples:
  lmspec export runs/tiny -o exported/tiny.onnx
  lmspec export runs/gpt2 -o exported/gpt2-int8.onnx --optimize --quantize int8
  lmspec export runs/gpt2 -o exported/gpt2-int4.onnx --quantize int4      # 4-bit weight blocks, for laptops
  lmspec export runs/gpt2 -o exported/gpt2-int4/ --quantize int4 --eval-data ../shared/data/tinyshakespeare.txt
  lmspec export runs/gpt2 -o exported/gpt2-serve.onnx --fused-attention   # for lmspec serve
  lmspec export hf runs/qwen3 -o hf/qwen3       # a Hugging Face model directory (config.json, model.safetensors)
  lmspec export gguf runs/qwen3 -o qwen3.gguf   # llama.cpp, Ollama: f16 weights
  lmspec export gguf runs/llama -o llama-q8.gguf --type q8_0""",
)
