"""`lmspec finetune dpo`: preference tuning of a checkpoint (runtime/finetune/dpo.py) against a frozen copy
of itself. Data, template, split and model choice (whole or LoRA) are instruction tuning's."""
from __future__ import annotations

from pathlib import Path

from lmspec.runtime.cli.instruct import _split_fractions
from lmspec.runtime.cli.options import add_lora_options, add_optimizer_options, add_record_options
from lmspec.runtime.cli.verb import Verb
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.distributed.device import add_device_option, resolve_device
from lmspec.runtime.errors import CheckpointError, UsageError


def finetune_dpo_options(p) -> None:
    """`lmspec finetune dpo`'s options."""
    p.add_argument("checkpoint", help="the run or checkpoint to start from; it is also the frozen reference")
    p.add_argument("--data", required=True, help="a JSON list or JSONL of {instruction, input, chosen, rejected} "
                   "records (or {messages: [...], chosen, rejected}, the messages ending with the user's turn)")
    p.add_argument("-o", "--out", required=True, help="the run directory for the finetuned model")
    p.add_argument("--beta", type=float, default=0.1, help="how strongly the policy is held to the reference: "
                   "the scale of the implicit reward (default: 0.1, the paper's and the book's)")
    p.add_argument("--template", choices=["alpaca", "chatml"], default="alpaca",
                   help="prompt format, as for finetune instruct (use the one the checkpoint was tuned with; "
                        "default: alpaca)")
    p.add_argument("--epochs", type=int, default=1)
    add_optimizer_options(p, lr=5e-6, warmup=10, lr_note=", the book's")
    p.add_argument("--max-length", type=int, help="the most tokens a prompt and answer may take (default: the "
                   "model's context); longer ones are cut at the end, a pair is left out if an answer has no "
                   "token left")
    p.add_argument("--eval-every", type=int, default=50,
                   help="evaluate every N steps, besides at the start and the end (0: only those)")
    p.add_argument("--eval-pairs", type=int, default=64, metavar="N",
                   help="training pairs scored at each evaluation (default: 64); validation is scored whole")
    add_record_options(p)
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_options(p)


def cmd_finetune_dpo(args) -> int:
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.checkpoint.store import find_checkpoint, load_checkpoint
    from lmspec.runtime.data.tokenizer import load_tokenizer
    from lmspec.runtime.finetune.dpo import DPOSetup, check_preference_record, finetune_dpo, tokenize_pairs
    from lmspec.runtime.finetune.instruct_data import make_template, pad_id_for, read_records, split_records
    from lmspec.runtime.finetune.start import model_to_finetune
    from lmspec.runtime.finetune.steps import finetune_config

    device = resolve_device(args.device)  # first: a device that is not there costs no data read, no load
    fractions = _split_fractions(args.split)
    if args.epochs < 1 or args.batch < 1 or args.eval_pairs < 0:
        raise UsageError("--epochs and --batch must be at least 1, --eval-pairs at least 0")
    if not args.beta > 0:
        raise UsageError(f"--beta must be positive (it scales the implicit reward), got {args.beta}")
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
    return 0


FINETUNE_DPO = Verb(
    "finetune dpo",
    ("Finetune a checkpoint on preference pairs with Direct Preference Optimization: prefer each record's "
     "chosen answer over its rejected one, against a frozen copy of the checkpoint."),
    finetune_dpo_options, cmd_finetune_dpo,
    examples="""examples:
  lmspec finetune dpo runs/gpt2-instruct --data ../shared/data/instruction-data-with-preference.json --out runs/gpt2-dpo
  lmspec finetune dpo runs/gpt2-instruct --data prefs.jsonl --beta 0.5 --lora 8 --out runs/gpt2-dpo-lora""",
)
