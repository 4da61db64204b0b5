"""`lmspec eval CHECKPOINT`: how good a checkpoint is, measured the way its kind is used.

- a language model: cross-entropy and perplexity over non-overlapping windows of a text or of token
  shards (runtime/train/perplexity.py);
- a classifier (`finetune classify`): accuracy and the confusion matrix on labelled texts;
- an instruction-tuned model (`finetune instruct`): the masked loss on the answers and, with
  --responses, its greedy answers written for judging.

A finetuned checkpoint records its data, split fractions, seed, balancing and limit, so by default
it is scored on the test split cut exactly as finetuning cut it; a file finetuning never saw is
scored whole (`--split` chooses otherwise).
"""
from __future__ import annotations

import json
from pathlib import Path

from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.distributed.device import resolve_device
from lmspec.runtime.errors import UsageError
from lmspec.runtime.cli.verb import Verb
from lmspec.runtime.cli.options import SPLITS
from lmspec.runtime.distributed.device import add_device_option
from lmspec.runtime.errors import CheckpointError


def checkpoint_kind(loaded) -> str:
    """"classifier", "instruct" or "language-model"; a CheckpointError for a model that is none."""
    from lmspec.runtime.finetune.classifier import classify_record

    if classify_record(loaded.checkpoint) is not None:
        return "classifier"
    if loaded.checkpoint.train_config.get("finetune") == "instruct":
        return "instruct"
    _, logits = loaded.graph.outputs[0]
    if len(logits.shape) != 3:
        raise CheckpointError(f"{loaded.checkpoint.path}: its output {list(logits.shape)} is not "
                              f"[batch, seq, vocab] logits, and it is not a finetuned classifier")
    return "language-model"


def eval_options(p) -> None:
    """`lmspec eval`'s options."""
    p.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    p.add_argument("--data", help="a language model: a text file, a directory of .txt files or a shards directory; "
                   "a classifier: labelled .tsv/.csv/.jsonl; instruction-tuned: JSON/JSONL records "
                   "(default for the last two: the data it was finetuned on)")
    p.add_argument("--split", choices=SPLITS,
                   help="the part to score: train/validation as `train` or finetuning cut it, test as finetuning "
                        "cut it (default: test on a finetuned checkpoint's own data, else all)")
    p.add_argument("--seq", type=int, help="tokens per window for a language model (default: the context)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens (language model)")
    p.add_argument("--batch", type=int, default=8, help="windows, texts or records per forward pass (default: 8)")
    p.add_argument("--text-field", default="text", help="a classifier's text field or header column (default: text)")
    p.add_argument("--label-field", default="label", help="its label field or header column (default: label)")
    p.add_argument("--responses", metavar="FILE", help="instruction-tuned: write greedy answers to the scored "
                   "records as JSONL (each record plus \"model_response\")")
    p.add_argument("--response-tokens", type=int, default=256, help="the longest answer (default: 256)")
    p.add_argument("--out", metavar="FILE", help="also write the result as a JSON file")
    p.add_argument("--format", choices=["human", "json"], default="human",
                   help="json: print one JSON object (for CI)")
    add_device_option(p)
    p.add_argument("--threads", type=int, help="torch CPU threads")


def cmd_eval(args) -> int:
    import torch


    from lmspec.runtime.checkpoint.models import load_model

    device = resolve_device(args.device)  # first: a device that is not there costs no load
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("batch", "seq", "max_tokens", "response_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    loaded = load_model(args.checkpoint, device)
    kind = checkpoint_kind(loaded)
    if kind != "language-model" and (args.seq or args.max_tokens):
        raise UsageError("--seq and --max-tokens are for a language model; this checkpoint is "
                         + ("a classifier" if kind == "classifier" else "instruction-tuned"))
    if kind != "instruct" and args.responses:
        raise UsageError("--responses needs an instruction-tuned checkpoint (lmspec finetune instruct)")
    evaluate = {"language-model": _eval_language_model, "classifier": _eval_classifier,
                "instruct": _eval_instruct}[kind]
    result = {"checkpoint": str(loaded.checkpoint.path), "kind": kind} | evaluate(loaded, args)
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
     "labelled texts, an instruction-tuned model's answer loss (and its answers)."),
    eval_options, cmd_eval,
    examples="""examples:
  lmspec eval runs/tiny --data ../shared/data/the-verdict.txt             # perplexity, windows of the context
  lmspec eval runs/gpt2 --data shards/ --split validation --seq 512 --max-tokens 1000000 --format json
  lmspec eval runs/spam                      # the test split it was finetuned with: accuracy, confusion matrix
  lmspec eval runs/spam --data new-sms.tsv --out spam-eval.json
  lmspec eval runs/gpt2-instruct --responses answers.jsonl      # test answers, for judging""",
)


def _finetuning_data(loaded, args) -> tuple[str, str]:
    """(data path, split name): --data, else the data the checkpoint was finetuned on; --split,
    else its test split when the data is the finetuning's, else all of it."""
    recorded = loaded.checkpoint.train_config.get("data")
    data = args.data or recorded
    if data is None:
        raise UsageError("--data is required: the checkpoint does not record the data it was finetuned on")
    same = recorded is not None and Path(data).resolve() == Path(recorded)
    split = args.split or ("test" if same else "all")
    if split != "all" and "split" not in loaded.checkpoint.train_config:
        raise CheckpointError(f"{loaded.checkpoint.path}: records no split fractions; use --split all")
    return data, split


