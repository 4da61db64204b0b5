"""`lmspec check` and `lmspec info`: they read specs only, and never import torch."""
from __future__ import annotations

import glob
import json
import os
import sys

from lmspec.runtime.atomic import write_bytes_atomically
from lmspec.runtime.cli.numbers import AT_LEAST_1
from lmspec.runtime.cli.options import add_override_options, cli_overrides
from lmspec.runtime.cli.verb import Verb, option_output
from lmspec.runtime.errors import UsageError
from lmspec.runtime.train.context import check_seq_fits


def expand_spec_paths(paths: list[str]) -> list[str]:
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "*.arch"), recursive=True))
            if not found:  # in CI, a wrong directory must not pass as "checked 0 files: ok"
                raise UsageError(f"no .arch files in {p}")
            files += found
        elif any(ch in p for ch in "*?["):
            matched = sorted(glob.glob(p, recursive=True))
            if not matched:
                raise UsageError(f"no files match {p}")
            files += matched
        else:
            files.append(p)
    return files


def _use_colour(choice: str, stream) -> bool:
    if choice != "auto":
        return choice == "always"
    # https://no-color.org: any non-empty NO_COLOR turns colour off
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def check_options(p) -> None:
    """`lmspec check`'s options."""
    p.add_argument("paths", nargs="+", metavar="PATH", help="spec files, directories or glob patterns")
    p.add_argument("--format", choices=["human", "json", "github", "sarif"], default="human",
                   help="human (default: source line and caret, on stderr), json (a list of diagnostics), "
                        "github (GitHub Actions annotations), sarif (SARIF 2.1.0 for code scanning)")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 1 on any)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the human format: auto (default) when stderr is a terminal and NO_COLOR is unset")
    add_override_options(p)


def cmd_check(args) -> int:
    from lmspec.compiler import check_file
    from lmspec.dsl import diagnostic_formats
    from lmspec.dsl.diagnostics import render_all
    overrides = cli_overrides(args.set)
    files = expand_spec_paths(args.paths)
    diagnostics, sources = [], {}
    for path in files:
        found, read = check_file(path, overrides)
        diagnostics += found
        sources |= read
    if args.strict:
        for d in diagnostics:
            d.severity = "error"
    errors = sum(d.severity == "error" for d in diagnostics)
    warnings = len(diagnostics) - errors
    if args.format == "json":
        print(diagnostic_formats.to_json(diagnostics))
    elif args.format == "github":
        if diagnostics:
            print(diagnostic_formats.to_github(diagnostics))
    elif args.format == "sarif":
        print(diagnostic_formats.to_sarif(diagnostics))
    else:
        colour = _use_colour(args.color, sys.stderr)
        if diagnostics:  # the first 100 (errors first), then a count of the rest: bounded however many
            print(render_all(diagnostics, sources, colour=colour), file=sys.stderr)
        counts = [f"{n} {word}{'s' * (n != 1)}" for n, word in ((errors, "error"), (warnings, "warning")) if n]
        print(f"checked {len(files)} file{'s' * (len(files) != 1)}: {', '.join(counts) or 'ok'}")
    return 1 if errors else 0


CHECK = Verb(
    "check",
    "Check spec files and report every error, located, before anything runs.",
    check_options, cmd_check,
    examples="""examples:
  lmspec check specs/gpt2.arch
  lmspec check 'specs/**/*.arch' --format json
  lmspec check specs/ --strict --format github     # in CI: warnings fail too, annotated on the PR
  lmspec check specs/ --format sarif > lmspec.sarif
  lmspec check specs/ --set layers=4""",
)


