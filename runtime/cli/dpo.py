"""`lmspec finetune dpo`: preference tuning of a checkpoint (runtime/finetune/dpo.py) against a frozen copy
of itself. Data, template, split and model choice (whole or LoRA) are instruction tuning's."""
from __future__ import annotations

from lmspec.runtime.cli.instruct import split_fractions
from lmspec.runtime.cli.numbers import AT_LEAST_0, AT_LEAST_1, POSITIVE
from lmspec.runtime.cli.options import (
    add_log_option, add_lora_options, add_optimizer_options, add_record_options, check_log_option
)
from lmspec.runtime.cli.verb import Verb, option_output
from lmspec.runtime.distributed.device import add_device_option


def finetune_dpo_options(p) -> None:
    """`lmspec finetune dpo`'s options."""
    p.add_argument("checkpoint", help="the run or checkpoint to start from; it is also the frozen reference")
    p.add_argument("--data", required=True, help="a JSON list or JSONL of {instruction, input, chosen, rejected} "
                   "records (or {messages: [...], chosen, rejected}, the messages ending with the user's turn)")
    p.add_argument("-o", "--out", required=True, help="the run directory for the finetuned model")
    p.add_argument("--beta", type=POSITIVE, default=0.1, help="how strongly the policy is held to the reference: "
                   "the scale of the implicit reward (default: 0.1, the paper's and the book's)")
    p.add_argument("--template", choices=["alpaca", "chatml"], default="alpaca",
                   help="prompt format, as for finetune instruct (use the one the checkpoint was tuned with; "
                        "default: alpaca)")
    p.add_argument("--epochs", type=AT_LEAST_1, default=1)
    add_optimizer_options(p, lr=5e-6, warmup=10, lr_note=", the book's")
    p.add_argument("--max-length", type=AT_LEAST_1, help="the most tokens a prompt and answer may take (default: the "
                   "model's context); longer ones are cut at the end, a pair is left out if an answer has no "
                   "token left")
    p.add_argument("--eval-every", type=AT_LEAST_0, default=50,
                   help="evaluate every N steps, besides at the start and the end (0: only those)")
    p.add_argument("--eval-pairs", type=AT_LEAST_0, default=64, metavar="N",
                   help="training pairs scored at each evaluation (default: 64); validation is scored whole")
    add_record_options(p)
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_log_option(p)
    add_lora_options(p)


def cmd_finetune_dpo(args) -> int:
    from lmspec.runtime.distributed.device import resolve_device
    from lmspec.runtime.finetune.runs import dpo_run

    device = resolve_device(args.device)  # first: a device that is not there costs no data read, no load
    check_log_option(args)
    fractions = split_fractions(args.split)
    summary = dpo_run(args, fractions, device, say=print)
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
    finetune_dpo_options, cmd_finetune_dpo, outputs=(option_output("out", directory=True, run=True),),
    config_file=True,
    examples="""examples:
  lmspec finetune dpo runs/gpt2-instruct --data ../shared/data/instruction-data-with-preference.json --out runs/gpt2-dpo
  lmspec finetune dpo runs/gpt2-instruct --data prefs.jsonl --beta 0.5 --lora 8 --out runs/gpt2-dpo-lora""",
)
