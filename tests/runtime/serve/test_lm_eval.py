"""lm-evaluation-harness against `lmspec serve`: its `local-completions` model, run offline on the
multiple-choice task in lm_eval_task/ (a YAML and the items `lmspec eval --multiple-choice` reads),
sends each context + choice as token ids with echo and logprobs to /v1/completions and sums the
echoed token_logprobs after the context; its acc, acc_norm and acc_bytes must equal
`lmspec eval --multiple-choice` on the checkpoint the bundle was exported from.

The command it runs, as a person would type it (TOKENIZER_DIR holds the checkpoint's tokenizer.json):

  lm_eval --model local-completions --tasks lmspec_mc --include_path tests/runtime/serve/lm_eval_task \\
    --model_args base_url=http://127.0.0.1:PORT/v1/completions,model=NAME,tokenizer_backend=huggingface,\\
tokenizer=TOKENIZER_DIR,max_length=CONTEXT --output_path OUT --log_samples

with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 (nothing is downloaded: the tokenizer is a local
directory, the dataset a local file read by lm_eval_task/items_loader.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_helpers import lmspec_main, running_server, train_bpe_lm

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lm-eval[api]')")
for _module in ("tenacity", "aiohttp", "requests", "transformers"):  # what its API models need
    pytest.importorskip(_module, reason=f"lm-eval's local-completions model needs {_module}")

from lmspec.runtime.checkpoint.models import load_model  # noqa: E402
from lmspec.runtime.checkpoint.store import load_checkpoint  # noqa: E402
from lmspec.runtime.data.tokenizer import load_tokenizer  # noqa: E402
from lmspec.runtime.train.multiple_choice import read_items, score  # noqa: E402

pytestmark = pytest.mark.slow  # a training run, an export, a server and lm-eval's start: about a minute

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"
TASK = "lmspec_mc"
ITEMS = TASK_DIR / "items.jsonl"
NAME = "tiny-bpe"
CONTEXT = 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A byte-level BPE, a model trained briefly with it, its ONNX bundle, and a directory holding its
    tokenizer as Hugging Face transformers loads it (tokenizer.json and tokenizer_config.json)."""
    root = tmp_path_factory.mktemp("lm_eval")
    tok, run = train_bpe_lm(root, CONTEXT, 20, 1, "--lr", "3e-3")
    bundle = root / "bundle" / "lm.onnx"
    out = lmspec_main("export", run, "-o", bundle)
    assert out.returncode == 0, out.stderr
    hf = root / "hf-tokenizer"
    hf.mkdir()
    tokenizer = load_tokenizer(load_checkpoint(run).tokenizer)
    (hf / "tokenizer.json").write_text(tokenizer.tokenizer.to_str(), encoding="utf-8")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}),
                                              encoding="utf-8")
    return {"root": root, "run": run, "bundle": bundle, "tokenizer": hf}


def run_lm_eval(url: str, tokenizer_dir: Path, out: Path, model: str = NAME,
                context: int = CONTEXT) -> tuple[dict, list]:
    """lm-eval's local-completions on the task, offline: (its metrics for the task, its samples by doc_id)."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(out / "hf-home"), TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--tasks", TASK,
            "--include_path", str(TASK_DIR),
            "--model_args", f"base_url={url}/v1/completions,model={model},tokenizer_backend=huggingface,"
                            f"tokenizer={tokenizer_dir},max_length={context}",
            "--output_path", str(out / "results"), "--log_samples"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=out)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    [results] = (out / "results").rglob("results_*.json")
    [samples] = (out / "results").rglob(f"samples_{TASK}_*.jsonl")
    metrics = json.loads(results.read_text())["results"][TASK]
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return metrics, rows


def test_lm_eval_through_the_server_gives_what_lmspec_eval_gives(exported, tmp_path):
    with running_server(exported["bundle"], "--name", NAME, "--threads", 1, log_dir=tmp_path) as (url, proc, err):
        metrics, samples = run_lm_eval(url, exported["tokenizer"], tmp_path)
        assert proc.poll() is None, "the server died"
    assert "Traceback" not in err.read_text(), err.read_text()

    out = lmspec_main("eval", exported["run"], "--multiple-choice", ITEMS, "--format", "json")
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    assert ours["truncated"] == 0  # every item fits: lm-eval over HTTP keeps CONTEXT - 1 tokens, eval CONTEXT + 1

    # each choice's log-likelihood first (onnxruntime's against torch's), then the accuracies
    loaded = load_model(exported["run"])
    items = read_items(ITEMS)
    mine = score(loaded.model, load_tokenizer(loaded.checkpoint.tokenizer).encode, items, CONTEXT)
    assert len(samples) == len(items) == ours["items"]
    for row, lls in zip(samples, mine.loglikelihoods):
        theirs = [float(resp[0]) for resp in row["filtered_resps"]]
        assert theirs == pytest.approx(lls, abs=2e-3), row["doc"]
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert metrics[f"{metric},none"] == pytest.approx(ours[metric], abs=1e-9), metric
