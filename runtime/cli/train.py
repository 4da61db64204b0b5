"""`lmspec train` and `lmspec sample`: the verbs that need torch, joined to the compiler."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lmspec.compiler import load_spec
from lmspec.dsl.diagnostics import SpecError
from lmspec.compiler.graph import ModelGraph
from lmspec.compiler.rewrites import graph_from_record, spec_record  # noqa: F401  (spec_record: imported from here too)
from lmspec.compiler.vocab_padding import padded, padding_of

from lmspec.runtime.errors import UsageError
from lmspec.dsl.errors import UserError
from lmspec.runtime.cli.options import cli_overrides, fail
from lmspec.runtime.data.corpus import default_corpus_text, read_text_data
from lmspec.runtime.distributed.device import device_name
from lmspec.runtime.cli.verb import Verb
from lmspec.runtime.cli.options import add_override_options
from lmspec.runtime.distributed.device import add_device_option
from lmspec.runtime.errors import CheckpointError


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
    from lmspec.runtime.data.tokenizer import CharTokenizer, FileTokenizer, load_tokenizer
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


def train_options(p) -> None:
    """`lmspec train`'s options."""
    p.add_argument("spec")
    add_override_options(p)
    p.add_argument("--data", help="a text file or a directory of .txt files (default: CPython's docs)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizers JSON file (default: characters)")
    p.add_argument("--out", help="run directory for checkpoints and logs (default: runs/<spec name>)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--steps", type=int, help="optimizer steps in all (default: 500, or the resumed run's)")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--seq", type=int, help="training sequence length (default: the model's context)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default: lr/10)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW's second-moment decay (nanoGPT's char model: 0.99)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="mixed precision: autocast to bf16 or fp16 (with loss scaling); weights stay fp32")
    p.add_argument("--activation-checkpointing", nargs="?", const="all", metavar="BLOCKS",
                   help="recompute each block's activations in the backward pass instead of keeping them: "
                        "all blocks, or names/patterns such as 'block.0,block.1?'")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--strategy", choices=["ddp", "fsdp"],
                   help="under torchrun: ddp replicates the model on every rank, fsdp (FSDP2) shards weights, "
                        "gradients and optimizer state per block over the data-parallel ranks (with --tp/--pp: "
                        "each stage's tp shards over the replicas) (default: ddp, or the resumed run's)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="with --strategy fsdp: keep the sharded weights, gradients and AdamW state in host memory "
                        "(FSDP2 CPUOffloadPolicy), for a model whose state does not fit the GPUs (`lmspec plan` says when)")
    p.add_argument("--tp", type=int, metavar="N",
                   help="under torchrun: tensor parallel, each layer split over N ranks (Megatron-style, "
                        "DTensor; the split comes from the graph: `lmspec info --tp N` shows it). Combines with "
                        "--pp; ranks beyond tp x pp are data-parallel replicas (mesh pp x dp x tp, tp fastest)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="with --tp: Megatron's sequence parallelism, the residual stream and norms split along the "
                        "sequence between attention and MLP (less activation memory, the same bytes sent)")
    p.add_argument("--pp", type=int, metavar="N",
                   help="under torchrun: pipeline parallel, the model cut into N stages at block boundaries "
                        "(`lmspec info --pp N` shows the cut), run with torch.distributed.pipelining")
    p.add_argument("--micro-batches", type=int, metavar="M",
                   help="with --pp: micro-batches each batch is split into (default: one per stage)")
    p.add_argument("--pp-schedule", choices=["1f1b", "gpipe"], help="with --pp: the pipeline schedule (default: 1f1b)")
    p.add_argument("--pad-vocab", type=int, metavar="N",
                   help="round the model's vocab up to a multiple of N (64 or 128 suit a GPU's matrix units); the "
                        "extra rows are never a token, and sample, eval, export and finetuning see the real vocab")
    add_device_option(p)
    p.add_argument("--peak-tflops", type=float, metavar="T",
                   help="peak dense bf16 TFLOP/s of one device, for MFU in the metrics (default: a table of common "
                        "GPUs; on a CPU MFU is reported only when this is given)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--sample-tokens", type=int, default=200, help="print a sample this long at the end (0: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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


TRAIN = Verb(
    "train",
    "Train a spec on a text corpus (next-token cross-entropy, AdamW).",
    train_options, cmd_train,
    examples="""examples:
  lmspec train specs/tiny.arch                      # embedded corpus (CPython's docs), char-level
  lmspec train specs/shakespeare-char.arch --data ../shared/data/tinyshakespeare.txt --steps 2000
  lmspec train specs/gpt2.arch --set layers=4 --set dim=256 --data corpus/ --tokenizer tok.json
  lmspec train specs/tiny.arch --out runs/tiny --resume   # continue a stopped run
  lmspec train specs/gpt2.arch --precision bf16 --activation-checkpointing --compile --data shards/
  lmspec train specs/gpt2.arch --device cuda:1 --precision bf16 --compile --pad-vocab 64 --batch 16 --seq 1024
  lmspec train specs/tiny.arch --device cpu --peak-tflops 2   # MFU in the metrics against a CPU's peak
  torchrun --nproc-per-node 8 -m lmspec.runtime train specs/gpt2.arch --strategy fsdp --data shards/
  torchrun --nproc-per-node 2 -m lmspec.runtime train specs/llama3.2-1b.arch --tp 2 --data shards/
  torchrun --nproc-per-node 4 -m lmspec.runtime train specs/gpt2.arch --pp 4 --micro-batches 8 --batch 16
  torchrun --nproc-per-node 8 -m lmspec.runtime train specs/llama3.2-1b.arch --tp 2 --pp 2 --micro-batches 4 --batch 8   # 2 replicas""",
)


def _check_model_parallel(args, world) -> None:
    """--tp N and/or --pp M: the world holds whole model-parallel groups of N x M ranks (the rest of
    its size is data-parallel replicas), and the spec splits that way."""
    from lmspec.compiler.pipeline_stages import pipeline_stages
    from lmspec.compiler.tensor_parallel import tensor_parallel_plan

    from lmspec.runtime.train.steps import pipeline_refusal
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
    from lmspec.runtime.checkpoint.store import find_checkpoint, load_checkpoint
    import torch
    from lmspec.compiler.lower import build
    from lmspec.runtime.data.token_data import TokenData
    from lmspec.runtime.train.sampling import encode_prompt, generate
    from lmspec.runtime.train.config import TrainConfig
    from lmspec.runtime.train.loop import train

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
    except UserError as err:  # reported here: a rank of torchrun must leave its process group, below
        return fail("train", err)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        if graph is None or cfg is None:
            return fail("train", f"out of memory on {device_name(device)} before the model was built")
        return fail("train", out_of_memory_message(graph, cfg, world, device, tp, pp, run_dir))
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


def sample_options(p) -> None:
    """`lmspec sample`'s options."""
    p.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    add_device_option(p)


def cmd_sample(args) -> int:
    from lmspec.runtime.data.tokenizer import load_tokenizer
    import torch
    from lmspec.runtime.distributed.device import resolve_device
    from lmspec.runtime.train.sampling import check_arguments, encode_prompt, generate

    device = resolve_device(args.device)
    try:
        check_arguments([0], args.max_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise UsageError(str(err)) from None
    from lmspec.runtime.checkpoint.models import load_model
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
    print(tokenizer.decode(prompt + new))
    return 0


SAMPLE = Verb(
    "sample",
    "Generate text from a checkpoint, using the KV cache.",
    sample_options, cmd_sample,
    examples="""examples:
  lmspec sample runs/tiny --prompt "The " --max-tokens 200
  lmspec sample runs/tiny/checkpoints/step_000500 --temperature 0.8 --top-k 40 --seed 1
  lmspec sample runs/gpt2 --device cuda --prompt "Once upon a time" """,
)
