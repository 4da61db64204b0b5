"""The finetune verbs' runs from their settings (the parsed options of `finetune classify`, `instruct`
and `dpo`, or any object with the same attributes): data read and split, the model to train built from
its checkpoint, the loop run, the result saved. The command line prints what they return.
"""
from __future__ import annotations

from pathlib import Path

from lmspec.runtime.errors import CheckpointError, DataError
from lmspec.runtime.checkpoint.layout import write_run_options


def _counts(examples, labels) -> list[int]:
    return [sum(e.label == i for e in examples) for i in range(len(labels))]


def left_out(t) -> str:
    parts = [f"{t.truncated} cut to fit"] + ([f"{t.dropped} left out (no answer within the window)"]
                                             if t.dropped else [])
    if t.unencodable:
        parts.append(f"{t.unencodable} left out (characters the vocabulary lacks)")
    return ", ".join(parts)


def _starting(settings, device, say) -> None:
    """What every finetune run does as its loop is about to start: say where --precision makes it
    slow, and begin its peak memory there (the metrics' peak: this run's, from the models and data
    it holds now)."""
    from lmspec.runtime.train.steps import slow_autocast_note
    from lmspec.runtime.train.throughput import start_peak_memory

    if note := slow_autocast_note(device, settings.precision):
        say(note)
    start_peak_memory(device)


def classify_run(settings, labels: list[str], fractions: tuple, device, say=print) -> dict:
    """`finetune classify`: the labelled texts read, balanced and split, the classifier built from its
    checkpoint, trained, scored on each split (confusion.json) and saved; progress lines go to `say`.
    Returns {"splits", "checkpoint", "confusion"}."""
    from lmspec.runtime.checkpoint.store import find_checkpoint, save_checkpoint
    from lmspec.runtime.data.text_encoder import TextEncoder
    from lmspec.runtime.data.tokenizer import load_tokenizer
    from lmspec.runtime.finetune.classify_data import finetuning_splits, read_examples
    from lmspec.runtime.finetune.classify_train import Encoded, score_split, train_classifier, write_confusion
    from lmspec.runtime.finetune.instruct_data import pad_id_for
    from lmspec.runtime.finetune.lora import trainable_weights
    from lmspec.runtime.finetune.steps import steps_per_epoch
    from lmspec.runtime.train.config import TrainConfig

    if find_checkpoint(settings.out) is not None:
        raise CheckpointError(f"{settings.out} already holds a run; choose another --out")
    examples = read_examples(settings.data, labels, settings.text_field, settings.label_field)
    absent = [name for name, n in zip(labels, _counts(examples, labels)) if n == 0]
    if absent:
        raise DataError(f"{settings.data}: no example of {', '.join(absent)}")
    parts = finetuning_splits(examples, fractions, settings.seed, settings.balance, settings.limit)
    examples = [e for part in parts.values() for e in part]
    from lmspec.runtime.finetune.classifier import classifier_to_train
    model, graph, base, spec, adapters_only = classifier_to_train(settings, labels, device)
    tokenizer = load_tokenizer(base.checkpoint.tokenizer)
    context = int(model.context)
    encoder = TextEncoder(tokenizer, min(settings.max_length or context, context), pad_id_for(tokenizer))
    encoded = {name: Encoded([encoder.encode(e.text) for e in part], [e.label for e in part])
               for name, part in parts.items()}
    steps = settings.epochs * steps_per_epoch(len(encoded["train"]), settings.batch)
    cfg = TrainConfig(steps=steps, batch=settings.batch, lr=settings.lr, min_lr=settings.min_lr, warmup=min(settings.warmup, steps),
                      weight_decay=settings.weight_decay, grad_clip=settings.grad_clip, seed=settings.seed,
                      precision=settings.precision, schedule=settings.schedule,
                      decay_fraction=settings.decay_fraction, keep=1).resolved(context)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"{len(examples)} examples ({', '.join(f'{n} {name}' for name, n in zip(labels, _counts(examples, labels)))}"
          f"{', balanced' if settings.balance else ''}): {len(parts['train'])} train, {len(parts['validation'])} "
          f"validation, {len(parts['test'])} test; at most {encoder.max_length} tokens"
          + (f", {encoder.replaced} character{'s' * (encoder.replaced > 1)} the vocabulary lacks replaced"
             if encoder.replaced else ""))
    say(f"{trainable:,} of {total:,} parameters train ({trainable / total:.2%}"
          f"{', LoRA' if adapters_only else ''}); {settings.epochs} epochs, {steps} steps")
    _starting(settings, device, say)
    run_dir = Path(settings.out)
    write_run_options(run_dir, getattr(settings, "run_options", None))  # the input checked: the run starts
    history = train_classifier(model, encoded["train"], encoded["validation"], cfg, settings.epochs, encoder.pad_id,
                               run_dir, progress=not settings.no_progress, log_to=settings.log)
    splits = {name: score_split(model, part, len(labels), settings.batch, encoder.pad_id)
              for name, part in encoded.items()}
    confusion = write_confusion(run_dir, labels, splits)
    train_config = cfg.to_dict() | {"epochs": settings.epochs, "max_length": encoder.max_length,
                                    "labels": labels, "data": str(Path(settings.data).resolve()),
                                    "split": list(fractions), "balance": settings.balance, "limit": settings.limit,
                                    "trainable_blocks": settings.trainable_blocks, "base": str(base.checkpoint.path)}
    metrics = {f"{name}_accuracy": s["accuracy"] for name, s in splits.items()} | {"loss": history[-1]["loss"]}
    checkpoint = save_checkpoint(run_dir, step=steps, model=None if adapters_only else model, optimizer=None,
                                 rng=None, train_config=train_config, metrics=metrics,
                                 tokenizer=base.checkpoint.tokenizer, spec=spec, keep=1,
                                 weights=trainable_weights(model) if adapters_only else None)
    return {"splits": splits, "checkpoint": checkpoint, "confusion": confusion}


