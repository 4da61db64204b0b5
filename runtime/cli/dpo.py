"""`lmspec finetune dpo`: preference tuning of a checkpoint (runtime/finetune/dpo.py) against a frozen copy
of itself. Data, template, split and model choice (whole or LoRA) are instruction tuning's."""
from __future__ import annotations

from pathlib import Path

from lmspec.runtime.checkpoint.store import CheckpointError, find_checkpoint, load_checkpoint
from lmspec.runtime.cli.train import USER_ERRORS, _fail
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.distributed.device import resolve_device
from lmspec.runtime.cli.instruct import _split_fractions
from lmspec.runtime.finetune.instruct_data import (
    TemplateError,
    make_template,
    pad_id_for,
    read_records,
    split_records,
)
from lmspec.runtime.data.tokenizer import load_tokenizer
from lmspec.runtime.errors import UsageError


def cmd_finetune_dpo(args) -> int:
    from lmspec.compiler.rewrites import RewriteError

    from lmspec.runtime.finetune.dpo import DPOSetup, check_preference_record, finetune_dpo, tokenize_pairs
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.finetune.start import model_to_finetune
    from lmspec.runtime.finetune.steps import finetune_config
    from lmspec.runtime.train.loop import ConfigError, TrainingError

    device = resolve_device(args.device)  # first: a device that is not there costs no data read, no load
    fractions = _split_fractions(args.split)
    if args.epochs < 1 or args.batch < 1 or args.eval_pairs < 0:
        raise UsageError("--epochs and --batch must be at least 1, --eval-pairs at least 0")
    if not args.beta > 0:
        raise UsageError(f"--beta must be positive (it scales the implicit reward), got {args.beta}")
    try:
        if find_checkpoint(args.out) is not None:
            raise CheckpointError(f"{args.out} already holds a run; choose another --out")
        records = read_records(args.data, check=check_preference_record)
        if args.limit:
            records = records[:args.limit]
        tokenizer = load_tokenizer(load_checkpoint(args.checkpoint).tokenizer)
        template = make_template(args.template, tokenizer)  # before the models: a wrong template fails fast
        policy, _, base, spec, adapters_only = model_to_finetune(args, args.seed, device)
        reference = load_model(args.checkpoint, device).model  # a second copy, frozen by finetune_dpo
        context = int(policy.context)
        max_length = min(args.max_length or context, context)
        pairs, truncated = tokenize_pairs(records, template, max_length)
        train_ids, val_ids, test_ids = split_records(range(len(records)), fractions, args.seed)
        train_set, val_set = ([pairs[i] for i in ids if pairs[i] is not None] for ids in (train_ids, val_ids))
        if not train_set:
            raise DataError(f"{args.data}: no training pair is left (of {len(records)} records, "
                            f"{sum(p is None for p in pairs)} have an answer that does not fit {max_length} tokens "
                            f"or holds characters the vocabulary lacks)")
        cfg = finetune_config(args, len(train_set), max_length, context)
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        print(f"{len(records)} records: {len(train_set)} train, {len(val_set)} validation, {len(test_ids)} test pairs "
              f"({args.template} template, at most {max_length} tokens; {truncated} answers cut to fit, "
              f"{sum(p is None for p in pairs)} pairs left out); beta {args.beta:g}; {trainable:,} trainable "
              f"parameters; {cfg.steps} steps")
        setup = DPOSetup(template=args.template, pad_id=pad_id_for(tokenizer), beta=args.beta, epochs=args.epochs,
                         eval_pairs=args.eval_pairs, trainable_only=adapters_only,
                         extra={"data": str(Path(args.data).resolve()), "split": list(fractions), "limit": args.limit,
                                "max_length": max_length, "base": str(base.path)})
        summary = finetune_dpo(policy, reference, tokenizer, train_set, val_set, cfg, setup, args.out, spec,
                               progress=not args.no_progress)
        shown = next((s for s in ("val", "train") if f"{s}_loss" in summary), None)  # none: nothing scored
        print(f"done: {summary['steps']} steps, "
              + (f"{shown} loss {summary[f'{shown}_loss']:.4f}, reward margin {summary[f'{shown}_margin']:+.4f}, "
                 f"reward accuracy {summary[f'{shown}_accuracy']:.2f}, " if shown else "")
              + f"{summary['elapsed']:.0f} s\ncheckpoint {summary['checkpoint']}\nloss curve {summary['plot']}")
    except (*USER_ERRORS, TemplateError, RewriteError, ConfigError, TrainingError) as err:
        return _fail("finetune dpo", err)
    return 0
