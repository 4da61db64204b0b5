"""Command-line options of classification (`finetune classify` and `classify`), and `classify`'s
handler: an exported bundle runs in onnxruntime with no torch imported, a checkpoint in PyTorch."""
from __future__ import annotations

import sys

from lmspec.runtime.cli.lora_options import add_lora_options, add_optimizer_options
from lmspec.runtime.distributed.device import add_device_option
from lmspec.runtime.cli.options import add_provider_option
from lmspec.runtime.errors import UsageError


def add_classify_verbs(verb, finetune_group, top, override_options) -> None:
    c = verb("classify", "Finetune a checkpoint into a classifier: a new head on the last token.",
             "cli.classify:cmd_finetune_classify", finetune_group, "finetune ", examples="""examples:
  lmspec finetune classify runs/shakespeare --data ../shared/data/SMSSpamCollection.tsv --labels ham,spam --balance
  lmspec finetune classify runs/gpt2 --data reviews.jsonl --labels neg,pos --trainable-blocks 2 --lora 8""")
    c.add_argument("checkpoint", help="the pretrained run or checkpoint to start from")
    c.add_argument("--data", required=True, help="labelled texts: .tsv/.csv (label, text) or .jsonl")
    c.add_argument("--labels", required=True, help="the class names, comma-separated, in class-index order")
    c.add_argument("--out", required=True, help="the run directory for the classifier")
    c.add_argument("--text-field", default="text", help="the text's field in .jsonl, or column in a .csv/.tsv "
                   "with a header row (default: text)")
    c.add_argument("--label-field", default="label", help="the label's field or header column (default: label)")
    c.add_argument("--balance", action="store_true", help="undersample every class to the smallest one's size")
    c.add_argument("--split", default="0.7,0.1,0.2", help="train,validation,test fractions after a seeded "
                   "shuffle (default: 0.7,0.1,0.2)")
    c.add_argument("--limit", type=int, help="use only N examples (after balancing and a shuffle): a quick run")
    c.add_argument("--trainable-blocks", type=int, metavar="N", help="train only the last N blocks, the final "
                   "norm and the head (default: every weight; with --lora: the adapters and the head)")
    c.add_argument("--max-length", type=int, help="tokens per text, the first ones (default: the context)")
    c.add_argument("--epochs", type=int, default=5, help="passes over the training split (default: 5)")
    add_optimizer_options(c, lr=3e-4, warmup=20)
    c.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    c.add_argument("--seed", type=int, default=123, help="balancing, split, head initialisation and batch order "
                   "(default: 123, the book's)")
    add_device_option(c)
    c.add_argument("--threads", type=int, help="torch CPU threads")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_options(c)

    p = verb("classify", "Predict the class of texts with a classifier checkpoint, or its ONNX export "
             "(onnxruntime only).", "cli.classify_options:cmd_classify", top, examples="""examples:
  lmspec classify runs/spam "You won a free cruise, call now" "see you at 6?"
  lmspec classify runs/spam --device cuda "see you at 6?"
  lmspec export runs/spam -o exported/spam.onnx && lmspec classify exported/spam.onnx "see you at 6?"
  lmspec classify exported/spam.onnx --provider cuda "see you at 6?"   # needs onnxruntime-gpu
""")
    p.add_argument("checkpoint", metavar="MODEL", help="a classifier run or checkpoint (from `lmspec finetune "
                   "classify`), or its export (a .onnx file or a directory holding one, from `lmspec export`)")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    add_device_option(p)
    add_provider_option(p)


def print_predictions(labels: list[str], texts: list[str], probs) -> None:
    """One line per text: its most probable class, that probability and the text (probs: numpy or torch rows)."""
    width = max(len(n) for n in labels)
    for text, p in zip(texts, probs):
        best = int(p.argmax())
        print(f"{labels[best]:<{width}}  {float(p[best]):.3f}  {text}")


def check_placement(args, bundle: bool) -> None:
    """A UsageError for --device on a bundle or --provider on a checkpoint, each of which the other
    path would quietly ignore; the defaults (and --device cpu on a bundle run on the CPU) pass."""
    device = (args.device or "auto").strip().lower()
    if bundle and device != "auto" and not (device == "cpu" and args.provider == "cpu"):
        raise UsageError(f"--device {device}: places a checkpoint run in PyTorch; an exported model runs in "
                         f"onnxruntime, placed by --provider (cpu, or cuda for the GPU)")
    if not bundle and args.provider != "cpu":
        raise UsageError(f"--provider {args.provider}: places an exported model (.onnx) in onnxruntime; "
                         f"{args.checkpoint} is a checkpoint, run in PyTorch: use --device cuda")


def cmd_classify(args) -> int:
    """An exported bundle (a .onnx file or its directory) runs here; a checkpoint in PyTorch."""
    from lmspec.runtime.export.bundle import is_bundle_path  # numpy and the tokenizers: only when it runs
    bundle = is_bundle_path(args.checkpoint)
    check_placement(args, bundle)
    if not bundle:
        from lmspec.runtime.cli.classify import classify_checkpoint  # torch, only on this path
        labels, probs = classify_checkpoint(args)
        print_predictions(labels, args.texts, probs)
        return 0
    from lmspec.runtime.data.tokenizer import TokenizerError
    from lmspec.runtime.export.bundle import BundleError, session_providers
    from lmspec.runtime.serve.classifier import OnnxClassifier
    providers = session_providers(args.provider)  # a provider this onnxruntime lacks: said before any loading
    try:
        classifier = OnnxClassifier(args.checkpoint, providers=providers)
        probs = classifier.probabilities(args.texts)
    except (BundleError, TokenizerError) as err:
        print(f"lmspec classify: error: {err}", file=sys.stderr)
        return 1
    print_predictions(classifier.labels, args.texts, probs)
    return 0
