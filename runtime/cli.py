"""The `lmspec` command line: check | info | train | sample.

Each verb imports what it needs when it runs, so `check` and `info` never import torch.
A mistake in the user's input ends as a located message and a non-zero exit, not a traceback.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from lmspec.dsl.diagnostics import SpecError

from .usage import UsageError, cli_overrides

EXAMPLES = {
    "check": """examples:
  lmspec check specs/gpt2.arch
  lmspec check 'specs/**/*.arch' --format json
  lmspec check specs/ --set layers=4""",
    "info": """examples:
  lmspec info specs/gpt2.arch
  lmspec info specs/gpt2.arch --set layers=4 --set dim=256 --seq 512
  lmspec info specs/gpt2.arch --graph gpt2.svg""",
    "train": """examples:
  lmspec train specs/tiny.arch                      # embedded corpus (CPython's docs), char-level
  lmspec train specs/shakespeare-char.arch --data ../shared/data/tinyshakespeare.txt --steps 2000
  lmspec train specs/gpt2.arch --set layers=4 --set dim=256 --data corpus/ --tokenizer tok.json
  lmspec train specs/tiny.arch --out runs/tiny --resume   # continue a stopped run""",
    "sample": """examples:
  lmspec sample runs/tiny --prompt "The " --max-tokens 200
  lmspec sample runs/tiny/checkpoints/step_000500 --temperature 0.8 --top-k 40 --seed 1""",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmspec",
        description="Build a language model from a spec: check it, inspect it, train it, sample from it.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def verb(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def override_options(q):
        q.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="override a hyper-parameter of the spec (repeatable)")
        q.add_argument("--model", help="the model to use when a file defines several")

    c = verb("check", "Check spec files and report every error, located, before anything runs.")
    c.add_argument("paths", nargs="+", metavar="PATH", help="spec files, directories or glob patterns")
    c.add_argument("--format", choices=["human", "json"], default="human")
    override_options(c)

    i = verb("info", "Parameters, FLOPs per token and a per-block breakdown of a spec.")
    i.add_argument("spec")
    i.add_argument("--seq", type=int, help="sequence length for FLOP counts (default: the context)")
    i.add_argument("--graph", metavar="FILE", help="also draw the graph to FILE (.dot, .svg, .png, .pdf)")
    i.add_argument("--format", choices=["human", "json"], default="human")
    override_options(i)

    t = verb("train", "Train a spec on a text corpus (next-token cross-entropy, AdamW).")
    t.add_argument("spec")
    override_options(t)
    t.add_argument("--data", help="a text file or a directory of .txt files (default: CPython's docs)")
    t.add_argument("--tokenizer", help="a Hugging Face tokenizers JSON file (default: characters)")
    t.add_argument("--out", help="run directory for checkpoints and logs (default: runs/<spec name>)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.add_argument("--steps", type=int, help="optimizer steps in all (default: 500, or the resumed run's)")
    t.add_argument("--batch", type=int, default=12)
    t.add_argument("--seq", type=int, help="training sequence length (default: the model's context)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default: lr/10)")
    t.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--beta2", type=float, default=0.95, help="AdamW's second-moment decay (nanoGPT's char model: 0.99)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--eval-batches", type=int, default=20)
    t.add_argument("--ckpt-every", type=int, default=100)
    t.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--sample-tokens", type=int, default=200, help="print a sample this long at the end (0: none)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = verb("sample", "Generate text from a checkpoint, using the KV cache.")
    s.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    s.add_argument("--prompt", default="", help="text to continue (default: empty)")
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int)
    return p


def _expand(paths: list[str]) -> list[str]:
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "*.arch"), recursive=True))
        elif any(ch in p for ch in "*?["):
            matched = sorted(glob.glob(p, recursive=True))
            if not matched:
                raise UsageError(f"no files match {p}")
            files += matched
        else:
            files.append(p)
    return files


