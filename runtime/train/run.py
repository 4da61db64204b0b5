"""A training run as `lmspec train` describes it, up to the loop: the tokenizer and data it reads, the
model built from its spec (or from the run it resumes) with a vocabulary that fits the tokenizer, its
settings, and its layout over the ranks; and what to say when the device runs out of memory.

`settings` is the train verb's parsed options (runtime/cli/train.py) or any object with the same
attributes.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from lmspec.compiler import load_spec, parse_overrides
from lmspec.compiler.graph import ModelGraph
from lmspec.compiler.rewrites import graph_from_record, spec_record
from lmspec.compiler.vocab_padding import padded, padding_of
from lmspec.runtime.checkpoint.layout import run_directory
from lmspec.runtime.data.corpus import default_corpus_text, read_text_data
from lmspec.runtime.distributed.device import device_name
from lmspec.runtime.distributed.world import World
from lmspec.runtime.errors import UsageError
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.context import check_seq_fits


def overrides_of(settings) -> dict:
    """The hyper-parameters `--set NAME=VALUE` overrides."""
    try:
        return parse_overrides(settings.set)
    except ValueError as err:
        raise UsageError(str(err)) from None


@dataclass
class Run:
    """Everything a run needs before its loop starts."""
    run_dir: Path
    graph: ModelGraph
    spec: dict  # the record its checkpoints keep
    padding: dict | None
    tokenizer: object
    data: object
    cfg: TrainConfig
    model: object  # built on `meta`: train() gives each rank the weights of its part
    tensor_parallel_plan: object = None
    pipeline_stages: list | None = None
    init_from: object = None  # --init-from: the Checkpoint whose weights a fresh run starts with

    @property
    def tp(self) -> int:
        return self.tensor_parallel_plan.tp if self.tensor_parallel_plan is not None else 1

    @property
    def pp(self) -> int:
        return len(self.pipeline_stages) if self.pipeline_stages else 1

    def describe(self, world: World, device, backend: str | None) -> str:
        """The line a run starts with: the model, its data, its directory and its layout."""
        replicas = world.data_parallel(self.tp, self.pp)
        data_parallel = f"{self.cfg.strategy.upper()} {replicas.size}" if replicas.size > 1 else ""
        layout = " x ".join(part for part in (data_parallel, f"TP {self.tp}" * (self.tp > 1),
                                              f"PP {self.pp}" * (self.pp > 1)) if part)
        layout = layout if self.tp * self.pp > 1 else self.cfg.strategy.upper()
        layout += ", CPU offload" if self.cfg.cpu_offload else ""
        ranks = f" on {world.size} ranks ({layout})" if world.size > 1 else " on 1 rank" if backend else ""
        ranks += f" over {backend}" if backend else ""
        return (f"model {self.graph.name}: {sum(p.numel() for p in self.model.parameters()):,} parameters; "
                f"{len(self.data.train):,} training and {len(self.data.val):,} validation tokens; run dir "
                f"{self.run_dir}{ranks}; device {device_name(device)}")


def prepare(settings, world: World) -> Run:
    """The run `settings` ask for: a fresh one (refusing a directory that holds a run) or, with
    --resume, the run in --out with its own tokenizer, spec and trajectory settings."""
    import torch

    from lmspec.compiler.lower import build
    from lmspec.runtime.checkpoint.store import find_checkpoint, load_checkpoint
    from lmspec.runtime.data.token_data import TokenData

    run_dir = run_directory(settings.out, settings.spec)
    tp, pp = settings.tp or 1, settings.pp or 1
    replicas = world.data_parallel(tp, pp)  # the ranks of one model-parallel group read the same batches
    existing = find_checkpoint(run_dir) if run_dir.exists() else None
    if settings.resume and existing is None:
        raise UsageError(f"--resume: no checkpoint in {run_dir}")
    if existing is not None and not settings.resume:
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
    ckpt = load_checkpoint(run_dir) if settings.resume else None
    # a resumed run goes on from its own checkpoint; a fresh one may start from another's weights
    init = _init_checkpoint(settings.init_from) if getattr(settings, "init_from", None) and ckpt is None else None
    if init is not None:
        graph, overrides = graph_for_init(settings, graph_from_record(init.spec))  # checked before any data is read
    shards = shard_data(settings.data, replicas) if settings.data else None
    text = None if shards else (read_text_data(settings.data, getattr(settings, "text_field", "text"))
                                if settings.data else default_corpus_text())
    tokenizer = run_tokenizer(settings, ckpt or init, shards, text)
    if ckpt is not None:
        graph = graph_from_record(ckpt.spec)
        overrides, padding = ckpt.spec["overrides"], padding_of(ckpt.spec)
    elif init is not None:
        padding = None
    else:
        graph, overrides = build_for_tokenizer(settings.spec, overrides_of(settings), settings.model, tokenizer)
        padding = None
        if settings.pad_vocab:
            graph, overrides, padding = pad_vocab(settings.spec, overrides, settings.model, graph, settings.pad_vocab)
    vocab = vocab_size(graph)
    if vocab is None or vocab < tokenizer.vocab_size:
        raise UsageError(f"the model predicts {vocab} tokens but the tokenizer has {tokenizer.vocab_size}; "
                         f"set --set vocab={tokenizer.vocab_size}")
    cfg = config_of(settings, ckpt)
    seq = cfg.seq or graph.context
    check_seq_fits(seq, graph)
    data = shards or TokenData(torch.tensor(tokenizer.encode(text), dtype=torch.long), rank=replicas.rank,
                               world_size=replicas.size)
    data.check_seq(seq)
    plan = stages = None
    if tp > 1:
        from lmspec.compiler.tensor_parallel import tensor_parallel_plan

        # the graph as trained: its vocab may follow the tokenizer
        plan = tensor_parallel_plan(graph, tp, sequence_parallel=settings.sequence_parallel)
    if pp > 1:
        from lmspec.compiler.pipeline_stages import pipeline_stages
        stages = pipeline_stages(graph, pp, seq)
    return Run(run_dir, graph, spec_record(graph, overrides, vocab_padding=padding), padding, tokenizer, data, cfg,
               build(graph), plan, stages, init)


def _init_checkpoint(path: str):
    from lmspec.runtime.checkpoint.store import load_checkpoint
    from lmspec.runtime.errors import CheckpointError
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"--init-from: {err}") from None


def graph_for_init(settings, init_graph: ModelGraph) -> tuple[ModelGraph, dict]:
    """The spec's graph for a run starting from a checkpoint of `init_graph`, and its overrides: a
    `vocab` not set by hand is the checkpoint's (an imported model's may exceed its tokenizer's).
    Raises CheckpointError, with what `lmspec diff` says, when the checkpoint's weights do not load into it."""
    from lmspec.compiler.spec_diff import spec_diff
    from lmspec.compiler.spec_diff_text import render
    from lmspec.runtime.checkpoint.header import read_checkpoint_tensors
    from lmspec.runtime.errors import CheckpointError

    if settings.pad_vocab:
        raise UsageError("--pad-vocab with --init-from: the checkpoint's vocabulary is what the run trains")
    overrides = overrides_of(settings)
    graph = load_spec(settings.spec, overrides, settings.model)
    vocab = vocab_size(init_graph)
    if "vocab" in graph.hyper and "vocab" not in overrides and vocab is not None and graph.hyper["vocab"] != vocab:
        overrides = {**overrides, "vocab": vocab}
        graph = load_spec(settings.spec, overrides, settings.model)
    held = read_checkpoint_tensors(settings.init_from)
    if held.base is not None:
        raise UsageError(f"--init-from {settings.init_from}: holds LoRA adapters only; merge them into their base "
                         f"first (lmspec lora merge) and start from the merged checkpoint")
    diff = spec_diff(held.graph, graph, old_stored=held.stored)
    if diff.breaking:
        raise CheckpointError(f"--init-from {settings.init_from}: its weights do not load into {settings.spec}, "
                              f"as `lmspec diff {settings.init_from} {settings.spec}` says:\n"
                              + render(f"model {held.graph.name}  (checkpoint {held.path})",
                                       f"model {graph.name}  (spec {settings.spec})", diff))
    return graph, overrides