def info_options(p) -> None:
    """`lmspec info`'s options."""
    p.add_argument("spec")
    p.add_argument("--seq", type=AT_LEAST_1, help="sequence length for FLOP counts (default: the context)")
    p.add_argument("--graph", metavar="FILE", help="also draw the graph to FILE (.dot, .svg, .png, .pdf)")
    p.add_argument("--format", choices=["human", "json"], default="human")
    p.add_argument("--tp", type=AT_LEAST_1, metavar="N", help="also print how tensor parallelism over N ranks splits "
                   "every parameter (refused, located, when heads or sizes do not divide)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="with --tp: plan sequence parallelism too (refused, located, at an op that mixes positions)")
    p.add_argument("--pp", type=AT_LEAST_1, metavar="N", help="also print the N pipeline stages the model is cut into, "
                   "balanced by FLOPs and memory (at --seq)")
    add_override_options(p)


def cmd_info(args) -> int:
    from lmspec.compiler import load_spec
    from lmspec.compiler.analysis import (breakdown, flops_per_token, parameter_count, symbol_values,
                                          tokens_per_forward)
    from lmspec.compiler.shapes import fmt_shape
    graph = load_spec(args.spec, cli_overrides(args.set), args.model)
    check_seq_fits(args.seq, graph)
    tensor_plan = None
    if args.tp is not None:
        from lmspec.compiler.tensor_parallel import format_tensor_parallel_plan, tensor_parallel_plan
        # before printing anything: a SpecError is located
        tensor_plan = tensor_parallel_plan(graph, args.tp, sequence_parallel=getattr(args, "sequence_parallel", False))
    stages = None
    if args.pp is not None:
        from lmspec.compiler.pipeline_stages import format_pipeline_stages, pipeline_stages
        stages = pipeline_stages(graph, args.pp, args.seq or graph.context)
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
        } | ({"tensor_parallel": {
            "tp": tensor_plan.tp, "parameters_per_rank": tensor_plan.per_rank_parameters,
            "splits": [{"name": p.name, "shape": list(p.shape), "split": p.split, "dim": p.dim,
                        "local_shape": list(p.local_shape), "tied_to": p.tied_to}
                       for p in tensor_plan.params.values()],
        }} if tensor_plan else {}) | ({"pipeline_stages": [{
            "stage": st.index, "blocks": st.blocks, "holds_embedding": st.holds_embedding, "holds_head": st.holds_head,
            "parameters": st.parameter_count, "forward_flops_per_token": st.flops_per_token,
            "memory_bytes": st.memory_bytes,
        } for st in stages]} if stages else {}), indent=2))
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
        at = f" at seq {seq}" if seq is not None else ""  # a model of fixed shapes has no sequence length
        print(f"FLOPs per token{at}: {fpt / 1e6:,.1f} M forward, {3 * fpt / 1e6:,.1f} M training")
        print(f"\n  {'part':<24}{'parameters':>16}{'fwd MFLOPs/token':>20}")
        tokens = tokens_per_forward(graph, symbol_values(graph, seq))
        for g in groups:
            if not g.params and not g.flops:
                continue
            name = g.name if g.count == 1 else f"{g.name} (x{g.count})"
            per = "each" if g.count > 1 else ""
            print(f"  {name:<24}{g.params:>16,}{g.flops / tokens / 1e6:>20,.2f} {per}")
    if tensor_plan is not None and args.format != "json":
        print()
        print(format_tensor_parallel_plan(tensor_plan))
    if stages is not None and args.format != "json":
        print()
        print(format_pipeline_stages(stages))
    if args.graph:
        from lmspec.compiler.graph_render import render_graph
        try:
            write_bytes_atomically(args.graph, render_graph(graph, args.graph))
        except ValueError as err:
            raise UsageError(str(err)) from None
        except OSError as err:
            raise UsageError(f"cannot write {args.graph}: {err.strerror}") from None
        print(f"graph written to {args.graph}")
    return 0


INFO = Verb(
    "info",
    "Parameters, FLOPs per token and a per-block breakdown of a spec.",
    info_options, cmd_info, outputs=(option_output("graph", directory=False),),
    examples="""examples:
  lmspec info specs/gpt2.arch
  lmspec info specs/gpt2.arch --set layers=4 --set dim=256 --seq 512
  lmspec info specs/gpt2.arch --graph gpt2.svg
  lmspec info specs/llama3.2-1b.arch --tp 8           # how each parameter splits over 8 ranks
  lmspec info specs/llama3.1-8b.arch --pp 4 --seq 4096  # the 4 pipeline stages and their balance""",
)