def cmd_check(args) -> int:
    from lmspec.compiler import check_file
    overrides = cli_overrides(args.set)
    files = _expand(args.paths)
    found = []
    for path in files:
        diagnostics, sources = check_file(path, overrides)
        found.append((diagnostics, sources))
    errors = sum(len(d) for d, _ in found)
    if args.format == "json":
        print(json.dumps([d.to_dict() for ds, _ in found for d in ds], indent=2))
    else:
        for diagnostics, sources in found:
            for d in diagnostics:
                print(d.render(sources), file=sys.stderr)
        status = "ok" if not errors else f"{errors} error{'s' * (errors != 1)}"
        print(f"checked {len(files)} file{'s' * (len(files) != 1)}: {status}")
    return 1 if errors else 0


def cmd_info(args) -> int:
    from lmspec.compiler import load_spec
    from lmspec.compiler.analysis import breakdown, flops_per_token, parameter_count
    from lmspec.compiler.shapes import fmt_shape
    graph = load_spec(args.spec, cli_overrides(args.set), args.model)
    if args.seq is not None and args.seq < 1:
        raise UsageError("--seq must be positive")
    seq = args.seq or graph.context
    params = parameter_count(graph)
    fpt = flops_per_token(graph, seq)
    groups = breakdown(graph, seq)
    tied = [p.name for p in graph.params.values() if p.tied_to]
    if args.format == "json":
        print(json.dumps({
            "model": graph.name, "file": graph.file, "hyper_parameters": graph.hyper,
            "parameters": params, "seq": seq, "forward_flops_per_token": fpt,
            "training_flops_per_token": 3 * fpt, "tied": tied,
            "breakdown": [{"name": g.name, "count": g.count, "parameters": g.params, "forward_flops": g.flops}
                          for g in groups],
        }, indent=2))
    else:
        print(f"model {graph.name}  ({graph.file})")
        print("  " + "  ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in graph.hyper.items()))
        for node_id in graph.inputs:
            data = graph.g.nodes[node_id]
            shape = ", ".join(f"{d} <= {graph.bounds[str(d)]}" if str(d) in graph.bounds else str(d)
                              for d in data["outputs"][0][0])
            print(f"  input  {data['label']}: {data['outputs'][0][1]}[{shape}]")
        for name, ref in graph.outputs:
            print(f"  output {name}: {ref.dtype}{fmt_shape(ref.shape)}")
        print(f"parameters: {params:,}" + (f"  (tied: {', '.join(tied)})" if tied else ""))
        print(f"FLOPs per token at seq {seq}: {fpt / 1e6:,.1f} M forward, {3 * fpt / 1e6:,.1f} M training")
        print(f"\n  {'part':<24}{'parameters':>16}{'fwd MFLOPs/token':>20}")
        tokens = seq
        for g in groups:
            if not g.params and not g.flops:
                continue
            name = g.name if g.count == 1 else f"{g.name} (x{g.count})"
            per = "each" if g.count > 1 else ""
            print(f"  {name:<24}{g.params:>16,}{g.flops / tokens / 1e6:>20,.2f} {per}")
    if args.graph:
        from .graph_render import write_graph
        try:
            write_graph(graph, args.graph)
        except ValueError as err:
            raise UsageError(str(err)) from None
        except OSError as err:
            raise UsageError(f"cannot write {args.graph}: {err.strerror}") from None
        print(f"graph written to {args.graph}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"check": cmd_check, "info": cmd_info}
    try:
        if args.verb in ("train", "sample"):
            from . import commands
            return getattr(commands, f"cmd_{args.verb}")(args)
        return handlers[args.verb](args)
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except UsageError as err:
        print(f"lmspec {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in lmspec, not in the input: say so briefly
        if os.environ.get("LMSPEC_DEBUG"):
            raise
        print(f"lmspec {args.verb}: internal error: {type(err).__name__}: {err}\n"
              f"(this is a bug in lmspec; run with LMSPEC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
