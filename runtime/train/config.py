"""The settings of a training run: a dataclass with its checks, and what a resumed run takes from its
checkpoint (the settings that shape what is trained) and may change (how long, how often)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lmspec.runtime.checkpoint.store import Checkpoint
from lmspec.runtime.errors import CheckpointError, ConfigError
from lmspec.runtime.train.schedule import SCHEDULES, learning_rate


@dataclass
class TrainConfig:
    steps: int = 500
    batch: int = 12
    seq: int | None = None  # None: the model's context
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batches: int = 20  # 0: never evaluate
    ckpt_every: int = 100  # 0: checkpoint only at the end
    keep: int = 3
    seed: int = 1337
    log_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast's compute dtype (fp16 with loss scaling)
    activation_checkpointing: str | None = None  # None, "all", or block names / patterns
    compile: bool = False  # torch.compile the training forward
    world_size: int = 1  # ranks the run trained on; `batch` is per rank, the global batch batch * world_size
    strategy: str = "ddp"  # with several ranks: ddp (replicated weights) or fsdp (sharded, FSDP2)
    cpu_offload: bool = False  # fsdp: sharded weights, gradients and AdamW state live in host memory
    tensor_parallel: int = 1  # ranks each layer is split over (DTensor); the data-parallel ranks are world / this
    pipeline_parallel: int = 1  # pipeline stages, one rank each (torch.distributed.pipelining)
    micro_batches: int = 0  # a pipeline's micro-batches per batch (0: as many as stages)
    pipeline_schedule: str = "1f1b"  # 1f1b | gpipe
    schedule: str = "cosine"  # the learning rate's: cosine | wsd | linear | constant (train/schedule.py)
    decay_fraction: float = 0.2  # wsd: the share of the steps spent decaying

    PRECISIONS = ("fp32", "bf16", "fp16")
    STRATEGIES = ("ddp", "fsdp")
    # Settings that shape what is trained; on resume they come from the checkpoint, because a
    # different value would make the continued run a different run. The others (steps, eval,
    # checkpoint and log cadence) may change on resume, e.g. to extend a run.
    TRAJECTORY = ("batch", "seq", "lr", "min_lr", "warmup", "weight_decay", "betas", "grad_clip",
                  "grad_accum", "seed", "precision", "schedule", "decay_fraction")

    def resolved(self, context: int) -> TrainConfig:
        """A copy with the defaults that depend on the model filled in, checked."""
        cfg = dataclasses.replace(
            self,
            seq=self.seq if self.seq is not None else context,
            min_lr=self.min_lr if self.min_lr is not None else self.lr / 10,
            betas=tuple(self.betas),
        )
        cfg._check(context)
        return cfg

    def _check(self, context: int) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name} {rule}, got {getattr(self, name)!r}")

        for name in ("steps", "batch", "grad_accum", "keep", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        for name in ("warmup", "eval_every", "eval_batches", "ckpt_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", "must be an integer >= 0 and < 2^63")
        need(isinstance(self.seq, int) and 1 <= self.seq <= context, "seq",
             f"must be between 1 and the model's context {context}")
        need(0 < self.lr < math.inf, "lr", "must be a finite number > 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"must be between 0 and lr ({self.lr})")
        need(0 <= self.weight_decay < math.inf, "weight_decay", "must be a finite number >= 0")
        # AdamW multiplies each decayed weight by 1 - lr x weight_decay at every step: at 1 or more that
        # zeroes or flips the weights, which no run wants
        if not self.lr * self.weight_decay < 1:
            raise ConfigError(f"lr x weight_decay must be below 1, got {self.lr:g} x {self.weight_decay:g} = "
                              f"{self.lr * self.weight_decay:g} (AdamW scales the weights by 1 minus it each step)")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(0 <= self.grad_clip < math.inf, "grad_clip", "must be a finite number >= 0 (0 turns clipping off)")
        need(self.precision in self.PRECISIONS, "precision", f"must be one of {', '.join(self.PRECISIONS)}")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        need(0 < self.decay_fraction <= 1, "decay_fraction", "must be in (0, 1]")
        need(self.strategy in self.STRATEGIES, "strategy", f"must be one of {', '.join(self.STRATEGIES)}")
        need(not self.cpu_offload or self.strategy == "fsdp", "cpu_offload", "needs strategy fsdp")
        # GradScaler unscales on the accelerator; offloaded gradients are on the host
        need(not self.cpu_offload or self.precision != "fp16", "cpu_offload", "does not combine with fp16 (use bf16)")

    def learning_rate(self, step: int) -> float:
        """The learning rate of 0-based optimizer step `step`, as the schedule says."""
        return learning_rate(step, max_lr=self.lr, min_lr=self.min_lr, warmup=self.warmup, decay_steps=self.steps,
                             schedule=self.schedule, decay_fraction=self.decay_fraction)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        cfg = cls(**values)
        cfg.betas = tuple(cfg.betas)
        return cfg


def config_for_resume(cfg: TrainConfig, checkpoint: Checkpoint) -> tuple[TrainConfig, dict]:
    """The given config with the trajectory settings taken from the checkpoint, and a record of
    the given values that were overridden ({name: {"given": ..., "used": ...}})."""
    try:
        saved = TrainConfig.from_dict(checkpoint.train_config)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{checkpoint.path}: unusable train_config in meta.json: {err}") from None
    changed = {}
    updates = {}
    for name in TrainConfig.TRAJECTORY:
        given, used = getattr(cfg, name), getattr(saved, name)
        if name == "betas":
            given, used = tuple(given), tuple(used)
        if given is not None and given != used:
            changed[name] = {"given": given, "used": used}
        updates[name] = used
    if saved.world_size != cfg.world_size:
        # Resumed on another number of ranks: keep the global batch, so the run goes on the same.
        global_batch = saved.batch * saved.world_size
        if global_batch % cfg.world_size:
            raise ConfigError(f"the run's global batch of {global_batch} sequences ({saved.world_size} ranks x "
                              f"{saved.batch}) does not divide over {cfg.world_size} ranks")
        updates["batch"] = global_batch // cfg.world_size
    return dataclasses.replace(cfg, **updates), changed
