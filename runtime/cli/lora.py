"""`lmspec lora merge`: fold a checkpoint's LoRA adapters into its weights, as a plain checkpoint."""
from __future__ import annotations

from pathlib import Path

from lmspec.compiler.lora import adapted_matrices, is_lora, merge_lora, rewrites_without_lora
from lmspec.compiler.lower import lower
from lmspec.compiler.rewrites import RewriteError

from lmspec.runtime.checkpoint.store import CheckpointError, find_checkpoint, save_checkpoint
from lmspec.runtime.cli.train import USER_ERRORS, _fail
from lmspec.runtime.checkpoint.models import load_model


def merged_spec_record(spec: dict) -> dict:
    """A merged checkpoint's spec record: no LoRA rewrite (other rewrites kept), no base, since it
    holds every weight itself."""
    record = {k: v for k, v in spec.items() if k not in ("base", "rewrites")}
    rewrites = rewrites_without_lora(spec.get("rewrites", []))
    return record | ({"rewrites": rewrites} if rewrites else {})


def cmd_lora_merge(args) -> int:
    try:
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
    except (*USER_ERRORS, RewriteError) as err:
        return _fail("lora merge", err)
    print(f"merged the adapters of {len(adapted_matrices(loaded.graph))} matrices into {final}")
    return 0
