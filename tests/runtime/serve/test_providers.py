"""`--provider cpu|cuda` on the onnxruntime verbs (generate, serve, classify of a bundle) and `--device`
on `classify` of a checkpoint: cpu gives what no flag gives; a CUDA provider this onnxruntime lacks,
or one a session quietly drops, and a GPU torch cannot see are one-line errors before any loading; each
option refuses the other path's kind of model. This machine's onnxruntime is the CPU wheel."""
import subprocess
import sys
import warnings

import onnxruntime as ort
import pytest

from runtime_helpers import finetune_spam, lmspec_cli, lmspec_main, train_tiny_base
from lmspec.runtime.cli.main import main, parser as _parser
from lmspec.runtime.serve.classifier import OnnxClassifier
from lmspec.runtime.export.bundle import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    PROVIDERS,
    ProviderError,
    check_session_providers,
    session_providers,
)
from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.cli.serve import served_bundle

TEXTS = ["WINNER!! Claim your prize now, call 09061701461", "ok see you at 6?", ""]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny base, barely trained, exported as a language model, and finetuned into a classifier
    and exported too: {"lm": .onnx, "spam": run, "spam_onnx": .onnx}."""
    work = tmp_path_factory.mktemp("providers")
    base = train_tiny_base(work / "base")
    assert main(["export", str(base), "-o", str(work / "lm.onnx")]) == 0
    assert finetune_spam(base, work / "spam") == 0
    assert main(["export", str(work / "spam"), "-o", str(work / "spam.onnx")]) == 0
    return {"lm": work / "lm.onnx", "spam": work / "spam", "spam_onnx": work / "spam.onnx"}


@pytest.fixture
def cuda_listed(monkeypatch):
    """onnxruntime claiming a CUDA provider, as onnxruntime-gpu does on a machine whose driver or
    libraries then fail it: sessions asked for it still come up on the CPU alone."""
    available = [CUDA_PROVIDER, *ort.get_available_providers()]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Specified provider 'CUDAExecutionProvider'")
        yield


def one_line_error(stderr: str, verb: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lmspec {verb}: error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    return lines[0]


# ------------------------------------------------------------------------------ the provider list

def test_provider_lists():
    assert session_providers("cpu") == session_providers() == [CPU_PROVIDER]
    assert set(PROVIDERS) == set(next(a for a in _parser()._actions if a.dest == "verb")
                                 .choices["generate"]._option_string_actions["--provider"].choices)
    with pytest.raises(ProviderError, match="expected cpu or cuda"):
        session_providers("rocm")


def test_cuda_listed_means_cuda_first_then_cpu(cuda_listed):
    assert session_providers("cuda") == [CUDA_PROVIDER, CPU_PROVIDER]


def test_cuda_missing_from_this_onnxruntime():
    with pytest.raises(ProviderError) as err:
        session_providers("cuda")
    message = str(err.value)
    assert message.startswith("--provider cuda: this onnxruntime (") and ort.__version__ in message
    assert "has no CUDA provider" in message and "onnxruntime-gpu" in message and "--provider cpu" in message


class _Session:
    def __init__(self, providers):
        self.providers = providers

    def get_providers(self):
        return self.providers


def test_session_check(models):
    check_session_providers(_Session([CUDA_PROVIDER, CPU_PROVIDER]), [CUDA_PROVIDER, CPU_PROVIDER], models["lm"])
    check_session_providers(_Session([CPU_PROVIDER]), [CPU_PROVIDER], models["lm"])
    with pytest.raises(ProviderError, match=r"--provider cuda: .*could not start its CUDA provider for lm\.onnx "
                                            r"\(the session has only CPUExecutionProvider\)"):
        check_session_providers(_Session([CPU_PROVIDER]), [CUDA_PROVIDER, CPU_PROVIDER], models["lm"])


def test_a_session_that_drops_cuda_is_an_error_not_a_cpu_run(models, cuda_listed, capsys):
    """The real onnxruntime session, asked for CUDA it cannot start: both model kinds refuse, and
    the verb says so in one line with nothing on stdout (no "EP Error … falling back" banner)."""
    providers = session_providers("cuda")
    with pytest.raises(ProviderError, match="could not start its CUDA provider"):
        OnnxModel(models["lm"], providers=providers)
    with pytest.raises(ProviderError, match="could not start its CUDA provider"):
        OnnxClassifier(models["spam_onnx"], providers=providers)
    capsys.readouterr()
    assert main(["generate", str(models["lm"]), "--provider", "cuda", "--prompt", "The "]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "could not start its CUDA provider" in one_line_error(out.err, "generate")
    assert main(["classify", str(models["spam_onnx"]), "--provider", "cuda", "hi"]) == 2
    assert "could not start its CUDA provider" in one_line_error(capsys.readouterr().err, "classify")


@pytest.mark.parametrize("kind", ["lm", "spam_onnx"])
def test_serve_opens_sessions_on_the_provider_asked(models, kind, cuda_listed):
    """Both servers (language model, classifier) take --provider: cpu builds the app, cuda that the
    session drops refuses to."""
    served = served_bundle(_parser().parse_args(["serve", str(models[kind]), "--provider", "cpu"]))
    assert served.app is not None
    with pytest.raises(ProviderError, match="could not start its CUDA provider"):
        served_bundle(_parser().parse_args(["serve", str(models[kind]), "--provider", "cuda"]))


# ------------------------------------------------------------------------------ the real command line

@pytest.mark.parametrize("verb", ["generate", "serve", "classify"])
def test_provider_cuda_is_a_one_line_error(models, verb):
    bundle = models["spam_onnx" if verb == "classify" else "lm"]
    args = [verb, bundle, "--provider", "cuda"] + (["hi"] if verb == "classify" else [])
    # serve in a process of its own, which a refusal that failed would leave serving until the timeout
    out = lmspec_cli(*args, timeout=120) if verb == "serve" else lmspec_main(*args)
    assert out.returncode == 2 and out.stdout == ""
    line = one_line_error(out.stderr, verb)
    assert "--provider cuda: this onnxruntime" in line and "has no CUDA provider" in line


def test_provider_cpu_generates_what_no_flag_generates(models, capsys):
    greedy = ["generate", str(models["lm"]), "--temperature", "0", "--max-tokens", "24",
              "--prompt", "The ", "--prompt", "I had"]
    assert main(greedy) == 0
    default = capsys.readouterr().out
    assert main([*greedy, "--provider", "cpu"]) == 0
    assert capsys.readouterr().out == default and default.count("---") == 2


def test_provider_cpu_classifies_a_bundle_without_torch(models, capsys):
    assert main(["classify", str(models["spam_onnx"]), *TEXTS]) == 0
    default = capsys.readouterr().out
    code = ("import sys\nfrom lmspec.runtime.cli import main\n"
            f"rc = main(['classify', {str(models['spam_onnx'])!r}, '--provider', 'cpu', '--device', 'cpu', "
            f"*{TEXTS!r}])\nassert rc == 0\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8")
    assert out.returncode == 0, out.stderr
    assert out.stdout == default and len(default.splitlines()) == len(TEXTS)


# ------------------------------------------------------------------------------ classify: --device

def test_device_cpu_classifies_a_checkpoint_as_no_flag_does(models, capsys):
    assert main(["classify", str(models["spam"]), *TEXTS]) == 0
    default = capsys.readouterr().out
    assert main(["classify", str(models["spam"]), "--device", "cpu", *TEXTS]) == 0
    assert capsys.readouterr().out == default and len(default.splitlines()) == len(TEXTS)


def test_device_cuda_without_a_gpu_is_a_one_line_error(models, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["classify", str(models["spam"]), "--device", "cuda", "hi"]) == 2
    assert "--device cuda: CUDA is not available" in one_line_error(capsys.readouterr().err, "classify")


@pytest.mark.parametrize("model, option, hint", [
    ("spam_onnx", ["--device", "cuda"], "placed by --provider (cpu, or cuda for the GPU)"),
    ("spam_onnx", ["--device", "cpu", "--provider", "cuda"], "placed by --provider"),
    ("spam", ["--provider", "cuda"], "is a checkpoint, run in PyTorch: use --device cuda"),
])
def test_each_option_refuses_the_other_kind_of_model(models, model, option, hint, capsys):
    assert main(["classify", str(models[model]), *option, "hi"]) == 2
    assert hint in one_line_error(capsys.readouterr().err, "classify")
