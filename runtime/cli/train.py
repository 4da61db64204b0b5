"""`lmspec train` and `lmspec sample`: parse, call the training stage (runtime/train/run.py, loop.py), print."""
from __future__ import annotations

from lmspec.dsl.diagnostics import SpecError
from lmspec.dsl.errors import UserError
from lmspec.runtime.cli.options import (
    add_log_option, add_override_options, add_sampling_options, add_schedule_options, check_log_option, fail
)
from lmspec.runtime.cli.numbers import AT_LEAST_0, AT_LEAST_1, NOT_NEGATIVE, POSITIVE, SEED, SHARE, THREADS
from lmspec.runtime.cli.verb import Output, Verb
from lmspec.runtime.distributed.device import add_device_option, device_name
from lmspec.runtime.errors import CheckpointError, UsageError, WriteError


def train_options(p) -> None:
    """`lmspec train`'s options."""
    p.add_argument("spec", help="the model's spec file (or `spec = ...` in a --config file)")
    add_override_options(p)
    p.add_argument("--data", help="a corpus file (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet), a `datasets` "
                   "directory, a directory of such files, or token shards from `lmspec data tokenize` "
                   "(default: CPython's docs)")
    p.add_argument("--text-field", default="text", help="the field of a JSON record or Parquet/datasets column "
                   "that holds the text")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizers JSON file (default: characters)")
    p.add_argument("-o", "--out", help="run directory for checkpoints and logs (default: runs/<spec name>)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (an imported model, another run, a merged finetune) "
                        "with a fresh optimizer and schedule: continued pretraining. Its tokenizer is the run's; a "
                        "spec its weights do not fit is refused, as `lmspec diff` would report it")
    p.add_argument("--steps", type=AT_LEAST_1, help="optimizer steps in all (default: 500, or the resumed run's)")
    p.add_argument("--batch", type=AT_LEAST_1, default=12)
    p.add_argument("--seq", type=AT_LEAST_1, help="training sequence length (default: the model's context)")
    p.add_argument("--lr", type=POSITIVE, default=1e-3)
    p.add_argument("--min-lr", type=NOT_NEGATIVE, help="final learning rate of the decay (default: lr/10)")
    p.add_argument("--warmup", type=AT_LEAST_0, default=100, help="linear warm-up steps")
    add_schedule_options(p)
    p.add_argument("--weight-decay", type=NOT_NEGATIVE, default=0.1)
    p.add_argument("--beta2", type=SHARE, default=0.95, help="AdamW's second-moment decay (nanoGPT's char model: 0.99)")
    p.add_argument("--grad-clip", type=NOT_NEGATIVE, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--grad-accum", type=AT_LEAST_1, default=1, help="micro-batches per optimizer step")
    p.add_argument("--eval-every", type=AT_LEAST_0, default=100, help="steps between evaluations (0: only at the end)")
    p.add_argument("--eval-batches", type=AT_LEAST_0, default=20, help="validation batches per evaluation (0: none)")
    p.add_argument("--ckpt-every", type=AT_LEAST_0, default=100,
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep", type=AT_LEAST_1, default=3, help="checkpoints to keep")
    p.add_argument("--seed", type=SEED, default=1337)
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
    p.add_argument("--tp", type=AT_LEAST_1, metavar="N",
                   help="under torchrun: tensor parallel, each layer split over N ranks (Megatron-style, "
                        "DTensor; the split comes from the graph: `lmspec info --tp N` shows it). Combines with "
                        "--pp; ranks beyond tp x pp are data-parallel replicas (mesh pp x dp x tp, tp fastest)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="with --tp: Megatron's sequence parallelism, the residual stream and norms split along the "
                        "sequence between attention and MLP (less activation memory, the same bytes sent)")
    p.add_argument("--pp", type=AT_LEAST_1, metavar="N",
                   help="under torchrun: pipeline parallel, the model cut into N stages at block boundaries "
                        "(`lmspec info --pp N` shows the cut), run with torch.distributed.pipelining")
    p.add_argument("--micro-batches", type=AT_LEAST_1, metavar="M",
                   help="with --pp: micro-batches each batch is split into (default: one per stage)")
    p.add_argument("--pp-schedule", choices=["1f1b", "gpipe"], help="with --pp: the pipeline schedule (default: 1f1b)")
    p.add_argument("--pad-vocab", type=AT_LEAST_1, metavar="N",
                   help="round the model's vocab up to a multiple of N (64 or 128 suit a GPU's matrix units); the "
                        "extra rows are never a token, and sample, eval, export and finetuning see the real vocab")
    add_device_option(p)
    p.add_argument("--peak-tflops", type=POSITIVE, metavar="T",
                   help="peak dense bf16 TFLOP/s of one device, for MFU in the metrics (default: a table of common "
                        "GPUs; on a CPU MFU is reported only when this is given)")
    p.add_argument("--threads", type=THREADS, help="torch CPU threads")
    p.add_argument("--sample-tokens", type=AT_LEAST_0, default=200, help="print a sample this long at the end (0: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_log_option(p)


def cmd_train(args) -> int:
    import torch

    from lmspec.runtime.distributed import world as distributed
    from lmspec.runtime.distributed.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    world = distributed.world_from_environment()  # torchrun's ranks; a world of one otherwise
    try:  # before the process group: NCCL wants each rank's GPU chosen first
        device = resolve_device(args.device)
        check_log_option(args)  # --log tensorboard without the package: said before any rank starts
    except UsageError:
        if world.main:
            raise
        return 1  # every rank finds the same mistake: rank 0 alone says it
    if (args.tp or 1) > 1 or (args.pp or 1) > 1 or args.sequence_parallel:
        try:  # a spec that cannot split fails here, before any process group exists
            from lmspec.runtime.train.run import check_model_parallel
            check_model_parallel(args, world)
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


def _run_dir(args) -> str:
    from lmspec.runtime.checkpoint.layout import run_directory
    return str(run_directory(args.out, args.spec))


TRAIN = Verb(
    "train",
    "Train a spec on a text corpus (next-token cross-entropy, AdamW).",
    train_options, cmd_train, outputs=(Output(_run_dir, directory=True, run=True),),
    config_file=True,
    examples="""examples:
  lmspec train specs/tiny.arch                      # embedded corpus (CPython's docs), char-level
  lmspec train specs/shakespeare-char.arch --data ../shared/data/tinyshakespeare.txt --steps 2000
  lmspec train specs/gpt2.arch --set layers=4 --set dim=256 --data corpus/ --tokenizer tok.json
  lmspec train specs/tiny.arch --out runs/tiny --resume   # continue a stopped run
  lmspec train --config specs/recipes/shakespeare-char.toml     # a recipe; flags given here override it
  lmspec train --config runs/tiny/config.toml --out runs/tiny-again   # repeat a run
  lmspec train specs/qwen3-0.6b.arch --init-from runs/qwen3-imported --data shards/ --lr 1e-4 --schedule wsd
  lmspec train specs/tiny.arch --log tensorboard    # watch it: tensorboard --logdir runs/ (or lmspec plot runs/tiny)
  lmspec train specs/gpt2.arch --precision bf16 --activation-checkpointing --compile --data shards/
  lmspec train specs/gpt2.arch --device cuda:1 --precision bf16 --compile --pad-vocab 64 --batch 16 --seq 1024
  lmspec train specs/tiny.arch --device cpu --peak-tflops 2   # MFU in the metrics against a CPU's peak
  torchrun --nproc-per-node 8 -m lmspec train specs/gpt2.arch --strategy fsdp --data shards/
  torchrun --nproc-per-node 2 -m lmspec train specs/llama3.2-1b.arch --tp 2 --data shards/
  torchrun --nproc-per-node 4 -m lmspec train specs/gpt2.arch --pp 4 --micro-batches 8 --batch 16
  torchrun --nproc-per-node 8 -m lmspec train specs/llama3.2-1b.arch --tp 2 --pp 2 --micro-batches 4 --batch 8   # 2 replicas""",
)


def _train_in_world(args, world, device, backend: str | None = None) -> int:
    import torch

    from lmspec.runtime.checkpoint.layout import write_run_options
    from lmspec.runtime.train import run as runs
    from lmspec.runtime.train.loop import train
    from lmspec.runtime.train.sampling import encode_prompt, generate
    from lmspec.runtime.train.steps import slow_autocast_note
    from lmspec.runtime.train.throughput import start_peak_memory

    # on the CPU the peak is the process's resident set, which Python and torch fill before any tensor
    # of the run exists: what the plan predicts is compared with the peak above it
    held_before = start_peak_memory(device)
    run = None
    try:
        run = runs.prepare(args, world)
        if world.main:
            write_run_options(run.run_dir, args.run_options)
            print(run.describe(world, device, backend))
            if note := slow_autocast_note(device, run.cfg.precision):
                print(note)
        summary = train(run.model, run.tokenizer, run.data, run.cfg, str(run.run_dir), spec=run.spec,
                        resume=args.resume, progress=not args.no_progress, world=world,
                        tensor_parallel_plan=run.tensor_parallel_plan, pipeline_stages=run.pipeline_stages,
                        graph=run.graph, device=device, peak_tflops=args.peak_tflops, log_to=args.log,
                        init_from=run.init_from)
    except WriteError as err:  # a full disk mid-run: say what is safe to resume from
        from lmspec.runtime.checkpoint.store import find_checkpoint
        run_dir = runs.run_directory(args.out, args.spec)
        last = find_checkpoint(run_dir) if run_dir.is_dir() else None
        return fail("train", f"{err}; " + (f"the last checkpoint, {last}, is intact: free some space and resume "
                                           f"with --resume" if last else "no checkpoint was written yet"))
    except UserError as err:  # reported here: a rank of torchrun must leave its process group, below
        return fail("train", err)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not runs.is_out_of_memory(err):
            raise
        if run is None:
            return fail("train", f"out of memory on {device_name(device)} before the model was built")
        return fail("train", runs.out_of_memory_message(run.graph, run.cfg, world, device, run.tp, run.pp,
                                                        run.run_dir))
    if not world.main:
        return 0
    print(_summary_line(summary, held_before))
    if args.sample_tokens > 0:
        model, tokenizer = run.model, run.tokenizer
        if run.padding is not None or (world.size > 1 and (run.cfg.strategy == "fsdp" or run.tp * run.pp > 1)):
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


def _summary_line(s: dict, held_before: int | None = None) -> str:
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
            above = (f", {(s['peak_memory_bytes'] - held_before) / 1e9:.2f} GB above the {held_before / 1e9:.2f} GB "
                     f"held before the model and data" if held_before and s['peak_memory_bytes'] > held_before else "")
            line += f"{above} (lmspec plan predicted {s['predicted_memory_bytes'] / 1e9:.2f} GB)"
    line += f", {s['elapsed']:.0f} s\ncheckpoint {s['checkpoint']}\nloss curve {s['plot']}"
    return line


def sample_options(p) -> None:
    """`lmspec sample`'s options."""
    p.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    add_sampling_options(p)
    add_device_option(p)


def cmd_sample(args) -> int:
    import torch

    from lmspec.runtime.data.tokenizer import load_tokenizer
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
