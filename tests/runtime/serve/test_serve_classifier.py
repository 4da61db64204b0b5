"""`lmspec serve` of a classifier bundle: the real server in a subprocess, as test_serve.py runs it.
POST /v1/classify must answer OnnxClassifier's probabilities and the label `lmspec classify BUNDLE`
prints, in request order; bad requests get a 4xx with the server's error body; the completion routes
point to /v1/classify, and /v1/classify on a language model's server points back."""
import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from runtime_helpers import finetune_spam, running_server, train_tiny_base
from lmspec.runtime.cli.main import main
from lmspec.runtime.serve.classifier import OnnxClassifier
from lmspec.runtime.export.bundle import bundle_sidecar, read_sidecar
from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.app import ServeSettings, create_app

NAME = "spam-filter"  # given with --name, so the answers must carry it rather than the spec's name
MAX_BODY = 65536
MAX_TEXTS = 256  # serve_classifier's limit per request
# Of different lengths (the classifier sorts them by length inside), with characters the vocabulary
# lacks, an empty one and one past the max length.
TEXTS = ["WINNER!! Claim your £1000 prize now, call 09061701461", "ok see you at 6?", "Café crème — “déjà vu”",
         "a" * 100, "", "Free entry in 2 a wkly comp to win FA Cup final tkts", "Sorry, I'll call later"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A classifier exported with `lmspec export`: the directory holding model.onnx."""
    work = tmp_path_factory.mktemp("serve_classifier")
    assert finetune_spam(train_tiny_base(work / "base"), work / "spam") == 0
    assert main(["export", str(work / "spam"), "-o", str(work / "onnx")]) == 0
    return work / "onnx"


@pytest.fixture(scope="module")
def classifier(bundle):
    return OnnxClassifier(bundle, threads=1)


@pytest.fixture(scope="module")
def client(bundle, tmp_path_factory):
    with running_server(bundle, "--name", NAME, "--max-body-bytes", MAX_BODY, "--threads", 1,
                        log_dir=tmp_path_factory.mktemp("serve_classifier_logs")) as (url, proc, err):
        with httpx.Client(base_url=url, timeout=60) as c:
            yield c
        assert proc.poll() is None, "the server died"
        assert "Traceback" not in err.read_text(), err.read_text()


def classify(client, texts) -> list[dict]:
    r = client.post("/v1/classify", json={"model": NAME, "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == NAME
    return body["data"]


def assert_error(r, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words in error["message"], (words, error)
    assert "Traceback" not in r.text


# ------------------------------------------------------------------------------ the API

def test_health_and_models_say_it_is_a_classifier(client, classifier):
    assert client.get("/health").json() == {"status": "ok", "model": NAME, "kind": "classifier"}
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == NAME and card["kind"] == "classifier" and card["labels"] == classifier.labels
    assert client.get(f"/v1/models/{NAME}").json() == card


def test_classify_answers_the_onnx_classifiers_probabilities_in_request_order(client, classifier):
    expected = classifier.probabilities(TEXTS)
    data = classify(client, TEXTS)
    assert [d["index"] for d in data] == list(range(len(TEXTS)))
    for row, d in zip(expected, data):
        assert list(d["scores"]) == classifier.labels
        assert np.allclose([d["scores"][label] for label in classifier.labels], row, rtol=0, atol=1e-6)
        assert d["label"] == classifier.labels[int(row.argmax())] and abs(d["score"] - row.max()) <= 1e-6
    # the same texts in another order: the same answers, in that order
    assert classify(client, TEXTS[::-1]) == [{**d, "index": i} for i, d in enumerate(data[::-1])]


def test_a_single_string_is_one_text(client):
    [alone] = classify(client, TEXTS[1])
    assert alone == classify(client, [TEXTS[1]])[0] and alone["index"] == 0


def test_labels_are_what_lmspec_classify_prints(client, bundle, capsys):
    assert main(["classify", str(bundle), *TEXTS]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert [d["label"] for d in classify(client, TEXTS)] == printed


# ------------------------------------------------------------------------------ errors

ERRORS = [
    # (body (bytes are sent as they are), status, words of the message)
    (b'{"input": "hi", ', 400, "not valid JSON"),
    (b'["hi"]', 400, "must be a JSON object"),
    ({"input": "x" * (MAX_BODY + 10)}, 413, "larger than"),
    ({"model": "gpt-4", "input": "hi"}, 404, "'gpt-4' does not exist"),
    ({"model": 5, "input": "hi"}, 400, "model: Input should be a valid string"),
    ({}, 400, "input: Field required"),
    ({"input": None}, 400, "input must be a string or a list of strings"),
    ({"input": 5}, 400, "input must be a string or a list of strings"),
    ({"input": ["hi", 5]}, 400, "input must be a string or a list of strings"),
    ({"input": []}, 400, "non-empty list"),
    ({"input": ["hi"] * (MAX_TEXTS + 1)}, 400, f"at most {MAX_TEXTS} per request"),
    ({"input": "hi", "labels": ["ham"]}, 400, "labels: not a field this server knows"),  # refused, not ignored
]


def test_each_bad_request_gets_a_4xx_and_the_server_keeps_serving(client):
    for body, status, words in ERRORS:
        if isinstance(body, bytes):
            r = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
        else:
            r = client.post("/v1/classify", json=body)
        assert_error(r, status, words)
    assert len(classify(client, ["hi"] * MAX_TEXTS)) == MAX_TEXTS
    # a field that changes nothing about the answer is accepted, as /v1/completions accepts it
    r = client.post("/v1/classify", json={"input": "hi", "user": "someone"})
    assert r.status_code == 200 and r.json()["data"][0]["label"] in ("ham", "spam")


def test_completions_on_a_classifier_point_to_classify(client):
    for route in ("/v1/completions", "/v1/chat/completions"):
        r = client.post(route, json={"model": NAME, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]})
        assert_error(r, 400, "is a classifier (ham, spam), not a language model")
        assert "POST /v1/classify" in r.json()["error"]["message"]


@pytest.fixture
def language_model_bundle(bundle, tmp_path):
    """The classifier's graph beside a language model's sidecar (no "kind"): OnnxModel loads it, and
    no language model needs exporting for a test of a refusal (test_serve.py serves real ones)."""
    path = tmp_path / "lm.onnx"
    shutil.copy(bundle / "model.onnx", path)
    classifier_only = ("kind", "labels", "max_length", "pad_id")
    meta = {k: v for k, v in read_sidecar(bundle / "model.onnx").items() if k not in classifier_only}
    bundle_sidecar(path).write_text(json.dumps(meta))
    return path


def test_classify_on_a_language_model_server_is_a_4xx(language_model_bundle):
    app = create_app(OnnxModel(language_model_bundle), ServeSettings("lm", 16, 32, MAX_BODY, 4))
    with TestClient(app) as client:
        assert_error(client.post("/v1/classify", json={"input": "hi"}), 400, "is a language model, not a classifier")


def test_serving_a_classifier_never_imports_torch(bundle):
    code = ("import sys\nfrom fastapi.testclient import TestClient\n"
            "from lmspec.runtime.serve.classifier import OnnxClassifier\n"
            "from lmspec.runtime.serve.classifier_app import ClassifierSettings, create_classifier_app\n"
            f"app = create_classifier_app(OnnxClassifier({str(bundle)!r}), ClassifierSettings('m', 1024))\n"
            "with TestClient(app) as client:\n"
            "    assert client.post('/v1/classify', json={'input': ['hi', 'there']}).status_code == 200\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
