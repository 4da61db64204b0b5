"""`lmspec finetune classify` and `lmspec classify`: a checkpoint finetuned into a text classifier
(compiler/classify_head.py's rewrite, recorded in the new checkpoint), and its predictions."""
from __future__ import annotations

import sys
from pathlib import Path

from lmspec.runtime.cli.options import add_lora_options, add_optimizer_options, add_provider_option
from lmspec.runtime.cli.verb import Verb
from lmspec.runtime.distributed.device import add_device_option
from lmspec.runtime.errors import CheckpointError, UsageError


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
    p.add_argument("--limit", type=int, help="use only N examples (after balancing and a shuffle): a quick run")
    p.add_argument("--trainable-blocks", type=int, metavar="N", help="train only the last N blocks, the final "
                   "norm and the head (default: every weight; with --lora: the adapters and the head)")
    p.add_argument("--max-length", type=int, help="tokens per text, the first ones (default: the context)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training split (default: 5)")
    add_optimizer_options(p, lr=3e-4, warmup=20)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--seed", type=int, default=123, help="balancing, split, head initialisation and batch order "
                   "(default: 123, the book's)")
    add_device_option(p)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_options(p)


def cmd_finetune_classify(args) -> int:
    import torch

    from lmspec.runtime.checkpoint.store import find_checkpoint, save_checkpoint
    from lmspec.runtime.data.corpus import DataError
    from lmspec.runtime.data.text_encoder import TextEncoder
    from lmspec.runtime.data.tokenizer import load_tokenizer
    from lmspec.runtime.distributed.device import resolve_device
    from lmspec.runtime.finetune.classify_data import finetuning_splits, parse_labels, parse_split, read_examples
    from lmspec.runtime.finetune.classify_train import (
        Encoded, format_confusion, score_split, train_classifier, write_confusion
    )
    from lmspec.runtime.finetune.instruct_data import pad_id_for
    from lmspec.runtime.finetune.lora import trainable_weights
    from lmspec.runtime.finetune.steps import steps_per_epoch
    from lmspec.runtime.train.config import TrainConfig

    device = resolve_device(args.device)  # first: a device that is not there costs no data read, no load
    labels = parse_labels(args.labels)
    fractions = parse_split(args.split)
    if args.epochs < 1 or args.batch < 1:
        raise UsageError("--epochs and --batch must be at least 1")
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length must be at least 1, got {args.max_length}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if find_checkpoint(args.out) is not None:
        raise CheckpointError(f"{args.out} already holds a run; choose another --out")
    examples = read_examples(args.data, labels, args.text_field, args.label_field)
    absent = [name for name, n in zip(labels, _counts(examples, labels)) if n == 0]
    if absent:
        raise DataError(f"{args.data}: no example of {', '.join(absent)}")
    parts = finetuning_splits(examples, fractions, args.seed, args.balance, args.limit)
    examples = [e for part in parts.values() for e in part]
    from lmspec.runtime.finetune.classifier import classifier_to_train
    model, graph, base, spec, adapters_only = classifier_to_train(args, labels, device)
    tokenizer = load_tokenizer(base.checkpoint.tokenizer)
    context = int(model.context)
    encoder = TextEncoder(tokenizer, min(args.max_length or context, context), pad_id_for(tokenizer))
    encoded = {name: Encoded([encoder.encode(e.text) for e in part], [e.label for e in part])
               for name, part in parts.items()}
    steps = args.epochs * steps_per_epoch(len(encoded["train"]), args.batch)
    cfg = TrainConfig(steps=steps, batch=args.batch, lr=args.lr, min_lr=args.min_lr, warmup=min(args.warmup, steps),
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                      precision=args.precision, keep=1).resolved(context)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{len(examples)} examples ({', '.join(f'{n} {name}' for name, n in zip(labels, _counts(examples, labels)))}"
          f"{', balanced' if args.balance else ''}): {len(parts['train'])} train, {len(parts['validation'])} "
          f"validation, {len(parts['test'])} test; at most {encoder.max_length} tokens"
          + (f", {encoder.replaced} characters the vocabulary lacks replaced" if encoder.replaced else ""))
    print(f"{trainable:,} of {total:,} parameters train ({trainable / total:.2%}"
          f"{', LoRA' if adapters_only else ''}); {args.epochs} epochs, {steps} steps")
    run_dir = Path(args.out)
    history = train_classifier(model, encoded["train"], encoded["validation"], cfg, args.epochs, encoder.pad_id,
                               run_dir, progress=not args.no_progress)
    splits = {name: score_split(model, part, len(labels), args.batch, encoder.pad_id)
              for name, part in encoded.items()}
    confusion = write_confusion(run_dir, labels, splits)
    train_config = cfg.to_dict() | {"epochs": args.epochs, "max_length": encoder.max_length,
                                    "labels": labels, "data": str(Path(args.data).resolve()),
                                    "split": list(fractions), "balance": args.balance, "limit": args.limit,
                                    "trainable_blocks": args.trainable_blocks, "base": str(base.checkpoint.path)}
    metrics = {f"{name}_accuracy": s["accuracy"] for name, s in splits.items()} | {"loss": history[-1]["loss"]}
    checkpoint = save_checkpoint(run_dir, step=steps, model=None if adapters_only else model, optimizer=None,
                                 rng=None, train_config=train_config, metrics=metrics,
                                 tokenizer=base.checkpoint.tokenizer, spec=spec, keep=1,
                                 weights=trainable_weights(model) if adapters_only else None)
    for name, s in splits.items():
        if s["count"]:
            print(f"{name} accuracy: {s['accuracy']:.2%} ({s['count']} texts)")
    shown = "test" if splits["test"]["count"] else "validation"
    print(f"confusion matrix ({shown}):\n{format_confusion(splits[shown]['matrix'], labels)}")
    print(f"checkpoint {checkpoint}\nconfusion matrices {confusion}")
    return 0


FINETUNE_CLASSIFY = Verb(
    "finetune classify",
    "Finetune a checkpoint into a classifier: a new head on the last token.",
    finetune_classify_options, cmd_finetune_classify,
    examples="""examples:
  lmspec finetune classify runs/shakespeare --data ../shared/data/SMSSpamCollection.tsv --labels ham,spam --balance
  lmspec finetune classify runs/gpt2 --data reviews.jsonl --labels neg,pos --trainable-blocks 2 --lora 8""",
)


def _counts(examples, labels) -> list[int]:
    return [sum(e.label == i for e in examples) for i in range(len(labels))]


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
