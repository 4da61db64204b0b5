"""`lmspec finetune instruct` and `lmspec chat`: instruction tuning of a checkpoint, and talking to
the result turn by turn. The finetuned checkpoint records its chat template (a Jinja text) in
train_config, so chat formats the conversation exactly as training did; an imported checkpoint
records the template it came with."""
from __future__ import annotations

import sys

from lmspec.runtime.cli.numbers import AT_LEAST_0, AT_LEAST_1
from lmspec.runtime.cli.options import (
    add_log_option, add_lora_options, add_optimizer_options, add_record_options, add_sampling_options,
    check_log_option
)
from lmspec.runtime.cli.verb import Verb, option_output
from lmspec.runtime.distributed.device import add_device_option, resolve_device
from lmspec.runtime.errors import ChatError, TokenizerError, UsageError


def split_fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6 or parts[0] == 0:
        raise UsageError(f"--split must be three fractions train,val,test summing to 1, like 0.85,0.05,0.1; got {text!r}")
    return parts


def finetune_instruct_options(p) -> None:
    """`lmspec finetune instruct`'s options."""
    p.add_argument("checkpoint", help="the pretrained run or checkpoint to start from")
    p.add_argument("--data", required=True, help="a JSON list or JSONL of {instruction, input, output} "
                   "or {messages: [...]} records")
    p.add_argument("-o", "--out", required=True, help="the run directory for the finetuned model")
    p.add_argument("--template", choices=["alpaca", "chatml"], default="alpaca",
                   help="prompt format: alpaca (the book's '### Instruction:' text, answers end with "
                        "<|endoftext|>) or chatml (<|im_start|>/<|im_end|> control tokens) (default: alpaca)")
    p.add_argument("--epochs", type=AT_LEAST_1, default=2)
    add_optimizer_options(p, lr=5e-5, warmup=10, lr_note=", the book's")
    p.add_argument("--max-length", type=AT_LEAST_1, help="the most tokens an example may take (default: the model's "
                   "context); longer examples are cut at the end, and left out if no answer token remains")
    p.add_argument("--eval-every", type=AT_LEAST_0, default=50,
                   help="validation loss every N steps, besides at the start and the end (0: only those)")
    add_record_options(p)
    p.add_argument("--responses", metavar="FILE", help="after training, write greedy answers to the test "
                   "records to this JSONL file (each record plus \"model_response\")")
    p.add_argument("--response-tokens", type=AT_LEAST_1, default=256, help="the longest answer --responses writes")
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_log_option(p)
    add_lora_options(p)


def cmd_finetune_instruct(args) -> int:
    from lmspec.runtime.distributed.device import resolve_device
    from lmspec.runtime.finetune.runs import instruct_run

    device = resolve_device(args.device)  # first: a device that is not there costs no data read, no load
    check_log_option(args)
    fractions = split_fractions(args.split)
    result = instruct_run(args, fractions, device, say=print)
    summary = result["summary"]
    print(f"done: {summary['steps']} steps, train loss {summary['loss']:.4f}"
          + (f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else "")
          + f", {summary['elapsed']:.0f} s\ncheckpoint {summary['checkpoint']}")
    if args.responses:
        print(f"answers to the {result['answered']} test records: {args.responses}")
    return 0

FINETUNE_INSTRUCT = Verb(
    "finetune instruct",
    "Finetune a checkpoint to follow instructions (Alpaca or chat data), the loss on the responses only.",
    finetune_instruct_options, cmd_finetune_instruct,
    outputs=(option_output("out", directory=True, run=True), option_output("responses", directory=False)),
    config_file=True,
    examples="""examples:
  lmspec finetune instruct runs/gpt2 --data ../shared/data/instruction-data.json --out runs/gpt2-instruct
  lmspec finetune instruct runs/gpt2 --data chats.jsonl --template chatml --lora 16 --out runs/gpt2-chat""",
)




def chat_options(p) -> None:
    """`lmspec chat`'s options."""
    p.add_argument("checkpoint", help="an instruction-tuned run or checkpoint")
    add_sampling_options(p, max_tokens=256, temperature=0.0, top_p=False)
    p.add_argument("--system", help="a system message, first in every prompt (the Alpaca template shows it as "
                   "the instruction's ### Input:)")
    add_device_option(p)


def cmd_chat(args) -> int:
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.data.chat_template import JinjaTemplate
    from lmspec.runtime.data.tokenizer import load_tokenizer
    from lmspec.runtime.finetune.answers import chat_template_of
    from lmspec.runtime.train.sampling import check_arguments

    device = resolve_device(args.device)
    try:
        check_arguments([0], args.max_tokens, args.temperature, args.top_k, None)
    except ValueError as err:
        raise UsageError(str(err)) from None
    loaded = load_model(args.checkpoint, device)
    tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
    record, own = chat_template_of(loaded.checkpoint, tokenizer)
    template = JinjaTemplate(tokenizer, record)
    template.check()  # a template that does not parse: one line now, not at every turn
    if not own:
        print(f"note: {loaded.checkpoint.path} was not instruction-tuned; using the {template.name} template",
              file=sys.stderr)
    converse(loaded.model, tokenizer, template, sys.stdin, sys.stdout, args)
    return 0


CHAT = Verb(
    "chat",
    "Talk with an instruction-tuned checkpoint, turn by turn.",
    chat_options, cmd_chat,
    examples="""examples:
  lmspec chat runs/gpt2-instruct
  echo "Name three primary colours." | lmspec chat runs/gpt2-instruct --max-tokens 64""",
)


def converse(model, tokenizer, template, lines, out, args) -> None:
    """One answer per non-empty input line, the conversation so far in every prompt (rendered by the
    checkpoint's chat template, `--system` first); the oldest exchanges are dropped when the prompt and
    the answer would not fit the model's context."""
    from lmspec.runtime.finetune.answers import chat_answer
    from lmspec.runtime.train.sampling import generate

    interactive = lines.isatty()
    history: list[tuple[str, str]] = []  # (question, answer) exchanges
    system = [("system", args.system)] if args.system else []
    context = int(model.context)
    room = min(args.max_tokens, context // 2)  # kept free for the answer
    turn = 0

    def prompt_for(question: str):
        messages = system + [m for q, a in history for m in (("user", q), ("assistant", a))]
        return template.render(messages + [("user", question)])

    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            break
        question = line.rstrip("\r\n")
        if not question.strip():
            continue
        try:
            prompt = prompt_for(question)
            while len(prompt.ids) + room > context and history:
                history.pop(0)
                prompt = prompt_for(question)
        except (TokenizerError, ChatError) as err:  # a character the vocabulary lacks; a template's refusal
            print(f"lmspec chat: error: {err}; ask again", file=sys.stderr)
            continue
        seed = None if args.seed is None else args.seed + turn
        new = generate(model, prompt.ids[-context:], args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                       seed=seed, eot_id=tokenizer.eot_id, stop_ids=prompt.stop_ids)
        answer = chat_answer(tokenizer, prompt, new)
        print(answer, file=out, flush=True)
        history.append((question, answer))
        turn += 1
