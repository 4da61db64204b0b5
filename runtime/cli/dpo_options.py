"""Command-line options of preference tuning: `finetune dpo`."""
from __future__ import annotations

from lmspec.runtime.cli.instruct_options import add_record_options
from lmspec.runtime.cli.lora_options import add_lora_options, add_optimizer_options
from lmspec.runtime.distributed.device import add_device_option


def add_dpo_verbs(verb, finetune_group) -> None:
    d = verb("dpo", "Finetune a checkpoint on preference pairs with Direct Preference Optimization: prefer each "
             "record's chosen answer over its rejected one, against a frozen copy of the checkpoint.",
             "cli.dpo:cmd_finetune_dpo", finetune_group, "finetune ",
             examples="""examples:
  lmspec finetune dpo runs/gpt2-instruct --data ../shared/data/instruction-data-with-preference.json --out runs/gpt2-dpo
  lmspec finetune dpo runs/gpt2-instruct --data prefs.jsonl --beta 0.5 --lora 8 --out runs/gpt2-dpo-lora""")
    d.add_argument("checkpoint", help="the run or checkpoint to start from; it is also the frozen reference")
    d.add_argument("--data", required=True, help="a JSON list or JSONL of {instruction, input, chosen, rejected} "
                   "records (or {messages: [...], chosen, rejected}, the messages ending with the user's turn)")
    d.add_argument("--out", required=True, help="the run directory for the finetuned model")
    d.add_argument("--beta", type=float, default=0.1, help="how strongly the policy is held to the reference: "
                   "the scale of the implicit reward (default: 0.1, the paper's and the book's)")
    d.add_argument("--template", choices=["alpaca", "chatml"], default="alpaca",
                   help="prompt format, as for finetune instruct (use the one the checkpoint was tuned with; "
                        "default: alpaca)")
    d.add_argument("--epochs", type=int, default=1)
    add_optimizer_options(d, lr=5e-6, warmup=10, lr_note=", the book's")
    d.add_argument("--max-length", type=int, help="the most tokens a prompt and answer may take (default: the "
                   "model's context); longer ones are cut at the end, a pair is left out if an answer has no "
                   "token left")
    d.add_argument("--eval-every", type=int, default=50,
                   help="evaluate every N steps, besides at the start and the end (0: only those)")
    d.add_argument("--eval-pairs", type=int, default=64, metavar="N",
                   help="training pairs scored at each evaluation (default: 64); validation is scored whole")
    add_record_options(d)
    add_device_option(d)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_options(d)
