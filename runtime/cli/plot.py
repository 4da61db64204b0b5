"""`lmspec plot`: several runs' loss and learning-rate curves over each other, as one PNG
(runtime/train/plots.py draws them)."""
from __future__ import annotations

from lmspec.runtime.cli.verb import Verb, option_output


def plot_options(p) -> None:
    """`lmspec plot`'s options."""
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each holding metrics.jsonl), of "
                   "`lmspec train` or a finetune verb; a run still training plots what it has logged so far")
    p.add_argument("-o", "--out", required=True, metavar="PNG", help="the PNG to write")
    p.add_argument("--x", choices=["steps", "tokens"], default="steps",
                   help="the x axis: optimizer steps, or tokens trained (each step's batch x seq x grad-accum x "
                        "data-parallel ranks; `lmspec train` runs only, not finetuning runs) (default: steps)")


def cmd_plot(args) -> int:
    from lmspec.runtime.train.plots import plot_runs, read_runs

    runs = read_runs(args.runs)
    plot_runs(runs, args.out, args.x)
    print(f"{args.out}: {len(runs)} run{'s' * (len(runs) > 1)} ({', '.join(run.label for run in runs)}) "
          f"against {args.x}")
    return 0


PLOT = Verb(
    "plot",
    "Draw runs' loss (validation as markers) and learning rate over each other into one PNG.",
    plot_options, cmd_plot, outputs=(option_output("out", directory=False),),
    examples="""examples:
  lmspec plot runs/tiny -o tiny.png                                   # one run, as it trains
  lmspec plot runs/gpt2-lr1e-3 runs/gpt2-lr3e-4 -o lr.png             # two runs compared, step by step
  lmspec plot runs/gpt2 runs/llama --x tokens -o by-tokens.png        # different batches: compare by tokens""",
)
