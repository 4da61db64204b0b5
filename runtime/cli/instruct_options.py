"""Command-line options of instruction tuning: `finetune instruct` and `chat`."""
from __future__ import annotations

from lmspec.runtime.cli.lora_options import add_lora_options, add_optimizer_options
from lmspec.runtime.distributed.device import add_device_option


def add_record_options(q) -> None:
    """--split --limit --seed --precision: how a verb on instruction records (instruct, dpo) splits,
    shuffles and computes."""
    q.add_argument("--split", default="0.85,0.05,0.1", metavar="TRAIN,VAL,TEST",
                   help="fractions of the records after a seeded shuffle (default: 0.85,0.05,0.1, the book's)")
    q.add_argument("--limit", type=int, metavar="N", help="use only the first N records (a quick trial)")
    q.add_argument("--seed", type=int, default=123, help="the split, the batch order, dropout (default: 123)")
    q.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast compute dtype; weights stay fp32")


def add_instruct_verbs(verb, finetune_group, top, override_options) -> None:
    i = verb("instruct", "Finetune a checkpoint to follow instructions (Alpaca or chat data), the loss on the "
             "responses only.", "cli.instruct:cmd_finetune_instruct", finetune_group, "finetune ",
             examples="""examples:
  lmspec finetune instruct runs/gpt2 --data ../shared/data/instruction-data.json --out runs/gpt2-instruct
  lmspec finetune instruct runs/gpt2 --data chats.jsonl --template chatml --lora 16 --out runs/gpt2-chat""")
    i.add_argument("checkpoint", help="the pretrained run or checkpoint to start from")
    i.add_argument("--data", required=True, help="a JSON list or JSONL of {instruction, input, output} "
                   "or {messages: [...]} records")
    i.add_argument("--out", required=True, help="the run directory for the finetuned model")
    i.add_argument("--template", choices=["alpaca", "chatml"], default="alpaca",
                   help="prompt format: alpaca (the book's '### Instruction:' text, answers end with "
                        "<|endoftext|>) or chatml (<|im_start|>/<|im_end|> control tokens) (default: alpaca)")
    i.add_argument("--epochs", type=int, default=2)
    add_optimizer_options(i, lr=5e-5, warmup=10, lr_note=", the book's")
    i.add_argument("--max-length", type=int, help="the most tokens an example may take (default: the model's "
                   "context); longer examples are cut at the end, and left out if no answer token remains")
    i.add_argument("--eval-every", type=int, default=50,
                   help="validation loss every N steps, besides at the start and the end (0: only those)")
    add_record_options(i)
    i.add_argument("--responses", metavar="FILE", help="after training, write greedy answers to the test "
                   "records to this JSONL file (each record plus \"model_response\")")
    i.add_argument("--response-tokens", type=int, default=256, help="the longest answer --responses writes")
    add_device_option(i)
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_options(i)

    c = verb("chat", "Talk with an instruction-tuned checkpoint, turn by turn.", "cli.instruct:cmd_chat", top,
             examples="""examples:
  lmspec chat runs/gpt2-instruct
  echo "Name three primary colours." | lmspec chat runs/gpt2-instruct --max-tokens 64""")
    c.add_argument("checkpoint", help="an instruction-tuned run or checkpoint")
    c.add_argument("--max-tokens", type=int, default=256, help="the longest answer (default: 256)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 (the default) picks the likeliest token")
    c.add_argument("--top-k", type=int)
    c.add_argument("--seed", type=int, help="makes sampling repeatable")
    c.add_argument("--system", help="a system message (chatml), or the text in place of the Alpaca preamble")
    add_device_option(c)