# ----------------------------------------------------------------------------------- language model


def _eval_language_model(loaded, args) -> dict:
    from lmspec.runtime.cli.train import _shard_data
    from lmspec.runtime.data.corpus import read_text_data
    from lmspec.runtime.data.token_data import TokenData
    from lmspec.runtime.train.perplexity import batched_windows, score_batches
    from lmspec.runtime.data.tokenizer import load_tokenizer

    if args.data is None:
        raise UsageError("--data is required for a language model: a text file, a directory of .txt files or "
                         "a shards directory")
    split = args.split or "all"
    if split == "test":
        raise UsageError("--split test: a text or shards directory has train and validation parts only "
                         "(--split all, train or validation)")
    context = loaded.graph.context
    seq = args.seq or context
    if seq is None:
        raise UsageError("--seq is required: the model has no context length")
    if context is not None and seq > context:
        raise UsageError(f"--seq {seq} is longer than the model's context {context}")
    tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
    shards = _shard_data(args.data)
    if shards is not None:
        if shards.tokenizer().to_json() != tokenizer.to_json():
            raise DataError(f"{args.data}: tokenized with another tokenizer than the checkpoint's")
        parts = {"train": [shards.train.shards], "validation": [shards.val.shards]}
    else:
        # the same 90/10 cut as `lmspec train`, so --split validation is the text training validated on
        ids = tokenizer.encode(read_text_data(args.data))
        data = TokenData(ids)
        parts = {"all": [[ids]], "train": [[data.train.numpy()]], "validation": [[data.val.numpy()]]}
    streams = parts.get(split) or parts["train"] + parts["validation"]  # shards: the two splits in turn
    scored = score_batches(loaded.model, batched_windows(streams, seq, args.batch, args.max_tokens))
    if scored.tokens == 0:
        raise DataError(f"{args.data}: the {split} part holds fewer than two tokens; nothing to score")
    return {"data": str(args.data), "split": split, "seq": seq, "windows": scored.windows, "tokens": scored.tokens,
            "cross_entropy": scored.mean, "perplexity": scored.perplexity}


# ---------------------------------------------------------------------------------------- classifier


def _eval_classifier(loaded, args) -> dict:
    from lmspec.runtime.finetune.classifier import classifier_inputs
    from lmspec.runtime.finetune.classify_data import finetuning_splits, read_examples
    from lmspec.runtime.finetune.classify_train import Encoded, score_split

    labels, encoder = classifier_inputs(loaded)
    data, split = _finetuning_data(loaded, args)
    examples = read_examples(data, labels, args.text_field, args.label_field)
    if split != "all":
        cfg = loaded.checkpoint.train_config
        examples = finetuning_splits(examples, tuple(cfg["split"]), cfg["seed"], cfg.get("balance", False),
                                     cfg.get("limit"))[split]
        if not examples:
            raise DataError(f"{data}: the {split} split holds no texts")
    part = Encoded([encoder.encode(e.text) for e in examples], [e.label for e in examples])
    scored = score_split(loaded.model, part, len(labels), args.batch, encoder.pad_id)
    return {"data": str(data), "split": split, "labels": labels, "rows": "true", "columns": "predicted",
            "count": scored["count"], "accuracy": scored["accuracy"], "matrix": scored["matrix"]}


# --------------------------------------------------------------------------------------- instruction


def _eval_instruct(loaded, args) -> dict:
    from lmspec.runtime.cli.instruct import write_responses
    from lmspec.runtime.finetune.instruct_data import (
        make_template,
        pad_id_for,
        read_records,
        split_records,
        tokenize_records,
    )
    from lmspec.runtime.finetune.instruct_train import evaluate_examples
    from lmspec.runtime.data.tokenizer import load_tokenizer

    cfg = loaded.checkpoint.train_config
    data, split = _finetuning_data(loaded, args)
    tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
    template = make_template(cfg["template"], tokenizer)
    records = read_records(data)
    if cfg.get("limit"):
        records = records[:cfg["limit"]]
    if split == "all":
        chosen = list(range(len(records)))
    else:
        train, validation, test = split_records(range(len(records)), cfg["split"], cfg["train"]["seed"])
        chosen = {"train": train, "validation": validation, "test": test}[split]
    if not chosen:
        raise DataError(f"{data}: the {split} split holds no records")
    context = int(loaded.model.context)
    examples = tokenize_records(records, template, min(cfg.get("max_length") or context, context)).pick(chosen)
    loss = evaluate_examples(loaded.model, examples, args.batch, pad_id_for(tokenizer)) if examples else None
    result = {"data": str(data), "split": split, "records": len(chosen), "scored": len(examples),
              "answer_tokens": sum(sum(e.trained[1:]) for e in examples), "loss": loss}
    if args.responses:
        write_responses(loaded.model, tokenizer, [records[i] for i in chosen], template, args.responses,
                        args.response_tokens)
        result["responses"] = str(args.responses)
    return result


# -------------------------------------------------------------------------------------------- output


def _human(result: dict) -> str:
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