def _records_and_template(settings, check=None):
    """The prologue of instruct and dpo: a fresh --out, the records read (and cut to --limit), the base's
    tokenizer and the chat template, all before a model is built so that a mistake fails fast."""
    from lmspec.runtime.checkpoint.store import find_checkpoint, load_checkpoint
    from lmspec.runtime.data.tokenizer import load_tokenizer
    from lmspec.runtime.finetune.instruct_data import make_template, read_records

    if find_checkpoint(settings.out) is not None:
        raise CheckpointError(f"{settings.out} already holds a run; choose another --out")
    records = read_records(settings.data) if check is None else read_records(settings.data, check=check)
    if settings.limit:
        records = records[:settings.limit]
    tokenizer = load_tokenizer(load_checkpoint(settings.checkpoint).tokenizer)
    return records, tokenizer, make_template(settings.template, tokenizer)


def instruct_run(settings, fractions: tuple, device, say=print) -> dict:
    """`finetune instruct`: the records read, templated, tokenized and split, the model to tune built from
    its checkpoint (or LoRA adapters on it), trained and saved, and with --responses its answers to the
    test records written; progress lines go to `say`. Returns {"summary", "answered"}."""
    from lmspec.runtime.finetune.answers import write_responses
    from lmspec.runtime.finetune.instruct_data import pad_id_for, split_records, tokenize_records
    from lmspec.runtime.finetune.instruct_train import InstructSetup, finetune_instruct
    from lmspec.runtime.finetune.start import model_to_finetune
    from lmspec.runtime.finetune.steps import finetune_config

    records, tokenizer, template = _records_and_template(settings)
    model, graph, base, spec, adapters_only = model_to_finetune(settings, settings.seed, device)
    context = int(model.context)
    max_length = min(settings.max_length or context, context)
    tokenized = tokenize_records(records, template, max_length)
    train_ids, val_ids, test_ids = split_records(range(len(records)), fractions, settings.seed)
    train_set, val_set = tokenized.pick(train_ids), tokenized.pick(val_ids)
    if not train_set:
        raise DataError(f"{settings.data}: no training example is left (of {len(records)} records, "
                        f"{tokenized.unencodable} hold characters the vocabulary lacks, {tokenized.dropped} "
                        f"have no answer within {max_length} tokens)")
    cfg = finetune_config(settings, len(train_set), max_length, context)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{len(records)} records: {len(train_set)} train, {len(val_set)} validation, {len(test_ids)} test "
          f"({settings.template} template, at most {max_length} tokens; {left_out(tokenized)}); "
          f"{trainable:,} trainable parameters; {cfg.steps} steps")
    _starting(settings, device, say)
    setup = InstructSetup(template=settings.template, pad_id=pad_id_for(tokenizer), epochs=settings.epochs,
                          trainable_only=adapters_only,
                          extra={"data": str(Path(settings.data).resolve()), "split": list(fractions),
                                 "limit": settings.limit, "max_length": max_length, "base": str(base.path)})
    write_run_options(settings.out, getattr(settings, "run_options", None))
    summary = finetune_instruct(model, tokenizer, train_set, val_set, cfg, setup, settings.out, spec,
                                progress=not settings.no_progress, log_to=settings.log)
    answered = 0
    if settings.responses:
        test = [records[i] for i in test_ids]
        write_responses(model, tokenizer, test, template, settings.responses, settings.response_tokens)
        answered = len(test)
    return {"summary": summary, "answered": answered}