def config_of(settings, ckpt) -> TrainConfig:
    """The TrainConfig `settings` ask for; on resume the run's own, where --steps may change (to extend
    it) and so may the ways of running it that leave the numbers alone (checkpointing, compile, layout)."""
    if ckpt is not None:
        saved = TrainConfig.from_dict(ckpt.train_config)
        return dataclasses.replace(saved, steps=saved.steps if settings.steps is None else settings.steps,
                                   activation_checkpointing=settings.activation_checkpointing
                                   or saved.activation_checkpointing,
                                   compile=settings.compile or saved.compile,
                                   strategy=settings.strategy or saved.strategy, cpu_offload=settings.cpu_offload,
                                   micro_batches=settings.micro_batches or saved.micro_batches,
                                   pipeline_schedule=settings.pp_schedule or saved.pipeline_schedule)
    return TrainConfig(
        steps=500 if settings.steps is None else settings.steps, batch=settings.batch, seq=settings.seq,
        lr=settings.lr, min_lr=settings.min_lr, warmup=settings.warmup, weight_decay=settings.weight_decay,
        betas=(0.9, settings.beta2),
        grad_clip=settings.grad_clip, grad_accum=settings.grad_accum, eval_every=settings.eval_every,
        eval_batches=settings.eval_batches, ckpt_every=settings.ckpt_every, keep=settings.keep, seed=settings.seed,
        precision=settings.precision, activation_checkpointing=settings.activation_checkpointing,
        compile=settings.compile, strategy=settings.strategy or "ddp", cpu_offload=settings.cpu_offload,
        micro_batches=settings.micro_batches or 0, pipeline_schedule=settings.pp_schedule or "1f1b",
        schedule=settings.schedule, decay_fraction=settings.decay_fraction,
    )


