"""Command-line options of `lmspec eval`."""
from __future__ import annotations

from lmspec.runtime.distributed.device import add_device_option

# Which part of the data `eval` scores; eval_commands (which imports torch) loads only when it runs.
SPLITS = ("all", "train", "validation", "test")


def add_eval_verbs(verb, top) -> None:
    e = verb("eval", "Measure a checkpoint: a language model's perplexity on text or shards, a classifier's "
             "accuracy on labelled texts, an instruction-tuned model's answer loss (and its answers).",
             "cli.eval:cmd_eval", top, examples="""examples:
  lmspec eval runs/tiny --data ../shared/data/the-verdict.txt             # perplexity, windows of the context
  lmspec eval runs/gpt2 --data shards/ --split validation --seq 512 --max-tokens 1000000 --format json
  lmspec eval runs/spam                      # the test split it was finetuned with: accuracy, confusion matrix
  lmspec eval runs/spam --data new-sms.tsv --out spam-eval.json
  lmspec eval runs/gpt2-instruct --responses answers.jsonl      # test answers, for judging""")
    e.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    e.add_argument("--data", help="a language model: a text file, a directory of .txt files or a shards directory; "
                   "a classifier: labelled .tsv/.csv/.jsonl; instruction-tuned: JSON/JSONL records "
                   "(default for the last two: the data it was finetuned on)")
    e.add_argument("--split", choices=SPLITS,
                   help="the part to score: train/validation as `train` or finetuning cut it, test as finetuning "
                        "cut it (default: test on a finetuned checkpoint's own data, else all)")
    e.add_argument("--seq", type=int, help="tokens per window for a language model (default: the context)")
    e.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens (language model)")
    e.add_argument("--batch", type=int, default=8, help="windows, texts or records per forward pass (default: 8)")
    e.add_argument("--text-field", default="text", help="a classifier's text field or header column (default: text)")
    e.add_argument("--label-field", default="label", help="its label field or header column (default: label)")
    e.add_argument("--responses", metavar="FILE", help="instruction-tuned: write greedy answers to the scored "
                   "records as JSONL (each record plus \"model_response\")")
    e.add_argument("--response-tokens", type=int, default=256, help="the longest answer (default: 256)")
    e.add_argument("--out", metavar="FILE", help="also write the result as a JSON file")
    e.add_argument("--format", choices=["human", "json"], default="human",
                   help="json: print one JSON object (for CI)")
    add_device_option(e)
    e.add_argument("--threads", type=int, help="torch CPU threads")
