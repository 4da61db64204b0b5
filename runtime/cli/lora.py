"""`lmspec lora merge`: fold a checkpoint's LoRA adapters into its weights, as a plain checkpoint."""
from __future__ import annotations

from pathlib import Path

from lmspec.compiler.lora import adapted_matrices, is_lora, merge_lora
from lmspec.runtime.cli.verb import Verb, option_output
from lmspec.runtime.errors import CheckpointError


def lora_merge_options(p) -> None:
    """`lmspec lora merge`'s options."""
    p.add_argument("checkpoint", help="a finetuning run (or one of its checkpoints) trained with --lora")
    p.add_argument("-o", "--out", required=True, help="the run directory to create for the merged checkpoint")


def cmd_lora_merge(args) -> int:
    from lmspec.compiler.lower import lower
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.checkpoint.store import find_checkpoint, save_checkpoint
    from lmspec.runtime.finetune.lora import merged_spec_record

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CheckpointError(f"--out {args.out} is a file, not a run directory")
    if find_checkpoint(args.out) is not None:
        raise CheckpointError(f"{args.out} already holds a run; choose another --out")
    loaded = load_model(args.checkpoint)  # adapters on their base, which must be there unchanged
    ckpt = loaded.checkpoint
    if not is_lora(loaded.graph):
        raise CheckpointError(f"{ckpt.path}: has no LoRA adapters to merge (it was not trained with --lora)")
    graph, weights = merge_lora(loaded.graph, loaded.model.state_dict())
    plain = lower(graph)
    plain.load_state_dict(weights, strict=True)
    final = save_checkpoint(Path(args.out), step=ckpt.step, model=plain, optimizer=None, rng=None,
                            train_config=ckpt.train_config, metrics=ckpt.metrics, tokenizer=ckpt.tokenizer,
                            spec=merged_spec_record(loaded.spec))
    print(f"merged the adapters of {len(adapted_matrices(loaded.graph))} matrices into {final}")
    return 0


LORA_MERGE = Verb(
    "lora merge",
    ("Fold a checkpoint's LoRA adapters into its base weights: a plain checkpoint that samples and exports like"
     " any other."),
    lora_merge_options, cmd_lora_merge, outputs=(option_output("out", directory=True),),
    examples="""examples:
  lmspec lora merge runs/spam-lora --out runs/spam-merged
  lmspec export runs/spam-merged -o exported/""",
)