def check_model_parallel(settings, world) -> None:
    """--tp N and/or --pp M: the world holds whole model-parallel groups of N x M ranks (the rest of
    its size is data-parallel replicas), and the spec splits that way."""
    from lmspec.compiler.pipeline_stages import pipeline_stages
    from lmspec.compiler.tensor_parallel import tensor_parallel_plan
    from lmspec.runtime.train.steps import pipeline_refusal
    tp, pp = settings.tp or 1, settings.pp or 1
    if settings.sequence_parallel and tp == 1:
        raise UsageError("--sequence-parallel splits the sequence over the tensor-parallel ranks: give --tp N")
    flags = " ".join(f"{f} {n}" for f, n in (("--tp", tp), ("--pp", pp)) if n > 1)
    if pp > 1 and (refusal := pipeline_refusal(settings.precision, settings.compile)):
        raise UsageError(refusal)
    if world.size % (tp * pp):
        raise UsageError(f"{flags} splits each copy of the model over {tp * pp} ranks: run a multiple of "
                         f"{tp * pp} (torchrun --nproc-per-node {tp * pp}), not {world.size}")
    if not settings.resume:
        graph = load_spec(settings.spec, overrides_of(settings), settings.model)
        if tp > 1:
            tensor_parallel_plan(graph, tp, sequence_parallel=settings.sequence_parallel)
        if pp > 1:
            pipeline_stages(graph, pp)


def vocab_size(graph: ModelGraph) -> int | None:
    """The last dim of the model's logits, the number of tokens it can predict."""
    _, ref = graph.outputs[0]
    return ref.shape[-1] if ref.shape and isinstance(ref.shape[-1], int) else None


def build_for_tokenizer(spec: str, overrides: dict, model: str | None, tokenizer) -> tuple[ModelGraph, dict]:
    """Build the graph; a `vocab` hyper-parameter not set by hand follows the tokenizer."""
    graph = load_spec(spec, overrides, model)
    if "vocab" in graph.hyper and "vocab" not in overrides and graph.hyper["vocab"] != tokenizer.vocab_size:
        overrides = {**overrides, "vocab": tokenizer.vocab_size}
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one line rather than one per rank
            print(f"vocab = {tokenizer.vocab_size} (from the tokenizer)")
        graph = load_spec(spec, overrides, model)
    return graph, overrides


