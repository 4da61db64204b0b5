"""`lmspec export` of a classifier and `lmspec classify BUNDLE`: the ONNX classifier computes the
PyTorch classifier's logits over right-padded batches, predicts what the checkpoint predicts with
onnxruntime alone, records its labels, refuses to generate, and bad bundles are clear errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime_helpers import finetune_spam, lmspec_main, train_tiny_base
from lmspec.runtime.finetune.classifier import classifier_inputs
from lmspec.runtime.cli.main import main
from lmspec.runtime.export.from_checkpoint import export_bundle
from lmspec.runtime.checkpoint.models import load_model
from lmspec.runtime.serve.classifier import OnnxClassifier
from lmspec.runtime.export.bundle import bundle_sidecar, read_sidecar
from lmspec.runtime.serve.language_model import OnnxModel

MAX_LENGTH = 24
TEXTS = ["WINNER!! Claim your £1000 prize now, call 09061701461", "ok see you at 6?", "Café crème — “déjà vu”",
         "a" * 100, "Free entry in 2 a wkly comp to win FA Cup final tkts", "", "Sorry, I'll call later"]


def quiet(*_):
    pass


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    return train_tiny_base(tmp_path_factory.mktemp("classify_onnx") / "base")


def finetune(base, out, *extra):
    assert finetune_spam(base, out, *extra, max_length=MAX_LENGTH) == 0
    return out


@pytest.fixture(scope="session")
def spam_run(base_run):
    return finetune(base_run, base_run.parent / "spam")


@pytest.fixture(scope="session")
def spam_bundle(spam_run):
    """`lmspec export RUN -o DIR`: the path of DIR/model.onnx."""
    out = spam_run.parent / "spam-onnx"
    assert main(["export", str(spam_run), "-o", str(out)]) == 0
    return out / "model.onnx"


@pytest.fixture
def lm_sidecar_bundle(spam_bundle, tmp_path):
    """The classifier's model beside a sidecar as a language model's export writes it, less its
    "kind", as bundles written before classifiers could be exported have it (exporting a language
    model too would cost this file a third of its time; tests/runtime/export/test_export.py has real ones)."""
    path = tmp_path / "lm.onnx"
    shutil.copy(spam_bundle, path)
    classifier_only = ("kind", "labels", "max_length", "pad_id")
    meta = {k: v for k, v in read_sidecar(spam_bundle).items() if k not in classifier_only}
    bundle_sidecar(path).write_text(json.dumps(meta))
    return path


def onnx_io(path):
    import onnx

    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    return dims, types


# ------------------------------------------------------------------------------------- export

def test_classifier_bundle_layout_and_sidecar(spam_bundle):
    import onnx

    dims, types = onnx_io(spam_bundle)
    assert dims == {"input_ids": ["batch_size", "sequence_length"], "lengths": ["batch_size"],
                    "logits": ["batch_size", 2]}
    assert types["input_ids"] == types["lengths"] == onnx.TensorProto.INT64
    assert types["logits"] == onnx.TensorProto.FLOAT
    meta = read_sidecar(spam_bundle)
    assert meta["kind"] == "classifier" and meta["labels"] == ["ham", "spam"] and meta["cache"] is None
    assert meta["max_length"] == MAX_LENGTH and meta["parity"]["fp32"]["logits"] <= 1e-4
    assert meta["parity"]["fp32"]["same_class"] == meta["parity"]["fp32"]["texts"]
    assert OnnxClassifier(spam_bundle.parent).labels == ["ham", "spam"]  # the directory names it too


def test_onnx_logits_equal_pytorch_over_right_padded_batches(spam_run, spam_bundle):
    import onnxruntime as ort

    model = load_model(spam_run).model
    session = ort.InferenceSession(str(spam_bundle), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    vocab = model.get_parameter("wte.weight").shape[0]
    for width in (32, 17, 5, 1):
        lengths = torch.cat([torch.tensor([width, 1]), torch.randint(1, width + 1, (4,), generator=gen)])
        tokens = torch.randint(0, vocab, (len(lengths), width), generator=gen)
        with torch.no_grad():
            expected = model(tokens, lengths).numpy()
        got = session.run(["logits"], {"input_ids": tokens.numpy(), "lengths": lengths.numpy()})[0]
        assert np.abs(got - expected).max() <= 1e-4, width
        # and each row alone, unpadded, gives what it gave in the padded batch
        for row in (0, 1, 5):
            n = int(lengths[row])
            alone = session.run(["logits"], {"input_ids": tokens[row:row + 1, :n].numpy(),
                                             "lengths": lengths[row:row + 1].numpy()})[0]
            assert np.abs(alone[0] - got[row]).max() <= 1e-5


# ------------------------------------------------------------------------- lmspec classify

def test_bundle_predicts_what_the_checkpoint_predicts_without_torch(spam_run, spam_bundle, capsys):
    assert main(["classify", str(spam_run), *TEXTS]) == 0
    from_checkpoint = capsys.readouterr().out.splitlines()
    code = ("import sys\nfrom lmspec.runtime.cli import main\n"
            f"rc = main(['classify', {str(spam_bundle)!r}, *{TEXTS!r}])\n"
            "assert rc == 0\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8")
    assert out.returncode == 0, out.stderr
    from_bundle = out.stdout.splitlines()
    assert len(from_bundle) == len(from_checkpoint) == len(TEXTS)
    for text, theirs, ours in zip(TEXTS, from_checkpoint, from_bundle):
        label, prob, rest = ours.split(maxsplit=2) if text else (*ours.split(), "")
        expected_label, expected_prob, *_ = theirs.split()
        assert label == expected_label and abs(float(prob) - float(expected_prob)) <= 0.0011, (ours, theirs)
        assert ours.endswith(text) and rest == text


def test_the_bundle_encodes_texts_as_the_checkpoint_does(spam_run, spam_bundle):
    """The sidecar carries what encoding needs (tokenizer, max length, pad id): the bundle's encoder
    gives the checkpoint's ids, accents, Windows-1252 punctuation and truncation included."""
    _, from_checkpoint = classifier_inputs(load_model(spam_run))
    from_bundle = OnnxClassifier(spam_bundle).encoder
    samples = TEXTS + ["\x93quoted\x94 \x85", "naïve façade", "€ ¥ ©"]
    assert [from_bundle.encode(t) for t in samples] == [from_checkpoint.encode(t) for t in samples]
    assert from_bundle.encode("a" * 100) == from_bundle.tokenizer.encode("a" * MAX_LENGTH)


