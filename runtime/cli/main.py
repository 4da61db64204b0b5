"""The `lmspec` command line: check | fmt | diff | info | plan | train | sample | export | generate | serve | data | tokenizer | import | finetune | eval | …

Each verb imports what it needs when it runs, so `check`, `info` and `plan` never import torch.
A mistake in the user's input ends as a located message and a non-zero exit, not a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmspec.dsl.errors import UserError

from lmspec.runtime.cli.classify_options import add_classify_verbs
from lmspec.runtime.cli.diff_options import add_diff_verbs
from lmspec.runtime.cli.dpo_options import add_dpo_verbs
from lmspec.runtime.cli.eval_options import add_eval_verbs
from lmspec.runtime.cli.fmt_options import add_fmt_verbs
from lmspec.runtime.cli.instruct_options import add_instruct_verbs
from lmspec.runtime.cli.lora_options import add_lora_verbs
from lmspec.runtime.distributed.device import add_device_option
from lmspec.runtime.cli.options import add_provider_option

EXAMPLES = {
    "check": """examples:
  lmspec check specs/gpt2.arch
  lmspec check 'specs/**/*.arch' --format json
  lmspec check specs/ --strict --format github     # in CI: warnings fail too, annotated on the PR
  lmspec check specs/ --format sarif > lmspec.sarif
  lmspec check specs/ --set layers=4""",
    "info": """examples:
  lmspec info specs/gpt2.arch
  lmspec info specs/gpt2.arch --set layers=4 --set dim=256 --seq 512
  lmspec info specs/gpt2.arch --graph gpt2.svg
  lmspec info specs/llama3.2-1b.arch --tp 8           # how each parameter splits over 8 ranks
  lmspec info specs/llama3.1-8b.arch --pp 4 --seq 4096  # the 4 pipeline stages and their balance""",
    "plan": """examples:
  lmspec plan specs/llama3.1-8b.arch --gpus 8 --gpu-memory 80GB --seq 4096 --precision bf16
  lmspec plan specs/llama3.1-70b.arch --gpus 64 --gpu-memory 80GB --tokens 15T --precision bf16 --strategy fsdp
  lmspec plan specs/gpt2.arch --gpus 1 --gpu-memory 24GiB --compute 1e19 --micro-batch 8 --format json""",
    "train": """examples:
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
    "data prepare": """examples:
  lmspec data prepare corpus/ extra.jsonl --out prepared/
  lmspec data prepare dump.jsonl --text-field content --min-chars 200 --near-dup-threshold 0.7 --out prepared/""",
    "data tokenize": """examples:
  lmspec data tokenize prepared/ --tokenizer tok.json --out shards/
  lmspec data tokenize prepared/ --tokenizer ../shared/data/gpt2-tokenizer --out shards/ --val-fraction 0.05""",
    "tokenizer train": """examples:
  lmspec tokenizer train prepared/ --vocab-size 8192 --out tok.json
  lmspec tokenizer train ../shared/data/tinyshakespeare.txt --vocab-size 1024 --out shakespeare.json""",
    "tokenizer encode": """examples:
  lmspec tokenizer encode ../shared/data/gpt2-tokenizer "Hello, world."
  lmspec tokenizer encode tok.json --file ../shared/data/the-verdict.txt --count""",
    "tokenizer decode": """examples:
  lmspec tokenizer decode ../shared/data/gpt2-tokenizer 15496 11 995 13""",
    "export": """examples:
  lmspec export runs/tiny -o exported/tiny.onnx
  lmspec export runs/gpt2 -o exported/gpt2-int8.onnx --optimize --quantize int8
  lmspec export hf runs/qwen3 -o hf/qwen3       # a Hugging Face model directory (config.json, model.safetensors)""",
    "import hf": """examples:
  lmspec import hf ~/models/gpt2 --spec specs/gpt2.arch -o runs/gpt2
  lmspec import hf ~/models/Qwen3-0.6B --spec specs/qwen3-0.6b.arch -o runs/qwen3
  lmspec import hf ~/models/gpt2-tiny --emit-spec gpt2-tiny.arch -o runs/gpt2-tiny
  lmspec import hf ~/models/no-tokenizer --spec my.arch -o runs/x --tokenizer ../shared/data/gpt2-tokenizer""",
    "generate": """examples:
  lmspec generate exported/tiny.onnx --prompt "The " --max-tokens 100
  lmspec generate exported/tiny.onnx --prompt "def " --prompt "The module" --temperature 0
  lmspec generate exported/ --prompt "Q:" --stop "\\n" --top-p 0.9 --seed 1""",
    "serve": """examples:
  lmspec serve exported/tiny.onnx
  lmspec serve exported/tiny.onnx --port 8080 --max-tokens 256
  curl localhost:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"model": "tiny", "prompt": "The ", "max_tokens": 50}'
  lmspec serve exported/spam/                  # a classifier bundle: POST /v1/classify
  curl localhost:8000/v1/classify -H 'content-type: application/json' \\
       -d '{"input": ["WINNER!! Claim your prize now", "see you at 6?"]}'""",
    "sample": """examples:
  lmspec sample runs/tiny --prompt "The " --max-tokens 200
  lmspec sample runs/tiny/checkpoints/step_000500 --temperature 0.8 --top-k 40 --seed 1
  lmspec sample runs/gpt2 --device cuda --prompt "Once upon a time" """,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmspec",
        description="Build a language model from a spec: check, format and diff it, plan it, train it, finetune and evaluate it, sample from it, export and serve it.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def verb(name, help_, handler, parent=sub, group="", examples=None):
        """A verb whose `handler` ('module:function' in lmspec.runtime) is imported only when it runs."""
        q = parent.add_parser(name, help=help_, description=help_, epilog=examples or EXAMPLES[f"{group}{name}"],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        q.set_defaults(handler=handler)
        return q

    def group(name, help_):
        actions = sub.add_parser(name, help=help_, description=help_).add_subparsers(dest="action", metavar="ACTION")
        actions.required = True
        return actions

    def override_options(q):
        q.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="override a hyper-parameter of the spec (repeatable)")
        q.add_argument("--model", help="the model to use when a file defines several")

    c = verb("check", "Check spec files and report every error, located, before anything runs.",
             "cli.spec:cmd_check")
    c.add_argument("paths", nargs="+", metavar="PATH", help="spec files, directories or glob patterns")
    c.add_argument("--format", choices=["human", "json", "github", "sarif"], default="human",
                   help="human (default: source line and caret, on stderr), json (a list of diagnostics), "
                        "github (GitHub Actions annotations), sarif (SARIF 2.1.0 for code scanning)")
    c.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 1 on any)")
    c.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the human format: auto (default) when stderr is a terminal and NO_COLOR is unset")
    override_options(c)
    add_fmt_verbs(verb, sub)
    add_diff_verbs(verb, sub)

    i = verb("info", "Parameters, FLOPs per token and a per-block breakdown of a spec.", "cli.spec:cmd_info")
    i.add_argument("spec")
    i.add_argument("--seq", type=int, help="sequence length for FLOP counts (default: the context)")
    i.add_argument("--graph", metavar="FILE", help="also draw the graph to FILE (.dot, .svg, .png, .pdf)")
    i.add_argument("--format", choices=["human", "json"], default="human")
    i.add_argument("--tp", type=int, metavar="N", help="also print how tensor parallelism over N ranks splits "
                   "every parameter (refused, located, when heads or sizes do not divide)")
    i.add_argument("--sequence-parallel", action="store_true",
                   help="with --tp: plan sequence parallelism too (refused, located, at an op that mixes positions)")
    i.add_argument("--pp", type=int, metavar="N", help="also print the N pipeline stages the model is cut into, "
                   "balanced by FLOPs and memory (at --seq)")
    override_options(i)

    pl = verb("plan", "What training a spec needs: parameters, FLOPs, compute, time, and memory per GPU "
              "under DDP and FSDP, from its graph.", "cli.plan:cmd_plan")
    pl.add_argument("spec")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs to train on (default: 1)")
    pl.add_argument("--gpu-memory", default="80GB", help="memory of one GPU: 80GB (10^9 bytes), 80GiB (2^30 bytes)")
    budget = pl.add_mutually_exclusive_group()
    budget.add_argument("--tokens", help="tokens to train on: 15T, 300B, 2e12")
    budget.add_argument("--compute", help="FLOPs to spend: 1e24, 6e23")
    pl.add_argument("--seq", type=int, help="training sequence length (default: the context, at most 4096)")
    pl.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward pass (default: 1)")
    pl.add_argument("--strategy", choices=["ddp", "fsdp", "both"], default="both",
                    help="data parallelism to show; fsdp includes FSDP with CPU offload in the layouts "
                         "(default: both)")
    pl.add_argument("--global-batch", type=int,
                    help="sequences per optimizer step for the 3-D layouts (default: 8 x --gpus x --micro-batch)")
    pl.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b", help="pipeline schedule (default: 1f1b)")
    pl.add_argument("--sequence-parallel", action="store_true",
                    help="tensor-parallel layouts also split the activations at block boundaries")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; tp stays within one (default: 8)")
    pl.add_argument("--nvlink-bandwidth", default="450GB/s",
                    help="per GPU per direction within a node (default: 450GB/s, H100 SXM NVLink)")
    pl.add_argument("--network-bandwidth", default="50GB/s",
                    help="per GPU between nodes (default: 50GB/s, one 400 Gb/s InfiniBand NIC per GPU)")
    pl.add_argument("--host-memory", default="2TB",
                    help="host memory per node, for the CPU-offload layouts (default: 2TB, a DGX H100's)")
    pl.add_argument("--pcie-bandwidth", default="50GB/s",
                    help="per GPU per direction to the host, for the CPU-offload layouts "
                         "(default: 50GB/s, PCIe Gen5 x16)")
    pl.add_argument("--layouts", type=int, default=8, help="fitting layouts to list (default: 8; 0: none)")
    pl.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="fp32, or bf16/fp16 autocast (fp32 master weights and gradients)")
    pl.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                    help="show only the rows with (or --no-…: without) checkpointing per block (default: both)")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default: 0.4)")
    pl.add_argument("--gpu-flops", default="989e12",
                    help="peak FLOP/s of one GPU (default: 989e12, H100 SXM dense bf16; 989T also works)")
    pl.add_argument("--format", choices=["human", "json"], default="human")
    override_options(pl)

    t = verb("train", "Train a spec on a text corpus (next-token cross-entropy, AdamW).", "cli.train:cmd_train")
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
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="mixed precision: autocast to bf16 or fp16 (with loss scaling); weights stay fp32")
    t.add_argument("--activation-checkpointing", nargs="?", const="all", metavar="BLOCKS",
                   help="recompute each block's activations in the backward pass instead of keeping them: "
                        "all blocks, or names/patterns such as 'block.0,block.1?'")
    t.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    t.add_argument("--strategy", choices=["ddp", "fsdp"],
                   help="under torchrun: ddp replicates the model on every rank, fsdp (FSDP2) shards weights, "
                        "gradients and optimizer state per block over the data-parallel ranks (with --tp/--pp: "
                        "each stage's tp shards over the replicas) (default: ddp, or the resumed run's)")
    t.add_argument("--cpu-offload", action="store_true",
                   help="with --strategy fsdp: keep the sharded weights, gradients and AdamW state in host memory "
                        "(FSDP2 CPUOffloadPolicy), for a model whose state does not fit the GPUs (`lmspec plan` says when)")
    t.add_argument("--tp", type=int, metavar="N",
                   help="under torchrun: tensor parallel, each layer split over N ranks (Megatron-style, "
                        "DTensor; the split comes from the graph: `lmspec info --tp N` shows it). Combines with "
                        "--pp; ranks beyond tp x pp are data-parallel replicas (mesh pp x dp x tp, tp fastest)")
    t.add_argument("--sequence-parallel", action="store_true",
                   help="with --tp: Megatron's sequence parallelism, the residual stream and norms split along the "
                        "sequence between attention and MLP (less activation memory, the same bytes sent)")
    t.add_argument("--pp", type=int, metavar="N",
                   help="under torchrun: pipeline parallel, the model cut into N stages at block boundaries "
                        "(`lmspec info --pp N` shows the cut), run with torch.distributed.pipelining")
    t.add_argument("--micro-batches", type=int, metavar="M",
                   help="with --pp: micro-batches each batch is split into (default: one per stage)")
    t.add_argument("--pp-schedule", choices=["1f1b", "gpipe"], help="with --pp: the pipeline schedule (default: 1f1b)")
    t.add_argument("--pad-vocab", type=int, metavar="N",
                   help="round the model's vocab up to a multiple of N (64 or 128 suit a GPU's matrix units); the "
                        "extra rows are never a token, and sample, eval, export and finetuning see the real vocab")
    add_device_option(t)
    t.add_argument("--peak-tflops", type=float, metavar="T",
                   help="peak dense bf16 TFLOP/s of one device, for MFU in the metrics (default: a table of common "
                        "GPUs; on a CPU MFU is reported only when this is given)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--sample-tokens", type=int, default=200, help="print a sample this long at the end (0: none)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = verb("sample", "Generate text from a checkpoint, using the KV cache.", "cli.train:cmd_sample")
    s.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    s.add_argument("--prompt", default="", help="text to continue (default: empty)")
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int)
    add_device_option(s)

    e = verb("export", "Export a checkpoint to ONNX with a KV cache, checked against PyTorch; "
             "`export hf CHECKPOINT -o DIR` writes a Hugging Face model directory instead.",
             "cli.export:cmd_export")
    e.add_argument("checkpoint", help="a run directory or a checkpoint directory (or `hf` then one)")
    e.add_argument("hf_checkpoint", nargs="?", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    e.add_argument("-o", "--output", required=True,
                   help="the .onnx file to write (its <name>.lmspec.json goes beside it), or a directory; "
                        "for `export hf`, the model directory to create")
    e.add_argument("--model-type", help="export hf: the Hugging Face model_type to write (default: the imported "
                                        "model's, else inferred from the parameter names)")
    e.add_argument("--opset", type=int, help="ONNX opset, 18 to 23 (default: 20)")
    e.add_argument("--optimize", action="store_true",
                   help="apply onnxruntime's graph optimisations and transformer fusions")
    e.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantisation of the weights (CPU)")
    e.add_argument("--fp16", action="store_true", help="convert to float16 (for GPU execution providers)")

    gen = verb("generate", "Generate text from an exported ONNX model with onnxruntime (no PyTorch).",
               "cli.serve:cmd_generate")
    gen.add_argument("model", help="an exported .onnx file, or a directory holding one")
    gen.add_argument("--prompt", action="append", help="text to continue; repeat for a batch of prompts")
    gen.add_argument("--prompts-file", help="a file with one prompt per line (batched)")
    gen.add_argument("--max-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop when this text appears (repeatable; \\n means a newline)")
    gen.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    add_provider_option(gen)
    gen.add_argument("--json", action="store_true", help="print the completions as JSON")

    sv = verb("serve", "Serve an exported ONNX model over HTTP: a language model with an OpenAI-compatible API "
              "(/v1/completions, /v1/chat/completions), a classifier with POST /v1/classify.", "cli.serve:cmd_serve")
    sv.add_argument("model", help="an exported .onnx file (language model or classifier), or a directory holding one")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: loopback only; 0.0.0.0 exposes the server to the network)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--name", help="the model name clients ask for (default: the spec's model name)")
    sv.add_argument("--max-tokens", type=int, default=1024,
                    help="the most tokens one request may generate (language models)")
    sv.add_argument("--max-prompt-tokens", type=int,
                    help="the longest prompt accepted (language models; default: the context)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the largest request body accepted")
    sv.add_argument("--max-batch", type=int, default=16,
                    help="requests generated together in one batch (language models)")
    sv.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    add_provider_option(sv)

    d = group("data", "Prepare a text corpus: clean and deduplicate it, tokenize it into shards.")
    dp = verb("prepare", "Normalise, clean, deduplicate (exact and near) and filter documents; write a report.",
              "cli.data:cmd_data_prepare", d, "data ")
    dp.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, directories, JSONL files")
    dp.add_argument("--out", required=True, help="directory for documents.jsonl and report.json")
    dp.add_argument("--text-field", default="text", help="the field holding the text in JSONL records")
    dp.add_argument("--min-chars", type=int, default=1, help="drop shorter documents")
    dp.add_argument("--max-chars", type=int, help="drop longer documents")
    dp.add_argument("--near-dup-threshold", type=float, default=0.8,
                    help="estimated Jaccard similarity of word shingles above which a document is a near-duplicate")
    dp.add_argument("--shingle", type=int, default=5, help="words per shingle")
    dp.add_argument("--no-near-dup", action="store_true", help="drop exact duplicates only")
    dp.add_argument("--json", action="store_true", help="print the report as JSON")
    dp.add_argument("--no-progress", action="store_true")

    dt = verb("tokenize", "Tokenize a prepared corpus into binary shards for `lmspec train --data`.",
              "cli.data:cmd_data_tokenize", d, "data ")
    dt.add_argument("sources", nargs="+", metavar="SOURCE",
                    help="a prepared directory, or text files and directories (one file, one document)")
    dt.add_argument("--tokenizer", required=True,
                    help="a tokenizers JSON file, or a directory with tokenizer.json or encoder.json + vocab.bpe")
    dt.add_argument("--out", required=True, help="directory for the shards and meta.json")
    dt.add_argument("--val-fraction", type=float, default=0.1, help="share of documents for validation")
    dt.add_argument("--shard-tokens", type=int, default=64 * 2**20, help="tokens per shard file")
    dt.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    dt.add_argument("--no-progress", action="store_true")

    im = group("import", "Bring models in from other formats.")
    ih = verb("hf", "Import a Hugging Face model directory (config.json + safetensors) as a checkpoint, "
              "checked against a spec.", "cli.hf:cmd_import_hf", im, "import ")
    ih.add_argument("dir", help="a Hugging Face model directory: config.json and model.safetensors (or shards)")
    ih.add_argument("--spec", help="the spec the model must match")
    ih.add_argument("--emit-spec", metavar="FILE", help="instead of --spec: write the spec for config.json to FILE")
    ih.add_argument("-o", "--output", required=True, help="the run directory to create for the checkpoint")
    ih.add_argument("--tokenizer", help="a tokenizer to store when DIR has none (or to use instead of DIR's)")
    override_options(ih)

    k = group("tokenizer", "Train, inspect and use tokenizers.")
    kt = verb("train", "Train a byte-level BPE tokenizer with special tokens (Hugging Face tokenizers).",
              "cli.data:cmd_tokenizer_train", k, "tokenizer ")
    kt.add_argument("corpus", nargs="+", help="a prepared directory, or text files and directories")
    kt.add_argument("--vocab-size", type=int, required=True)
    kt.add_argument("--out", required=True, help="the tokenizer JSON file to write")
    kt.add_argument("--special", action="append", default=[], metavar="TOKEN",
                    help="another special token (beside <|endoftext|>, <|pad|>, <|im_start|>, <|im_end|>)")
    kt.add_argument("--min-frequency", type=int, default=2)
    kt.add_argument("--no-progress", action="store_true")
    ke = verb("encode", "Print the token ids of a text.", "cli.data:cmd_tokenizer_encode", k, "tokenizer ")
    ke.add_argument("tokenizer")
    ke.add_argument("text", nargs="?")
    ke.add_argument("--file", help="encode this file instead")
    ke.add_argument("--count", action="store_true", help="print only how many tokens")
    kd = verb("decode", "Print the text of token ids.", "cli.data:cmd_tokenizer_decode", k, "tokenizer ")
    kd.add_argument("tokenizer")
    kd.add_argument("ids", nargs="+")

    # Finetuning and what uses its results; each family of verbs declares its options in its own module.
    ft = group("finetune", "Finetune a checkpoint: a classifier, an instruction follower, preferences (DPO).")
    add_classify_verbs(verb, ft, sub, override_options)
    add_instruct_verbs(verb, ft, sub, override_options)
    add_dpo_verbs(verb, ft)
    add_eval_verbs(verb, sub)
    add_lora_verbs(verb, group("lora", "LoRA adapters: fold them into the base weights."))
    return p


def _verb(args) -> str:
    return f"{args.verb} {args.action}" if getattr(args, "action", None) else args.verb


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        module, function = args.handler.split(":")
        return getattr(importlib.import_module(f"lmspec.runtime.{module}"), function)(args)
    except UserError as err:  # every mistake in the input: a spec's, an option's, a file's
        print(err.report(_verb(args)), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmspec info … | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as err:  # a bug in lmspec, not in the input: say so briefly
        if os.environ.get("LMSPEC_DEBUG"):
            raise
        print(f"lmspec {_verb(args)}: internal error: {type(err).__name__}: {err}\n"
              f"(this is a bug in lmspec; run with LMSPEC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
