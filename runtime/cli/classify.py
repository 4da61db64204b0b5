"""`lmspec finetune classify` and `lmspec classify`: a checkpoint finetuned into a text classifier
(compiler/classify_head.py's rewrite, recorded in the new checkpoint), and its predictions."""
from __future__ import annotations


from lmspec.runtime.cli.numbers import AT_LEAST_1, SEED, THREADS
from lmspec.runtime.cli.options import (
    add_log_option, add_lora_options, add_optimizer_options, add_provider_option, check_log_option
)
from lmspec.runtime.cli.verb import Verb, option_output
from lmspec.runtime.distributed.device import add_device_option
from lmspec.runtime.errors import UsageError


def finetune_classify_options(p) -> None:
    """`lmspec finetune classify`'s options."""
    p.add_argument("checkpoint", help="the pretrained run or checkpoint to start from")
    p.add_argument("--data", required=True, help="labelled texts: .tsv/.csv (label, text) or .jsonl")
    p.add_argument("--labels", required=True, help="the class names, comma-separated, in class-index order")
    p.add_argument("-o", "--out", required=True, help="the run directory for the classifier")
    p.add_argument("--text-field", default="text", help="the text's field in .jsonl, or column in a .csv/.tsv "
                   "with a header row (default: text)")
    p.add_argument("--label-field", default="label", help="the label's field or header column (default: label)")
    p.add_argument("--balance", action="store_true", help="undersample every class to the smallest one's size")
    p.add_argument("--split", default="0.7,0.1,0.2", help="train,validation,test fractions after a seeded "
                   "shuffle (default: 0.7,0.1,0.2)")
    p.add_argument("--limit", type=AT_LEAST_1, help="use only N examples (after balancing and a shuffle): a quick run")
    p.add_argument("--trainable-blocks", type=AT_LEAST_1, metavar="N", help="train only the last N blocks, the final "
                   "norm and the head (default: every weight; with --lora: the adapters and the head)")
    p.add_argument("--max-length", type=AT_LEAST_1, help="tokens per text, the first ones (default: the context)")
    p.add_argument("--epochs", type=AT_LEAST_1, default=5, help="passes over the training split (default: 5)")
    add_optimizer_options(p, lr=3e-4, warmup=20)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--seed", type=SEED, default=123, help="balancing, split, head initialisation and batch order "
                   "(default: 123, the book's)")
    add_device_option(p)
    p.add_argument("--threads", type=THREADS, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_log_option(p)
    add_lora_options(p)


def cmd_finetune_classify(args) -> int:
    import torch

    from lmspec.runtime.distributed.device import resolve_device
    from lmspec.runtime.finetune.classify_data import parse_labels, parse_split
    from lmspec.runtime.finetune.classify_train import format_confusion
    from lmspec.runtime.finetune.runs import classify_run

    device = resolve_device(args.device)  # first: a device that is not there costs no data read, no load
    check_log_option(args)
    labels, fractions = parse_labels(args.labels), parse_split(args.split)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = classify_run(args, labels, fractions, device, say=print)
    splits = result["splits"]
    for name, s in splits.items():
        if s["count"]:
            print(f"{name} accuracy: {s['accuracy']:.2%} ({s['count']} texts)")
    shown = "test" if splits["test"]["count"] else "validation"
    print(f"confusion matrix ({shown}):\n{format_confusion(splits[shown]['matrix'], labels)}")
    print(f"checkpoint {result['checkpoint']}\nconfusion matrices {result['confusion']}")
    return 0

FINETUNE_CLASSIFY = Verb(
    "finetune classify",
    "Finetune a checkpoint into a classifier: a new head on the last token.",
    finetune_classify_options, cmd_finetune_classify, outputs=(option_output("out", directory=True, run=True),),
    config_file=True,
    examples="""examples:
  lmspec finetune classify runs/shakespeare --data ../shared/data/SMSSpamCollection.tsv --labels ham,spam --balance
  lmspec finetune classify runs/gpt2 --data reviews.jsonl --labels neg,pos --trainable-blocks 2 --lora 8""",
)


def classify_checkpoint(args) -> tuple[list[str], object]:
    """`lmspec classify CHECKPOINT TEXT...` in PyTorch (classify_options.cmd_classify sends checkpoints
    here): the class names and each text's probabilities."""
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.distributed.device import resolve_device
    from lmspec.runtime.finetune.classifier import classifier_inputs
    from lmspec.runtime.finetune.classify_train import predict

    device = resolve_device(args.device)  # a GPU that is not there: said before the checkpoint is read
    loaded = load_model(args.checkpoint, device)
    labels, encoder = classifier_inputs(loaded)
    return labels, predict(loaded.model, [encoder.encode(t) for t in args.texts], 32, encoder.pad_id)


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


def classify_options(p) -> None:
    """`lmspec classify`'s options."""
    p.add_argument("checkpoint", metavar="MODEL", help="a classifier run or checkpoint (from `lmspec finetune "
                   "classify`), or its export (a .onnx file or a directory holding one, from `lmspec export`)")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    add_device_option(p)
    add_provider_option(p)


def cmd_classify(args) -> int:
    """An exported bundle (a .onnx file or its directory) runs here; a checkpoint in PyTorch."""
    from lmspec.runtime.export.bundle import is_bundle_path  # the tokenizers: only when it runs
    bundle = is_bundle_path(args.checkpoint)
    check_placement(args, bundle)
    if not bundle:
        labels, probs = classify_checkpoint(args)
        print_predictions(labels, args.texts, probs)
        return 0
    from lmspec.runtime.export.bundle import session_providers
    from lmspec.runtime.serve.classifier import OnnxClassifier
    providers = session_providers(args.provider)  # a provider this onnxruntime lacks: said before any loading
    classifier = OnnxClassifier(args.checkpoint, providers=providers)
    probs = classifier.probabilities(args.texts)
    print_predictions(classifier.labels, args.texts, probs)
    return 0


CLASSIFY = Verb(
    "classify",
    "Predict the class of texts with a classifier checkpoint, or its ONNX export (onnxruntime only).",
    classify_options, cmd_classify,
    examples="""examples:
  lmspec classify runs/spam "You won a free cruise, call now" "see you at 6?"
  lmspec classify runs/spam --device cuda "see you at 6?"
  lmspec export runs/spam -o exported/spam.onnx && lmspec classify exported/spam.onnx "see you at 6?"
  lmspec classify exported/spam.onnx --provider cuda "see you at 6?"   # needs onnxruntime-gpu
""",
)
