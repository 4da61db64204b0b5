"""Command-line options every `finetune` verb takes (the optimiser's, LoRA's), and `lora merge`."""
from __future__ import annotations


def add_optimizer_options(q, *, lr: float, warmup: int, lr_note: str = "") -> None:
    """The optimiser's settings: --batch --lr --min-lr --warmup --weight-decay --grad-clip."""
    q.add_argument("--batch", type=int, default=8, help="examples per step (default: 8)")
    q.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr:g}{lr_note})")
    q.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default: lr/10)")
    q.add_argument("--warmup", type=int, default=warmup, help=f"linear warm-up steps (default: {warmup})")
    q.add_argument("--weight-decay", type=float, default=0.1)
    q.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 turns clipping off")


def add_lora_options(q) -> None:
    """--lora R --lora-alpha A --lora-targets PATTERNS, for a finetune verb."""
    q.add_argument("--lora", type=int, metavar="R", help="train rank-R LoRA adapters instead of the weights")
    q.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA scale numerator: updates scale by A/R "
                   "(default: 2R)")
    q.add_argument("--lora-targets", default="attn.qkv,attn.proj,mlp.*", metavar="PATTERNS",
                   help="comma-separated module patterns that get adapters, matched against the end of each "
                        "matrix's module path (default: attn.qkv,attn.proj,mlp.*)")


def add_lora_verbs(verb, lora_group) -> None:
    m = verb("merge", "Fold a checkpoint's LoRA adapters into its base weights: a plain checkpoint that "
             "samples and exports like any other.", "cli.lora:cmd_lora_merge", lora_group, "lora ",
             examples="""examples:
  lmspec lora merge runs/spam-lora --out runs/spam-merged
  lmspec export runs/spam-merged -o exported/""")
    m.add_argument("checkpoint", help="a finetuning run (or one of its checkpoints) trained with --lora")
    m.add_argument("--out", required=True, help="the run directory to create for the merged checkpoint")
