"""`lmspec train` and `lmspec sample`: the verbs that need torch, joined to the compiler."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from lmspec.compiler import load_spec
from lmspec.dsl.diagnostics import SpecError
from lmspec.compiler.graph import ModelGraph
from lmspec.compiler.rewrites import graph_from_record, spec_record  # noqa: F401  (spec_record: imported from here too)
from lmspec.compiler.vocab_padding import padded, padding_of

from lmspec.runtime.checkpoint.store import CheckpointError, find_checkpoint, load_checkpoint
from lmspec.runtime.errors import UsageError
from lmspec.runtime.cli.options import cli_overrides
from lmspec.runtime.data.corpus import DataError, default_corpus_text, read_text_data
from lmspec.runtime.distributed.device import device_name
from lmspec.runtime.data.tokenizer import CharTokenizer, FileTokenizer, TokenizerError, load_tokenizer

USER_ERRORS = (CheckpointError, DataError, TokenizerError)


def _fail(verb: str, err: Exception) -> int:
    print(f"lmspec {verb}: error: {err}", file=sys.stderr)
    return 1


def _vocab_size(graph: ModelGraph) -> int | None:
    """The last dim of the model's logits, the number of tokens it can predict."""
    _, ref = graph.outputs[0]
    return ref.shape[-1] if ref.shape and isinstance(ref.shape[-1], int) else None


def _build_for_tokenizer(spec: str, overrides: dict, model: str | None, tokenizer) -> tuple[ModelGraph, dict]:
    """Build the graph; a `vocab` hyper-parameter not set by hand follows the tokenizer."""
    graph = load_spec(spec, overrides, model)
    if "vocab" in graph.hyper and "vocab" not in overrides and graph.hyper["vocab"] != tokenizer.vocab_size:
        overrides = {**overrides, "vocab": tokenizer.vocab_size}
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one line rather than one per rank
            print(f"vocab = {tokenizer.vocab_size} (from the tokenizer)")
        graph = load_spec(spec, overrides, model)
    return graph, overrides