def pad_vocab(spec: str, overrides: dict, model: str | None, graph: ModelGraph, multiple: int
               ) -> tuple[ModelGraph, dict, dict | None]:
    """--pad-vocab N: the graph with its `vocab` rounded up to a multiple of N, the overrides that
    build it, and the padding to record (None when the vocab is a multiple already)."""
    if multiple < 1:
        raise UsageError(f"--pad-vocab {multiple}: give a positive multiple, such as 64 or 128")
    if "vocab" not in graph.hyper:
        raise UsageError(f"--pad-vocab: {spec} has no `vocab` hyper-parameter to pad")
    real = graph.hyper["vocab"]
    size = padded(real, multiple)
    if size == real:
        return graph, overrides, None
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"vocab = {size} (padded from {real} to a multiple of {multiple}; sample, eval and export see {real})")
    overrides = {**overrides, "vocab": size}
    return load_spec(spec, overrides, model), overrides, {"vocab": real, "multiple": multiple}


def shard_data(path: str, replicas=None):
    """Token shards written by `lmspec data tokenize` (memory-mapped), or None for plain text.
    Under torchrun each data-parallel replica reads its own windows."""
    from lmspec.runtime.data.shards import META_FILE, ShardData
    if not (Path(path) / META_FILE).is_file():
        return None
    return ShardData(path, rank=replicas.rank, world_size=replicas.size) if replicas else ShardData(path)


def run_tokenizer(settings, ckpt, shards, text):
    """The checkpoint's tokenizer (the run resumed, or --init-from's), else the shards' own, a --tokenizer file's, or the
    corpus's characters; shards only train a model whose tokenizer wrote them."""
    from lmspec.runtime.data.tokenizer import CharTokenizer, FileTokenizer, load_tokenizer
    if ckpt is not None:
        tokenizer = load_tokenizer(ckpt.tokenizer)
    elif shards is not None:
        tokenizer = shards.tokenizer()
    else:
        return FileTokenizer.from_path(settings.tokenizer) if settings.tokenizer else CharTokenizer.from_text(text)
    if shards is not None:
        written_with = shards.tokenizer().to_json()
        given = [tokenizer] + ([FileTokenizer.from_path(settings.tokenizer)] if settings.tokenizer else [])
        if any(t.to_json() != written_with for t in given):
            raise UsageError(f"{settings.data} was tokenized with another tokenizer than this run's")
    return tokenizer


def is_out_of_memory(err: BaseException) -> bool:
    """A GPU's out-of-memory error, or the CPU allocator's (a RuntimeError that says so)."""
    import torch
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def out_of_memory_message(graph, cfg, world, device, tp: int, pp: int, run_dir: Path) -> str:
    """What ran out, what `lmspec plan` says this run needs and what fits, and which checkpoint is
    intact: a checkpoint is written to a temporary name and renamed, so running out mid-save
    leaves the one before."""
    from lmspec.runtime.checkpoint.store import find_checkpoint
    from lmspec.runtime.train.throughput import device_capacity, gigabytes, largest_fitting_batch, predicted_memory
    seq = cfg.seq or graph.context
    run = dataclasses.replace(cfg, seq=seq, tensor_parallel=tp, pipeline_parallel=pp)
    capacity = device_capacity(device)
    where = device_name(device) + (f", {gigabytes(capacity)}" if capacity else "")
    parts = [f"out of memory on {where} training --batch {cfg.batch} x --seq {seq} ({cfg.precision}"
             f"{', activation checkpointing' if cfg.activation_checkpointing else ''})"]
    need = predicted_memory(graph, run, world.size)
    if need is not None:
        parts.append(f"lmspec plan predicts {gigabytes(need)} per device for it")
    fits = largest_fitting_batch(graph, run, world.size, capacity) if capacity else None
    if fits:
        accum = -(-cfg.batch * cfg.grad_accum // fits)
        parts.append(f"by its estimate --batch {fits} fits (with --grad-accum {accum} for about the same global batch)")
    elif capacity and not cfg.activation_checkpointing:
        parts.append("try --activation-checkpointing, or more GPUs (lmspec plan --gpus N)")
    last = find_checkpoint(run_dir) if run_dir.exists() else None
    parts.append(f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written yet")
    return "; ".join(parts)