def dpo_run(settings, fractions: tuple, device, say=print) -> dict:
    """`finetune dpo`: the preference records read, templated, tokenized and split, the policy built from
    its checkpoint (or LoRA adapters on it) beside a frozen copy as the reference, trained and saved;
    progress lines go to `say`. Returns finetune_dpo's summary."""
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.finetune.dpo import DPOSetup, check_preference_record, finetune_dpo, tokenize_pairs
    from lmspec.runtime.finetune.instruct_data import pad_id_for, split_records
    from lmspec.runtime.finetune.start import model_to_finetune
    from lmspec.runtime.finetune.steps import finetune_config

    records, tokenizer, template = _records_and_template(settings, check=check_preference_record)
    policy, _, base, spec, adapters_only = model_to_finetune(settings, settings.seed, device)
    reference = load_model(settings.checkpoint, device).model  # a second copy, frozen by finetune_dpo
    context = int(policy.context)
    max_length = min(settings.max_length or context, context)
    pairs, truncated = tokenize_pairs(records, template, max_length)
    train_ids, val_ids, test_ids = split_records(range(len(records)), fractions, settings.seed)
    train_set, val_set = ([pairs[i] for i in ids if pairs[i] is not None] for ids in (train_ids, val_ids))
    if not train_set:
        raise DataError(f"{settings.data}: no training pair is left (of {len(records)} records, "
                        f"{sum(p is None for p in pairs)} have an answer that does not fit {max_length} tokens "
                        f"or holds characters the vocabulary lacks)")
    cfg = finetune_config(settings, len(train_set), max_length, context)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    say(f"{len(records)} records: {len(train_set)} train, {len(val_set)} validation, {len(test_ids)} test pairs "
          f"({settings.template} template, at most {max_length} tokens; {truncated} answers cut to fit, "
          f"{sum(p is None for p in pairs)} pairs left out); beta {settings.beta:g}; {trainable:,} trainable "
          f"parameters; {cfg.steps} steps")
    _starting(settings, device, say)
    setup = DPOSetup(template=settings.template, pad_id=pad_id_for(tokenizer), beta=settings.beta, epochs=settings.epochs,
                     eval_pairs=settings.eval_pairs, trainable_only=adapters_only,
                     extra={"data": str(Path(settings.data).resolve()), "split": list(fractions), "limit": settings.limit,
                            "max_length": max_length, "base": str(base.path)})
    write_run_options(settings.out, getattr(settings, "run_options", None))
    summary = finetune_dpo(policy, reference, tokenizer, train_set, val_set, cfg, setup, settings.out, spec,
                           progress=not settings.no_progress, log_to=settings.log)
    return summary
