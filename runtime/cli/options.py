"""Options several verbs share (`--set`, `--provider`, the optimiser's, LoRA's, how records split), and
turning what the user typed into values."""
from __future__ import annotations

import sys

from lmspec.dsl.errors import UserError
from lmspec.runtime.cli.numbers import AT_LEAST_0, AT_LEAST_1, NOT_NEGATIVE, POSITIVE, PROBABILITY, SEED
from lmspec.runtime.errors import UsageError

# Which part of the data `eval` scores.
SPLITS = ("all", "train", "validation", "test")


def cli_overrides(pairs: list[str]) -> dict:
    """The `--set NAME=VALUE` options as a dict of hyper-parameters."""
    from lmspec.compiler import parse_overrides
    try:
        return parse_overrides(pairs)
    except ValueError as err:
        raise UsageError(str(err)) from None


PROVIDER_HELP = ("where onnxruntime runs the exported model: cpu (default), or cuda (onnxruntime's CUDA provider: "
                 "needs onnxruntime-gpu installed in place of onnxruntime)")


def add_provider_option(parser) -> None:
    """--provider, for every verb that runs an exported model in onnxruntime; declared here, where the
    command line can afford it, rather than beside onnx_model.PROVIDERS, which imports numpy and the
    tokenizers."""
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help=PROVIDER_HELP)


def add_sampling_options(p, max_tokens: int = 200, temperature: float = 1.0, top_p: bool = True) -> None:
    """--max-tokens, --temperature, --top-k, --top-p and --seed, for every verb that generates text."""
    p.add_argument("--max-tokens", type=AT_LEAST_0, default=max_tokens, help="the most tokens to generate")
    p.add_argument("--temperature", type=NOT_NEGATIVE, default=temperature,
                   help="0 picks the likeliest token (greedy); higher spreads the choice wider")
    p.add_argument("--top-k", type=AT_LEAST_1, metavar="K", help="sample among the K likeliest tokens only")
    if top_p:
        p.add_argument("--top-p", type=PROBABILITY, metavar="P",
                       help="sample among the likeliest tokens whose probabilities sum to P (nucleus)")
    p.add_argument("--seed", type=SEED, help="makes sampling repeatable")


def add_override_options(p) -> None:
    """--set NAME=VALUE and --model, for every verb that builds a spec."""
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a hyper-parameter of the spec (repeatable)")
    p.add_argument("--model", help="the model to use when a file defines several")


def add_optimizer_options(q, *, lr: float, warmup: int, lr_note: str = "") -> None:
    """The optimiser's settings: --batch --lr --min-lr --warmup --weight-decay --grad-clip --schedule."""
    q.add_argument("--batch", type=AT_LEAST_1, default=8, help="examples per step (default: 8)")
    q.add_argument("--lr", type=POSITIVE, default=lr, help=f"peak learning rate (default: {lr:g}{lr_note})")
    q.add_argument("--min-lr", type=NOT_NEGATIVE, help="final learning rate of the decay (default: lr/10)")
    q.add_argument("--warmup", type=AT_LEAST_0, default=warmup, help=f"linear warm-up steps (default: {warmup})")
    q.add_argument("--weight-decay", type=NOT_NEGATIVE, default=0.1)
    q.add_argument("--grad-clip", type=NOT_NEGATIVE, default=1.0, help="max gradient norm; 0 turns clipping off")
    add_schedule_options(q)


def add_schedule_options(q) -> None:
    """--schedule and --decay-fraction: the learning rate's shape after warm-up."""
    q.add_argument("--schedule", choices=["cosine", "wsd", "linear", "constant"], default="cosine",
                   help="the learning rate after warm-up: cosine decay to --min-lr, wsd (stable, then a linear "
                        "decay over the last --decay-fraction of the steps), linear decay, or constant")
    q.add_argument("--decay-fraction", type=PROBABILITY, default=0.2,
                   help="with --schedule wsd: the share of the steps spent decaying")


def add_lora_options(q) -> None:
    """--lora R --lora-alpha A --lora-targets PATTERNS, for a finetune verb."""
    q.add_argument("--lora", type=AT_LEAST_1, metavar="R", help="train rank-R LoRA adapters instead of the weights")
    q.add_argument("--lora-alpha", type=POSITIVE, metavar="A", help="LoRA scale numerator: updates scale by A/R "
                   "(default: 2R)")
    q.add_argument("--lora-targets", metavar="PATTERNS",
                   help="comma-separated module patterns that get adapters, matched against the end of each "
                        "matrix's module path (default: attn.qkv,attn.proj,mlp.*)")


def add_record_options(q) -> None:
    """--split --limit --seed --precision: how a verb on instruction records (instruct, dpo) splits,
    shuffles and computes."""
    q.add_argument("--split", default="0.85,0.05,0.1", metavar="TRAIN,VAL,TEST",
                   help="fractions of the records after a seeded shuffle (default: 0.85,0.05,0.1, the book's)")
    q.add_argument("--limit", type=AT_LEAST_1, metavar="N", help="use only the first N records (a quick trial)")
    q.add_argument("--seed", type=SEED, default=123, help="the split, the batch order, dropout (default: 123)")
    q.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast compute dtype; weights stay fp32")


def add_log_option(q) -> None:
    """--log, for every verb that trains: where its metrics go besides RUN/metrics.jsonl."""
    q.add_argument("--log", choices=("none", "tensorboard"), default="none",
                   help="also log the metrics for a viewer: tensorboard writes TensorBoard event files to "
                        "RUN/tensorboard (watch with `tensorboard --logdir runs/`; needs the tensorboard package); "
                        "metrics.jsonl is always written (default: none)")


def check_log_option(args) -> None:
    """--log tensorboard without the package installed: one line before any work, not an error after it."""
    if args.log != "none":
        from lmspec.runtime.train.watch import check_log
        check_log(args.log)


def fail(verb: str, err: UserError | str) -> int:
    """Print a user error as the CLI's main does, and its exit code, for a handler that must return
    rather than raise: a rank of torchrun leaves its process group before it exits."""
    print(err.report(verb) if isinstance(err, UserError) else f"lmspec {verb}: error: {err}", file=sys.stderr)
    return err.exit_code if isinstance(err, UserError) else 1
