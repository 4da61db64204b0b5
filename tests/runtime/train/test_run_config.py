"""Runs people configure: `--config FILE.toml` (the command line overriding it, mistakes located at
file:line), RUN/config.toml that repeats a run bit for bit, the shipped recipes, `--schedule`, and
`--init-from` a checkpoint (an imported Hugging Face model) with its validation loss at step 0."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from runtime_helpers import ROOT, SHARED_DATA, SMALL, lmspec_main
from lmspec.runtime.train.config import TrainConfig, config_for_resume
from lmspec.runtime.train.schedule import learning_rate

SPEC = str(ROOT / "specs" / "tiny.arch")
FLAGS = [SPEC, *SMALL, "--set", "layers=1", "--steps", "6", "--batch", "2", "--seq", "16", "--eval-every", "3",
         "--eval-batches", "1", "--warmup", "2", "--schedule", "wsd", "--decay-fraction", "0.5", "--lr", "3e-3",
         "--no-progress", "--sample-tokens", "0"]
SAME_AS_TOML = f"""# the run FLAGS describes, as a config file: dashes or underscores, --set as a table
spec = "{SPEC}"
steps = 6
batch = 2
seq = 16
eval-every = 3
eval_batches = 1
warmup = 2
schedule = "wsd"
decay-fraction = 0.5
lr = 3e-3
no-progress = true
sample-tokens = 0

