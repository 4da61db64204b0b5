"""A model's own chat template travels with it: a checkpoint finetuned with the Alpaca template, whose
vocabulary also has ChatML's tokens (the case that was served in ChatML), is exported to ONNX and
served; `serve` (POST /tokenize, /v1/chat/completions) and `generate --chat` render its prompts with
the Alpaca template, the prompt training built for the same instruction, token for token. A bundle
whose template is broken answers chats with a 400 and keeps serving completions."""
import json
import shutil
import subprocess
import sys

import httpx
import pytest

from runtime_helpers import ROOT, SHARED_DATA, lmspec_main, running_server
from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from lmspec.compiler.rewrites import spec_record
from lmspec.runtime.checkpoint.store import save_checkpoint
from lmspec.runtime.cli.main import main
from lmspec.runtime.data.chat_template import ALPACA_JINJA
from lmspec.runtime.export.from_checkpoint import export_bundle
from lmspec.runtime.finetune.instruct_data import AlpacaTemplate

DATA = SHARED_DATA / "instruction-data.json"
RECORD = {"instruction": "Name three primary colours.", "input": "", "output": ""}
WITH_INPUT = {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.",
              "output": ""}


@pytest.fixture(scope="module")
def alpaca_bundle(tmp_path_factory, bpe):
    """A small GPT-2-shaped model finetuned briefly with `lmspec finetune instruct` (Alpaca, the
    default), exported with `lmspec export`: the .onnx path."""
    work = tmp_path_factory.mktemp("alpaca")
    settings = {"layers": 1, "dim": 32, "heads": 2, "context": 256, "vocab": 400, "dropout": 0.0}
    graph = load_spec("specs/gpt2.arch", settings)
    save_checkpoint(work / "base", step=0, model=lower(graph, seed=0), optimizer=None, rng=None, train_config={},
                    metrics={}, tokenizer=bpe.to_json(), spec=spec_record(graph, settings))
    assert main(["finetune", "instruct", str(work / "base"), "--data", str(DATA), "--limit", "16", "--epochs", "1",
                 "--batch", "8", "--eval-every", "0", "--no-progress", "--out", str(work / "ft")]) == 0
    export_bundle(str(work / "ft"), str(work / "bundle" / "assistant.onnx"), log=lambda *_: None)
    return work / "bundle" / "assistant.onnx"


def training_prompt(bpe, record) -> list[int]:
    return AlpacaTemplate(bpe).prompt_of(record)


def as_messages(record) -> list[dict]:
    """A record as a client sends it: its input, when it has one, is the system message."""
    return ([{"role": "system", "content": record["input"]}] if record["input"] else []) + \
        [{"role": "user", "content": record["instruction"]}]


def test_the_bundle_records_the_template(alpaca_bundle):
    meta = json.loads(alpaca_bundle.with_name("assistant.lmspec.json").read_text())
    assert meta["chat_template"] == {"source": "alpaca", "template": ALPACA_JINJA,
                                     "special_tokens": {"eos_token": "<|endoftext|>"}}


def test_serve_renders_the_alpaca_prompt_training_used(alpaca_bundle, bpe, tmp_path):
    with running_server(alpaca_bundle, log_dir=tmp_path) as (url, proc, err):
        for record in (RECORD, WITH_INPUT):
            r = httpx.post(f"{url}/tokenize", json={"messages": as_messages(record)})
            assert r.status_code == 200, r.text
            want = training_prompt(bpe, record)
            assert r.json()["count"] == len(want) and r.json()["tokens"] == want
            assert bpe.decode(want).endswith("\n\n### Response:\n") and len(want) > 30  # not ChatML's ~20
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": as_messages(RECORD), "max_tokens": 4,
                                                           "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(training_prompt(bpe, RECORD))
        # A conversation: each earlier exchange as a finished Alpaca block, ended by <|endoftext|>.
        turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": RECORD["instruction"]}]
        tokens = httpx.post(f"{url}/tokenize", json={"messages": turns}).json()["tokens"]
        first = training_prompt(bpe, {"instruction": "Hi.", "input": "", "output": ""})
        assert tokens == first + bpe.encode("Hello.") + [bpe.eot_id] + training_prompt(bpe, RECORD)
    assert "Traceback" not in err.read_text()


def test_generate_chat_renders_it_too(alpaca_bundle, bpe):
    out = lmspec_main("generate", alpaca_bundle, "--chat", "--prompt", RECORD["instruction"], "--prompt", "Hi.",
                     "--max-tokens", "3", "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    hi = {"instruction": "Hi.", "input": "", "output": ""}
    assert [r["prompt_tokens"] for r in results] == [len(training_prompt(bpe, RECORD)), len(training_prompt(bpe, hi))]
    system = lmspec_main("generate", alpaca_bundle, "--chat", "--system", WITH_INPUT["input"], "--prompt",
                        WITH_INPUT["instruction"], "--max-tokens", "2", "--json")
    assert json.loads(system.stdout)[0]["prompt_tokens"] == len(training_prompt(bpe, WITH_INPUT))
    plain = lmspec_main("generate", alpaca_bundle, "--system", "x", "--prompt", "Hi")
    assert plain.returncode == 2 and "--system: only with --chat" in plain.stderr


@pytest.fixture(scope="module")
def broken_bundle(alpaca_bundle, tmp_path_factory):
    """The same model with a template that refuses every conversation without a system message."""
    folder = tmp_path_factory.mktemp("broken")
    for path in alpaca_bundle.parent.iterdir():
        shutil.copy(path, folder / path.name)
    sidecar = folder / "assistant.lmspec.json"
    meta = json.loads(sidecar.read_text())
    meta["chat_template"] = {"source": "tokenizer_config.json", "special_tokens": {},
                             "template": "{% if messages[0]['role'] != 'system' %}"
                                         "{{ raise_exception('Conversations must start with a system message') }}"
                                         "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    sidecar.write_text(json.dumps(meta))
    return folder / "assistant.onnx"


def test_a_broken_template_is_a_400_and_the_server_keeps_serving(broken_bundle, tmp_path):
    with running_server(broken_bundle, log_dir=tmp_path) as (url, proc, err):
        for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                            ("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})):
            r = httpx.post(f"{url}{route}", json=body)
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert "the chat template (tokenizer_config.json) refused these messages: Conversations must start " \
                   "with a system message" in message
        r = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "system", "content": "S"},
                                                             {"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["count"] > 0
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200
        assert proc.poll() is None
    assert "Traceback" not in err.read_text()


def test_a_template_that_does_not_parse_is_one_line_for_generate(broken_bundle, tmp_path):
    folder = tmp_path / "unparsable"
    shutil.copytree(broken_bundle.parent, folder)
    sidecar = folder / "assistant.lmspec.json"
    meta = json.loads(sidecar.read_text())
    meta["chat_template"]["template"] = "{% for m in messages %}{{ m.content }"
    sidecar.write_text(json.dumps(meta))
    out = subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", "generate", str(folder), "--chat",
                          "--prompt", "Hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("lmspec generate: error: the chat template (tokenizer_config.json) does not "
                                  "parse: line 1: unexpected '}'")
    meta["chat_template"] = {"template": 3}
    sidecar.write_text(json.dumps(meta))
    out = lmspec_main("generate", folder, "--chat", "--prompt", "Hi")
    assert out.returncode == 1 and "corrupt: 'chat_template' 'template' missing or not a non-empty string" in out.stderr