def test_lora_classifier_exports_with_its_adapters_folded_in(base_run, tmp_path, capsys):
    run = finetune(base_run, tmp_path / "spam-lora", "--lora", "2")
    capsys.readouterr()
    meta = export_bundle(str(run), str(tmp_path / "lora.onnx"), log=quiet)
    assert meta["kind"] == "classifier" and meta["parity"]["fp32"]["logits"] <= 1e-4  # against the unmerged model
    import onnx
    assert not [i.name for i in onnx.load(str(tmp_path / "lora.onnx")).graph.initializer if "lora" in i.name]
    assert main(["classify", str(run), *TEXTS[:3]]) == 0
    from_checkpoint = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    probs = OnnxClassifier(tmp_path / "lora.onnx").probabilities(TEXTS[:3])
    assert [meta["labels"][i] for i in probs.argmax(axis=1)] == from_checkpoint


def test_optimized_int8_and_fp16_variants(spam_run, spam_bundle, tmp_path):
    """onnxruntime's tools on the exported classifier, as `--optimize`, `--quantize int8` and `--fp16`
    apply them, checked as export_bundle checks them (the whole path: the slow test below)."""
    import onnxruntime as ort
    from lmspec.compiler.onnx_parity import check_classifier_parity
    from lmspec.runtime.export import optimize as onnx_optimize

    model = load_model(spam_run).model
    vocab = read_sidecar(spam_bundle)["vocab_size"]

    def parity(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return check_classifier_parity(model, session, vocab, 32)

    onnx_optimize.optimize(spam_bundle, tmp_path / "opt.onnx", heads=2, hidden=32)
    assert parity(tmp_path / "opt.onnx").logits <= 1e-4
    onnx_optimize.quantize_int8(tmp_path / "opt.onnx", tmp_path / "int8.onnx")
    int8 = parity(tmp_path / "int8.onnx")
    assert 0 < int8.logits < 0.5 and int8.texts == 8
    onnx_optimize.to_fp16(spam_bundle, tmp_path / "fp16.onnx")
    assert 0 < parity(tmp_path / "fp16.onnx").logits < 0.05


@pytest.mark.slow
def test_export_options_on_a_classifier(spam_run, tmp_path):
    out = lmspec_main("export", spam_run, "-o", tmp_path / "q.onnx", "--optimize", "--quantize", "int8")
    assert out.returncode == 0, out.stderr
    assert "parity optimized:" in out.stdout and "the same class for" in out.stdout
    meta = read_sidecar(tmp_path / "q.onnx")
    assert meta["optimized"] and meta["quantized"] == "int8" and meta["parity"]["optimized"]["logits"] <= 1e-4
    assert OnnxClassifier(tmp_path / "q.onnx").probabilities(TEXTS).shape == (len(TEXTS), 2)
    meta = export_bundle(str(spam_run), str(tmp_path / "h.onnx"), fp16=True, log=quiet)
    assert meta["dtype"] == "float16" and meta["parity"]["fp16"]["logits"] < 0.05
    assert OnnxClassifier(tmp_path / "h.onnx").probabilities(TEXTS[:2]).shape == (2, 2)


# -------------------------------------------------------------------------------- refusals

def one_clear_line(proc, *words):
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_generate_refuses_a_classifier_bundle(spam_bundle):
    # `lmspec serve` serves one (POST /v1/classify): tests/runtime/serve/test_serve_classifier.py
    one_clear_line(lmspec_main("generate", spam_bundle, "--prompt", "hello"), "classifier", "lmspec classify")


def test_classify_refuses_a_language_model_bundle(lm_sidecar_bundle, capsys):
    assert main(["classify", str(lm_sidecar_bundle), "hello"]) == 1
    err = capsys.readouterr().err
    assert "language model, not a classifier" in err and "lmspec generate" in err
    assert len(err.strip().splitlines()) == 1


def test_a_sidecar_without_kind_is_a_language_model(lm_sidecar_bundle):
    assert "kind" not in json.loads(bundle_sidecar(lm_sidecar_bundle).read_text())
    assert OnnxModel(lm_sidecar_bundle).name == "tiny"


def test_missing_or_corrupt_classifier_bundles_are_located_errors(spam_bundle, tmp_path, capsys):
    meta = read_sidecar(spam_bundle)
    (tmp_path / "corrupt.onnx").write_bytes(b"not a model")
    shutil.copy(bundle_sidecar(spam_bundle), tmp_path / "corrupt.lmspec.json")
    shutil.copy(spam_bundle, tmp_path / "nolabels.onnx")
    (tmp_path / "nolabels.lmspec.json").write_text(json.dumps(meta | {"labels": ["ham"]}))
    shutil.copy(spam_bundle, tmp_path / "alone.onnx")
    cases = [
        ("missing.onnx", "missing.onnx: no such ONNX model"),
        ("corrupt.onnx", "corrupt.onnx: onnxruntime cannot load it"),
        ("nolabels.onnx", "nolabels.lmspec.json: corrupt: a classifier's 'labels'"),
        ("alone.onnx", "alone.lmspec.json: missing"),
    ]
    for name, message in cases:
        assert main(["classify", str(tmp_path / name), "hello"]) == 1, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    one_clear_line(lmspec_main("classify", tmp_path / "corrupt.onnx", "hello"), "onnxruntime cannot load it")