[set]
layers = 1
dim = 32
heads = 2
context = 32
"""


def weights(run) -> dict:
    return load_file(str(next((run / "checkpoints").glob("step_*")) / "model.safetensors"))


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    keep = ("step", "loss", "lr", "val_loss")
    assert [{k: r.get(k) for k in keep} for r in records(a)] == [{k: r.get(k) for k in keep} for r in records(b)]


def test_a_toml_run_equals_the_flag_run_and_its_config_toml_repeats_it(tmp_path):
    out = lmspec_main("train", *FLAGS, "--out", tmp_path / "flags")
    assert out.returncode == 0, out.stderr
    (tmp_path / "run.toml").write_text(SAME_AS_TOML)
    out = lmspec_main("train", "--config", tmp_path / "run.toml", "--out", tmp_path / "toml")
    assert out.returncode == 0, out.stderr
    assert_same_run(tmp_path / "flags", tmp_path / "toml")
    # the run's own record of its options, read back: the same run again
    written = (tmp_path / "flags" / "config.toml").read_text()
    assert 'schedule = "wsd"' in written and "layers=1" in written
    out = lmspec_main("train", "--config", tmp_path / "flags" / "config.toml", "--out", tmp_path / "again")
    assert out.returncode == 0, out.stderr
    assert_same_run(tmp_path / "flags", tmp_path / "again")
    # the learning rates the loop used are the wsd schedule's: stable up to step 3, then decaying to lr / 10
    logged = {r["step"]: r["lr"] for r in records(tmp_path / "flags") if "lr" in r}
    for step, lr in logged.items():
        assert lr == pytest.approx(learning_rate(step - 1, max_lr=3e-3, min_lr=3e-4, warmup=2, decay_steps=6,
                                                 schedule="wsd", decay_fraction=0.5))
    assert logged[3] == pytest.approx(3e-3) and logged[6] < logged[3]
    # a flag given on the command line beats the file, and the run records what it used
    from lmspec.runtime.cli.config_file import config_text
    from lmspec.runtime.cli.main import options_of_run, parser
    argv = ["train", "--config", str(tmp_path / "run.toml"), "--steps", "3"]
    top = parser()
    args = options_of_run(top.parse_args(argv), argv, top)
    assert (args.steps, args.schedule, args.set) == (3, "wsd", ["layers=1", "dim=32", "heads=2", "context=32"])
    assert "steps = 3" in config_text(args, args.verb_parser, "train")


@pytest.mark.parametrize("text, message", [
    ('spec = "x.arch"\nsteps = "ten"\n', 'bad.toml:2: steps must be an integer, got "ten"'),
    ('spec = "x.arch"\n\nevall-every = 3\n', "bad.toml:3: unknown option 'evall-every' (did you mean 'eval-every'?)"),
    ('spec = "x.arch"\nprecision = "fp8"\n', "bad.toml:2: precision must be one of fp32, bf16, fp16"),
    ('spec = "x.arch"\nsteps = [\n', "bad.toml: not TOML"),
    ("steps = 3\n", "the following arguments are required: SPEC"),
    ('spec = "x.arch"\nconfig = "other.toml"\n', "bad.toml:2: 'config' belongs on the command line"),
])
def test_a_mistake_in_a_config_file_is_located_and_nothing_is_written(tmp_path, monkeypatch, capsys, text, message):
    from lmspec.runtime.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text(text)
    assert main(["train", "--config", "bad.toml", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_the_shipped_recipes_name_real_specs_and_only_options_train_takes(tmp_path):
    from lmspec.runtime.cli.config_file import options_from_file
    from lmspec.runtime.cli.main import parser

    recipes = sorted((ROOT / "specs" / "recipes").glob("*.toml"))
    assert [r.stem for r in recipes] == ["gpt2-shards", "llama3.2-1b-fsdp", "shakespeare-char"]
    train = parser()._subparsers._group_actions[0].choices["train"]
    for recipe in recipes:
        options = options_from_file(str(recipe), train)
        assert (ROOT / options["spec"]).is_file(), recipe
        TrainConfig(steps=options["steps"], lr=options["lr"], schedule=options.get("schedule", "cosine")) \
            .resolved(1024)
    # the Shakespeare recipe runs as it is, cut short from the command line
    out = lmspec_main("train", "--config", ROOT / "specs" / "recipes" / "shakespeare-char.toml", "--steps", "2",
                     "--batch", "2", "--eval-batches", "1", "--no-progress", "--sample-tokens", "0",
                     "--out", tmp_path / "shakespeare")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "shakespeare" / "checkpoints" / "step_000002" / "meta.json").read_text()
                      )["train_config"]["betas"] == [0.9, 0.99]


def test_a_resumed_run_keeps_its_schedule_and_an_old_checkpoint_reads_as_cosine():
    class Saved:
        path = "runs/x"
        train_config = TrainConfig(schedule="wsd", decay_fraction=0.3).to_dict()
    cfg, changed = config_for_resume(TrainConfig(), Saved)
    assert (cfg.schedule, cfg.decay_fraction) == ("wsd", 0.3) and changed["schedule"] == {"given": "cosine",
                                                                                          "used": "wsd"}
    Saved.train_config = {k: v for k, v in Saved.train_config.items() if k not in ("schedule", "decay_fraction")}
    assert config_for_resume(TrainConfig(), Saved)[0].schedule == "cosine"


def test_each_schedule_has_its_shape():
    rate = lambda step, schedule: learning_rate(step, max_lr=1.0, min_lr=0.1, warmup=10, decay_steps=110,  # noqa
                                                schedule=schedule, decay_fraction=0.2)
    assert [rate(s, "constant") for s in (10, 60, 109, 200)] == [1.0] * 4
    assert rate(60, "linear") == pytest.approx(0.55) and rate(110, "linear") == 0.1
    # wsd: stable until 110 - 22 = 88, then linear to the floor
    assert [rate(s, "wsd") for s in (10, 87, 88)] == [1.0, 1.0, 1.0]
    assert rate(99, "wsd") == pytest.approx(1.0 - 0.9 * 11 / 22) and rate(110, "wsd") == 0.1
    assert rate(60, "cosine") == pytest.approx(0.55)
    assert all(rate(s, k) == rate(s, "cosine") for s in range(10) for k in ("wsd", "linear", "constant"))


@pytest.fixture(scope="module")
def imported_gpt2(tmp_path_factory):
    """A random GPT-2 (2 layers, dim 64, GPT-2's vocabulary) from transformers, imported by `lmspec import hf`."""
    transformers = pytest.importorskip("transformers")
    tokenizer = SHARED_DATA / "gpt2-tokenizer"
    if not (tokenizer / "encoder.json").is_file():
        pytest.skip(f"GPT-2 tokenizer not found at {tokenizer}")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
    root = tmp_path_factory.mktemp("init")
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "hf", safe_serialization=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(tokenizer / name, root / "hf" / name)
    out = lmspec_main("import", "hf", root / "hf", "-o", root / "imported", "--emit-spec", root / "gpt2-tiny.arch")
    assert out.returncode == 0, out.stderr
    return root


def test_init_from_an_imported_model_starts_at_its_validation_loss(imported_gpt2, tmp_path):
    from lmspec.runtime.checkpoint.models import load_model
    from lmspec.runtime.data.token_data import TokenData
    from lmspec.runtime.data.tokenizer import load_tokenizer
    from lmspec.runtime.train.steps import validation_loss

    root, data = imported_gpt2, SHARED_DATA / "the-verdict.txt"
    out = lmspec_main("train", root / "gpt2-tiny.arch", "--init-from", root / "imported", "--data", data,
                     "--steps", "2", "--batch", "2", "--seq", "32", "--eval-every", "2", "--eval-batches", "2",
                     "--lr", "1e-4", "--no-progress", "--sample-tokens", "0", "--out", tmp_path / "continued")
    assert out.returncode == 0, out.stderr
    first = records(tmp_path / "continued")[0]
    assert first["step"] == 0 and "step 0: val loss" in out.stdout
    loaded = load_model(str(root / "imported"))
    tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
    windows = TokenData(torch.tensor(tokenizer.encode(data.read_text()))).val_batches(2, 32, 2)
    assert first["val_loss"] == pytest.approx(validation_loss(loaded.model, windows), rel=1e-6)
    meta = json.loads((tmp_path / "continued" / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert meta["tokenizer"] == loaded.checkpoint.tokenizer  # the imported model's, not the text's characters


def test_init_from_a_checkpoint_the_spec_does_not_fit_reports_the_diff_and_writes_nothing(imported_gpt2, tmp_path):
    root = imported_gpt2
    out = lmspec_main("train", root / "gpt2-tiny.arch", "--set", "layers=3", "--init-from", root / "imported",
                     "--out", tmp_path / "run")
    assert out.returncode == 1
    assert out.stderr.startswith(f"lmspec train: error: --init-from {root / 'imported'}: its weights do not load")
    assert "breaking: checkpoints of OLD do not load into NEW" in out.stderr and "added    block.2." in out.stderr
    out = lmspec_main("train", root / "gpt2-tiny.arch", "--init-from", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert out.returncode == 1 and out.stderr == f"lmspec train: error: --init-from: {tmp_path / 'nowhere'}: no such " \
                                                 f"file or directory\n"
    assert not (tmp_path / "run").exists()


def test_the_finetune_verbs_read_a_config_file_too(tmp_path):
    """The same mechanism on `finetune classify`: its positional and its required -o from the file, a
    flag from the command line on top; and a run's record of them reads back to the same options."""
    from lmspec.runtime.cli.config_file import config_text
    from lmspec.runtime.cli.main import options_of_run, parser

    (tmp_path / "spam.toml").write_text('checkpoint = "runs/base"\nout = "runs/spam"\ndata = "sms.tsv"\n'
                                        'labels = "ham,spam"\nepochs = 2\nschedule = "linear"\nbalance = true\n')
    argv = ["finetune", "classify", "--config", str(tmp_path / "spam.toml"), "--epochs", "3"]
    top = parser()
    args = options_of_run(top.parse_args(argv), argv, top)
    assert (args.checkpoint, args.out, args.labels, args.epochs, args.schedule, args.balance) == \
        ("runs/base", "runs/spam", "ham,spam", 3, "linear", True)
    (tmp_path / "written.toml").write_text(config_text(args, args.verb_parser, args.verb_name))
    argv = ["finetune", "classify", "--config", str(tmp_path / "written.toml")]
    top = parser()
    again = options_of_run(top.parse_args(argv), argv, top)
    assert {k: v for k, v in vars(again).items() if k not in ("config", "verb_parser", "parser_of_verb", "run_options", "handler")} \
        == {k: v for k, v in vars(args).items() if k not in ("config", "verb_parser", "parser_of_verb", "run_options", "handler")}
