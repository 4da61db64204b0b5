"""`lmspec eval CHECKPOINT`: parse, score the checkpoint the way its kind is used
(runtime/finetune/evaluation.py) or on multiple-choice items (runtime/train/multiple_choice.py),
print or write the result.
"""
from __future__ import annotations

import json
from pathlib import Path

from lmspec.runtime.cli.numbers import AT_LEAST_1, THREADS
from lmspec.runtime.cli.options import SPLITS
from lmspec.runtime.cli.verb import Verb, option_output
from lmspec.runtime.distributed.device import add_device_option, resolve_device
from lmspec.runtime.errors import UsageError


def eval_options(p) -> None:
    """`lmspec eval`'s options."""
    p.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    p.add_argument("--data", help="a language model: a text file, a directory of .txt files or a shards directory; "
                   "a classifier: labelled .tsv/.csv/.jsonl; instruction-tuned: JSON/JSONL records "
                   "(default for the last two: the data it was finetuned on)")
    p.add_argument("--split", choices=SPLITS,
                   help="the part to score: train/validation as `train` or finetuning cut it, test as finetuning "
                        "cut it (default: test on a finetuned checkpoint's own data, else all)")
    p.add_argument("--seq", type=AT_LEAST_1, help="tokens per window for a language model (default: the context)")
    p.add_argument("--max-tokens", type=AT_LEAST_1, metavar="N", help="score only the first N tokens (language model)")
    p.add_argument("--batch", type=AT_LEAST_1, default=8, help="windows, texts or records per forward pass (default: 8)")
    p.add_argument("--text-field", default="text", help="a classifier's text field or header column (default: text)")
    p.add_argument("--label-field", default="label", help="its label field or header column (default: label)")
    p.add_argument("--responses", metavar="FILE", help="instruction-tuned: write greedy answers to the scored "
                   "records as JSONL (each record plus \"model_response\")")
    p.add_argument("--response-tokens", type=AT_LEAST_1, default=256, help="the longest answer (default: 256)")
    p.add_argument("--multiple-choice", metavar="FILE",
                   help="a language model: multiple-choice accuracy on JSONL items {\"context\": str, \"choices\": "
                        "[str, ...], \"answer\": int}, each choice scored by its log-probability after the context "
                        "as lm-evaluation-harness scores it (acc, acc_norm, acc_bytes)")
    p.add_argument("-o", "--out", metavar="FILE", help="also write the result as a JSON file")
    p.add_argument("--format", choices=["human", "json"], default="human",
                   help="json: print one JSON object (for CI)")
    add_device_option(p)
    p.add_argument("--threads", type=THREADS, help="torch CPU threads")


def cmd_eval(args) -> int:
    import torch

    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.finetune import evaluation

    device = resolve_device(args.device)  # first: a device that is not there costs no load
    if args.threads:
        torch.set_num_threads(args.threads)
    items = None
    if args.multiple_choice:
        from lmspec.runtime.train.multiple_choice import read_items

        given = [f"--{n.replace('_', '-')}" for n in ("data", "split", "seq", "max_tokens", "responses")
                 if getattr(args, n)]
        if given:
            raise UsageError(f"--multiple-choice scores its own items; drop {', '.join(given)}")
        items = read_items(args.multiple_choice)  # first: a bad file costs no load
    loaded = load_model(args.checkpoint, device)
    kind = evaluation.checkpoint_kind(loaded)
    if items is not None:
        from lmspec.runtime.train.multiple_choice import evaluate as multiple_choice

        if kind == "classifier":
            raise UsageError("--multiple-choice needs a language model; this checkpoint is a classifier")
        result = {"checkpoint": str(loaded.checkpoint.path), "kind": kind, "task": "multiple-choice"} | \
            multiple_choice(loaded, items, args.batch, args.multiple_choice)
        return _report(result, args)
    if kind != "language-model" and (args.seq or args.max_tokens):
        raise UsageError("--seq and --max-tokens are for a language model; this checkpoint is "
                         + ("a classifier" if kind == "classifier" else "instruction-tuned"))
    if kind != "instruct" and args.responses:
        raise UsageError("--responses needs an instruction-tuned checkpoint (lmspec finetune instruct)")
    evaluate = evaluation.SCORERS[kind]
    result = {"checkpoint": str(loaded.checkpoint.path), "kind": kind} | evaluate(loaded, args)
    return _report(result, args)


def _report(result: dict, args) -> int:
    """Write the result to --out if asked, print it as --format says."""
    if args.out:
        from lmspec.runtime.atomic import write_text_atomically
        write_text_atomically(Path(args.out), json.dumps(result, indent=2) + "\n")
    if args.format == "json":
        print(json.dumps(result))
    else:
        print(_human(result))
    return 0


EVAL = Verb(
    "eval",
    ("Measure a checkpoint: a language model's perplexity on text or shards, a classifier's accuracy on "
     "labelled texts, an instruction-tuned model's answer loss (and its answers), a language model's "
     "multiple-choice accuracy as lm-evaluation-harness computes it."),
    eval_options, cmd_eval,
    outputs=(option_output("out", directory=False), option_output("responses", directory=False)),
    examples="""examples:
  lmspec eval runs/tiny --data ../shared/data/the-verdict.txt             # perplexity, windows of the context
  lmspec eval runs/gpt2 --data shards/ --split validation --seq 512 --max-tokens 1000000 --format json
  lmspec eval runs/spam                      # the test split it was finetuned with: accuracy, confusion matrix
  lmspec eval runs/spam --data new-sms.tsv --out spam-eval.json
  lmspec eval runs/gpt2-instruct --responses answers.jsonl      # test answers, for judging
  lmspec eval runs/gpt2 --multiple-choice items.jsonl --format json   # acc, acc_norm as lm-eval's""",
)








# -------------------------------------------------------------------------------------------- output


def _human(result: dict) -> str:
    if result.get("task") == "multiple-choice":
        return _multiple_choice_table(result)
    where = f"{result['checkpoint']} on {result['data']} ({result['split']})"
    if result["kind"] == "language-model":
        return (f"{where}: {result['tokens']:,} tokens in {result['windows']:,} windows of {result['seq']}\n"
                f"cross-entropy {result['cross_entropy']:.4f} nats/token, perplexity {result['perplexity']:.3f}")
    if result["kind"] == "classifier":
        from lmspec.runtime.finetune.classify_train import format_confusion
        return (f"{where}: accuracy {result['accuracy']:.2%} ({result['count']} texts)\n"
                f"confusion matrix:\n{format_confusion(result['matrix'], result['labels'])}")
    lines = [f"{where}: {result['records']} records, {result['scored']} scored"]
    if result["loss"] is not None:
        lines.append(f"masked loss {result['loss']:.4f} over {result['answer_tokens']:,} answer tokens")
    if "responses" in result:
        lines.append(f"answers to the {result['records']} records: {result['responses']}")
    return "\n".join(lines)


def _multiple_choice_table(result: dict) -> str:
    n = result["items"]
    lines = [f"{result['checkpoint']} on {result['data']}: {n} multiple-choice items, {result['choices']} choices",
             f"{'metric':<10} {'value':>7}  correct"]
    for metric, note in (("acc", "summed log-probability"), ("acc_norm", "per character of the choice"),
                         ("acc_bytes", "per UTF-8 byte of the choice")):
        lines.append(f"{metric:<10} {result[metric]:>7.4f}  {round(result[metric] * n)}/{n}  ({note})")
    if result["truncated"]:
        lines.append(f"{result['truncated']} of {result['choices']} choices had their context cut on the left to "
                     f"fit the model's context of {result['context']} tokens")
    return "\n".join(lines)