def _pad_vocab(spec: str, overrides: dict, model: str | None, graph: ModelGraph, multiple: int
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


def _shard_data(path: str, replicas=None):
    """Token shards written by `lmspec data tokenize` (memory-mapped), or None for plain text.
    Under torchrun each data-parallel replica reads its own windows."""
    from lmspec.runtime.data.shards import META_FILE, ShardData
    if not (Path(path) / META_FILE).is_file():
        return None
    return ShardData(path, rank=replicas.rank, world_size=replicas.size) if replicas else ShardData(path)


def _run_tokenizer(args, ckpt, shards, text):
    """The checkpoint's tokenizer on resume, else the shards' own, a --tokenizer file's, or the
    corpus's characters; shards only train a model whose tokenizer wrote them."""
    if ckpt is not None:
        tokenizer = load_tokenizer(ckpt.tokenizer)
    elif shards is not None:
        tokenizer = shards.tokenizer()
    else:
        return FileTokenizer.from_path(args.tokenizer) if args.tokenizer else CharTokenizer.from_text(text)
    if shards is not None:
        written_with = shards.tokenizer().to_json()
        given = [tokenizer] + ([FileTokenizer.from_path(args.tokenizer)] if args.tokenizer else [])
        if any(t.to_json() != written_with for t in given):
            raise UsageError(f"{args.data} was tokenized with another tokenizer than this run's")
    return tokenizer


def cmd_train(args) -> int:
    import torch
    from lmspec.runtime.distributed import world as distributed
    from lmspec.runtime.distributed.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    world = distributed.world_from_environment()  # torchrun's ranks; a world of one otherwise
    try:  # before the process group: NCCL wants each rank's GPU chosen first
        device = resolve_device(args.device)
    except UsageError:
        if world.main:
            raise
        return 1  # every rank finds the same mistake: rank 0 alone says it
    if (args.tp or 1) > 1 or (args.pp or 1) > 1 or args.sequence_parallel:
        try:  # a spec that cannot split fails here, before any process group exists
            _check_model_parallel(args, world)
        except (SpecError, UsageError):
            if world.main:
                raise
            return 1  # every rank finds the same mistake: rank 0 alone says it
    backend = distributed.join(world, device)
    try:
        code = _train_in_world(args, world, device, backend)
    finally:
        distributed.leave(world)
    distributed.exit_rank(world, code)
    return code


def _check_model_parallel(args, world) -> None:
    """--tp N and/or --pp M: the world holds whole model-parallel groups of N x M ranks (the rest of
    its size is data-parallel replicas), and the spec splits that way."""
    from lmspec.compiler.pipeline_stages import pipeline_stages
    from lmspec.compiler.tensor_parallel import tensor_parallel_plan

    from lmspec.runtime.train.loop import pipeline_refusal
    tp, pp = args.tp or 1, args.pp or 1
    if args.sequence_parallel and tp == 1:
        raise UsageError("--sequence-parallel splits the sequence over the tensor-parallel ranks: give --tp N")
    flags = " ".join(f"{f} {n}" for f, n in (("--tp", tp), ("--pp", pp)) if n > 1)
    if pp > 1 and (refusal := pipeline_refusal(args.precision, args.compile)):
        raise UsageError(refusal)
    if world.size % (tp * pp):
        raise UsageError(f"{flags} splits each copy of the model over {tp * pp} ranks: run a multiple of "
                         f"{tp * pp} (torchrun --nproc-per-node {tp * pp}), not {world.size}")
    if not args.resume:
        graph = load_spec(args.spec, cli_overrides(args.set), args.model)
        if tp > 1:
            tensor_parallel_plan(graph, tp, sequence_parallel=args.sequence_parallel)
        if pp > 1:
            pipeline_stages(graph, pp)


def _train_in_world(args, world, device, backend: str | None = None) -> int:
    import torch
    from lmspec.compiler.lower import build
    from lmspec.runtime.data.token_data import TokenData
    from lmspec.runtime.train.sampling import encode_prompt, generate
    from lmspec.runtime.train.loop import ConfigError, TrainConfig, TrainingError, train

    run_dir = Path(args.out or os.path.join("runs", Path(args.spec).stem))
    tp, pp = args.tp or 1, args.pp or 1
    replicas = world.data_parallel(tp, pp)  # the ranks of one model-parallel group read the same batches
    graph = cfg = None
    try:
        existing = find_checkpoint(run_dir) if run_dir.exists() else None
        if args.resume and existing is None:
            raise UsageError(f"--resume: no checkpoint in {run_dir}")
        if existing is not None and not args.resume:
            raise UsageError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
        ckpt = load_checkpoint(run_dir) if args.resume else None
        shards = _shard_data(args.data, replicas) if args.data else None
        text = None if shards else (read_text_data(args.data) if args.data else default_corpus_text())
        tokenizer = _run_tokenizer(args, ckpt, shards, text)
        if ckpt is not None:
            graph = graph_from_record(ckpt.spec)
            overrides, padding = ckpt.spec["overrides"], padding_of(ckpt.spec)
        else:
            graph, overrides = _build_for_tokenizer(args.spec, cli_overrides(args.set), args.model, tokenizer)
            padding = None
            if args.pad_vocab:
                graph, overrides, padding = _pad_vocab(args.spec, overrides, args.model, graph, args.pad_vocab)
        vocab = _vocab_size(graph)
        if vocab is None or vocab < tokenizer.vocab_size:
            raise UsageError(f"the model predicts {vocab} tokens but the tokenizer has {tokenizer.vocab_size}; "
                             f"set --set vocab={tokenizer.vocab_size}")
        if args.resume:  # the run's own settings; --steps may change, to extend it, and so may the
            # ways of running it that leave the numbers alone (activation checkpointing, compile)
            saved = TrainConfig.from_dict(ckpt.train_config)
            cfg = dataclasses.replace(saved, steps=args.steps or saved.steps,
                                      activation_checkpointing=args.activation_checkpointing
                                      or saved.activation_checkpointing,
                                      compile=args.compile or saved.compile,
                                      strategy=args.strategy or saved.strategy, cpu_offload=args.cpu_offload,
                                      micro_batches=args.micro_batches or saved.micro_batches,
                                      pipeline_schedule=args.pp_schedule or saved.pipeline_schedule)
        else:
            cfg = TrainConfig(
                steps=args.steps or 500, batch=args.batch, seq=args.seq, lr=args.lr, min_lr=args.min_lr,
                warmup=args.warmup, weight_decay=args.weight_decay, betas=(0.9, args.beta2),
                grad_clip=args.grad_clip, grad_accum=args.grad_accum, eval_every=args.eval_every,
                eval_batches=args.eval_batches, ckpt_every=args.ckpt_every, keep=args.keep, seed=args.seed,
                precision=args.precision, activation_checkpointing=args.activation_checkpointing,
                compile=args.compile, strategy=args.strategy or "ddp", cpu_offload=args.cpu_offload,
                micro_batches=args.micro_batches or 0, pipeline_schedule=args.pp_schedule or "1f1b",
            )
        seq = cfg.seq or graph.context
        if graph.context is not None and seq > graph.context:
            raise UsageError(f"--seq {seq} is longer than the model's context {graph.context}")
        data = shards or TokenData(torch.tensor(tokenizer.encode(text), dtype=torch.long), rank=replicas.rank,
                                   world_size=replicas.size)
        data.check_seq(seq)
        model = build(graph)  # on `meta`: train() gives each rank the weights of its own part, on `device`
        plan = stages = None
        if tp > 1:
            from lmspec.compiler.tensor_parallel import tensor_parallel_plan
            # the graph as trained: its vocab may follow the tokenizer
            plan = tensor_parallel_plan(graph, tp, sequence_parallel=args.sequence_parallel)
        if pp > 1:
            from lmspec.compiler.pipeline_stages import pipeline_stages
            stages = pipeline_stages(graph, pp, seq)
        if world.main:
            data_parallel = f"{cfg.strategy.upper()} {replicas.size}" if replicas.size > 1 else ""
            layout = " x ".join(part for part in (data_parallel, f"TP {tp}" * (tp > 1), f"PP {pp}" * (pp > 1)) if part)
            layout = layout if tp * pp > 1 else cfg.strategy.upper()
            layout += ", CPU offload" if cfg.cpu_offload else ""
            ranks = f" on {world.size} ranks ({layout})" if world.size > 1 else " on 1 rank" if backend else ""
            ranks += f" over {backend}" if backend else ""
            print(f"model {graph.name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
                  f"{len(data.train):,} training and {len(data.val):,} validation tokens; run dir {run_dir}{ranks}; "
                  f"device {device_name(device)}")
        summary = train(model, tokenizer, data, cfg, str(run_dir), spec=spec_record(graph, overrides,
                                                                                      vocab_padding=padding),
                        resume=args.resume, progress=not args.no_progress, world=world,
                        tensor_parallel_plan=plan, pipeline_stages=stages, graph=graph, device=device,
                        peak_tflops=args.peak_tflops)
    except (*USER_ERRORS, ConfigError, TrainingError) as err:
        return _fail("train", err)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        if graph is None or cfg is None:
            return _fail("train", f"out of memory on {device_name(device)} before the model was built")
        return _fail("train", out_of_memory_message(graph, cfg, world, device, tp, pp, run_dir))
    if not world.main:
        return 0
    print(_summary_line(summary))
    if args.sample_tokens > 0:
        if padding is not None or (world.size > 1 and (cfg.strategy == "fsdp" or tp * pp > 1)):
            # rank 0 holds a part, or a padded vocabulary: sample the saved whole, as `lmspec sample` would
            from lmspec.runtime.checkpoint.models import load_model
            model = load_model(summary["checkpoint"], device).model
        prompt = encode_prompt(tokenizer, "")
        model.eval()
        new = generate(model, prompt, args.sample_tokens, temperature=0.8, top_k=40, seed=args.seed,
                       eot_id=tokenizer.eot_id)
        print("--- sample ---")
        print(tokenizer.decode(prompt + new))
    return 0


def _out_of_memory(err: BaseException) -> bool:
    """A GPU's out-of-memory error, or the CPU allocator's (a RuntimeError that says so)."""
    import torch
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def out_of_memory_message(graph, cfg, world, device, tp: int, pp: int, run_dir: Path) -> str:
    """What ran out, what `lmspec plan` says this run needs and what fits, and which checkpoint is
    intact: a checkpoint is written to a temporary name and renamed, so running out mid-save
    leaves the one before."""
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


def _summary_line(s: dict) -> str:
    line = f"done: step {s['steps']}, train loss {s['loss']:.4f}"
    if s.get("val_loss") is not None:
        line += f", val loss {s['val_loss']:.4f} (best {s['best_val_loss']:.4f})"
    if s.get("tokens_per_s"):
        line += f", {s['tokens_per_s']:,.0f} tokens/s"
    if s.get("mfu") is not None:
        line += f", MFU {s['mfu']:.1%}"
    if s.get("peak_memory_bytes"):
        line += f"\npeak memory {s['peak_memory_bytes'] / 1e9:.2f} GB on {s['device']}"
        if s.get("predicted_memory_bytes"):
            line += f" (lmspec plan predicted {s['predicted_memory_bytes'] / 1e9:.2f} GB)"
    line += f", {s['elapsed']:.0f} s\ncheckpoint {s['checkpoint']}\nloss curve {s['plot']}"
    return line


def cmd_sample(args) -> int:
    import torch
    from lmspec.runtime.distributed.device import resolve_device
    from lmspec.runtime.train.sampling import check_arguments, encode_prompt, generate

    device = resolve_device(args.device)
    try:
        check_arguments([0], args.max_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise UsageError(str(err)) from None
    from lmspec.runtime.checkpoint.models import load_model
    try:
        loaded = load_model(args.checkpoint, device)  # any checkpoint: rewrites applied, adapters on their base
        from lmspec.runtime.finetune.classifier import classify_record
        if classify_record(loaded.checkpoint) is not None:
            raise CheckpointError(f"{loaded.checkpoint.path}: is a classifier, which predicts labels rather than "
                                  f"tokens; use `lmspec classify`")
        tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
        model = loaded.model
        prompt = encode_prompt(tokenizer, args.prompt)
        with torch.no_grad():
            new = generate(model, prompt, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, eot_id=tokenizer.eot_id)
    except USER_ERRORS as err:
        return _fail("sample", err)
    print(tokenizer.decode(prompt + new))
    return 0
