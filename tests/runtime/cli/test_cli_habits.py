"""What people expect of a command line: `python -m lmspec`, `--version`, defaults in `--help`, no
silent abbreviation of long options, and `-o/--out` on every verb that writes."""
import re
import subprocess
import sys

import pytest

from lmspec.runtime.cli.main import VERBS, main, parser
from runtime_helpers import ROOT


def test_python_m_lmspec_is_the_command():
    out = subprocess.run([sys.executable, "-m", "lmspec", "check", "specs/tiny.arch"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "checked 1 file: ok" in out.stdout, out.stderr
    version = subprocess.run([sys.executable, "-m", "lmspec", "--version"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    from importlib.metadata import version as installed
    assert version.returncode == 0 and version.stdout.strip() == f"lmspec {installed('lmspec')}"


def test_an_abbreviated_long_option_is_refused_by_the_verb_with_the_option_meant(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "specs/tiny.arch", "--step", "5", "--out", "nowhere"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    # the verb's usage and name, not `lmspec [-h] [--version] VERB ...`, in one line, not argparse's 22
    assert err.splitlines() == ["usage: lmspec train [options] [spec]   (see lmspec train --help)",
                                "lmspec train: error: unrecognized arguments: --step 5 (did you mean --steps?)"]
    with pytest.raises(SystemExit):
        main(["data", "prepare", "in.txt", "-o", "out", "--bogus", "extra"])
    assert capsys.readouterr().err.splitlines()[-1] == \
        "lmspec data prepare: error: unrecognized arguments: --bogus extra"  # nothing near enough to suggest


@pytest.mark.parametrize("args, usage, message", [
    (["trian", "specs/tiny.arch"], "lmspec [options] VERB ...",
     "argument VERB: invalid choice: 'trian' (did you mean 'train'?)"),
    (["data", "prepair", "x.txt"], "lmspec data [options] ACTION ...",
     "argument ACTION: invalid choice: 'prepair' (did you mean 'prepare'?)"),
    (["train", "specs/tiny.arch", "--precision", "bf61"], "lmspec train [options] [spec]",
     "argument --precision: invalid choice: 'bf61' (did you mean 'bf16'?)"),
    (["train", "specs/tiny.arch", "--precision", "q"], "lmspec train [options] [spec]",  # nothing near: every choice
     "argument --precision: invalid choice: 'q' (choose from 'fp32', 'bf16', 'fp16')"),
    (["finetune", "instrukt"], "lmspec finetune [options] ACTION ...",
     "argument ACTION: invalid choice: 'instrukt' (did you mean 'instruct'?)"),
])
def test_a_misspelt_choice_is_named_with_the_choice_meant_under_a_one_line_usage(args, usage, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    prog = usage.split(" [options]")[0]
    err = capsys.readouterr().err
    assert err.splitlines() == [f"usage: {usage}   (see {prog} --help)", f"{prog}: error: {message}"]


@pytest.mark.parametrize("args, message", [
    (["train", "specs/tiny.arch", "--tp", "-1"], "argument --tp: must be an integer >= 1, got -1"),
    (["train", "specs/tiny.arch", "--threads", "-2"],
     "argument --threads: must be an integer >= 1 and <= 65536, got -2"),
    (["train", "specs/tiny.arch", "--peak-tflops", "0"], "argument --peak-tflops: must be a finite number > 0, got 0"),
    (["train", "specs/tiny.arch", "--pad-vocab", "0"], "argument --pad-vocab: must be an integer >= 1, got 0"),
    # before: --steps 0 trained the default 500 steps, and --seed -1 trained; --seq 0 was refused after the
    # corpus was read, in other words than --seq -1
    (["train", "specs/tiny.arch", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["train", "specs/tiny.arch", "--seed", "-1"], "argument --seed: must be an integer >= 0 and < 2^63, got -1"),
    (["train", "specs/tiny.arch", "--seq", "0"], "argument --seq: must be an integer >= 1, got 0"),
    (["eval", "runs/x", "--threads", "1000000000000"],  # before: torch's set_num_threads overflowed, a traceback
     "argument --threads: must be an integer >= 1 and <= 65536, got 1000000000000"),
    (["train", "specs/tiny.arch", "--beta2", "1"], "argument --beta2: must be a finite number >= 0 and < 1, got 1"),
    (["finetune", "instruct", "runs/x", "--data", "d.json", "-o", "o", "--lr", "nan"],
     "argument --lr: must be a finite number > 0, got nan"),
    (["plan", "specs/gpt2.arch", "--gpu-memory", "0GB"], "argument --gpu-memory: must be positive, got 0GB"),
    (["info", "specs/gpt2.arch", "--pp", "0"], "argument --pp: must be an integer >= 1, got 0"),
    (["serve", "m.onnx", "--port", "-1"], "argument --port: must be an integer >= 0 and <= 65535, got -1"),
    (["sample", "runs/x", "--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got nan"),
    (["sample", "runs/x", "--top-p", "1.5"], "argument --top-p: must be a finite number > 0 and <= 1, got 1.5"),
    (["generate", "m.onnx", "--seed", "-1"], "argument --seed: must be an integer >= 0 and < 2^63, got -1"),
    (["eval", "runs/x", "--threads", "zero"], "argument --threads: must be an integer >= 1 and <= 65536, got 'zero'"),
    (["finetune", "dpo", "runs/x", "--data", "d.json", "-o", "o", "--beta", "0"],
     "argument --beta: must be a finite number > 0, got 0"),
    (["serve", "m.onnx", "--request-timeout", "inf"], "argument --request-timeout: must be a finite number > 0, got inf"),
    (["data", "tokenize", "in.txt", "-o", "s", "--tokenizer", "t.json", "--val-fraction", "1"],
     "argument --val-fraction: must be a finite number >= 0 and < 1, got 1"),
    (["data", "prepare", "in.txt", "-o", "p", "--near-dup-threshold", "0"],
     "argument --near-dup-threshold: must be a finite number > 0 and < 1, got 0"),
])
def test_a_number_out_of_range_is_refused_by_its_verb_before_anything_runs(args, message, capsys):
    # the paths do not exist: the number is refused first
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    verb = " ".join(a for a in args[:2] if not ("/" in a or "." in a))
    assert stop.value.code == 2 and err.splitlines()[-1] == f"lmspec {verb}: error: {message}", err


def test_a_number_out_of_range_in_a_config_file_is_located(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('spec = "specs/tiny.arch"\nsteps = 3\nthreads = -2\n')
    assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{config}:3: threads must be an integer >= 1 and <= 65536, got -2")


# Numeric options whose range is checked by the stage that uses them, each with a test of its own: the
# exporter knows its opsets, the tokenizer trainer how many tokens its bytes and special tokens take.
# Any other takes a type of runtime/cli/numbers.py, which refuses a bad value before anything runs.
CHECKED_BY_THEIR_STAGE = {"export": {"--opset"}, "tokenizer train": {"--vocab-size"}}


def test_every_numeric_option_has_its_range_checked():
    unchecked = {}
    for verb, verb_parser in _verb_parsers(parser()):
        plain = {a.option_strings[-1] for a in verb_parser._actions if a.type in (int, float) and a.option_strings}
        if plain != CHECKED_BY_THEIR_STAGE.get(verb, set()):
            unchecked[verb] = sorted(plain ^ CHECKED_BY_THEIR_STAGE.get(verb, set()))
    assert not unchecked, f"give these a type of runtime/cli/numbers.py (or list them above): {unchecked}"


def _verb_parsers(p, prefix=""):
    below = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not below and prefix:
        yield prefix.strip(), p
    for action in below:
        for name, q in action.choices.items():
            yield from _verb_parsers(q, f"{prefix}{name} ")


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch BATCH (default: 12)" in text and "--lr LR (default: 0.001)" in text
    assert text.count("(default: 12)") == 1
    assert "(default: 500, or the resumed run's)" in text  # a help that says its default keeps its own words


def _subparsers(p):
    return next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices


def test_every_verb_that_writes_takes_o_and_out():
    verbs = _subparsers(parser())
    writers = []
    for row in VERBS:
        *group, name = row.name.split(" ")
        q = _subparsers(verbs[group[0]])[name] if group else verbs[name]
        options = {o for a in q._actions for o in a.option_strings}
        if "--out" in options or "--output" in options:
            writers.append(row.name)
            assert {"-o", "--out"} <= options, row.name
    assert {"train", "export", "import hf", "data prepare", "finetune classify", "lora merge"} <= set(writers)


def _example_commands():
    """(where, argv) of every `lmspec …` command in the verbs' --help examples, the top-level one and
    the README's shell blocks:
    after `-m lmspec` under torchrun, a pipe or a variable, up to a redirection or the next command,
    with `\\` continuations joined and comments cut."""
    import shlex

    from lmspec.runtime.cli.main import TOUR

    def is_operator(word):
        return set(word) <= set("();<>|&")

    texts = [("lmspec --help", TOUR)] + [(f"lmspec {row.name} --help", row.examples or "") for row in VERBS]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    texts += [("README.md", block) for block in re.findall(r"^```sh\n(.*?)^```", readme, re.S | re.M)]
    for where, text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            if "lmspec " not in line:  # a heading, or a curl
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
            for start, word in enumerate(words):
                before = words[start - 1] if start else ""
                if word == "lmspec" and (not before or before == "-m" or is_operator(before) or "=" in before):
                    argv = words[start + 1:]
                    yield where, argv[:next((i for i, w in enumerate(argv) if is_operator(w)), len(argv))]


def test_every_example_in_the_help_and_the_readme_parses_and_names_specs_that_exist():
    commands = list(_example_commands())
    assert {where for where, _ in commands} >= {f"lmspec {row.name} --help" for row in VERBS} | {"README.md"}
    top = parser()
    for where, argv in commands:
        try:
            args, unknown = top.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `lmspec {' '.join(argv)}` does not parse")
        assert not unknown, f"{where}: `lmspec {' '.join(argv)}`: {unknown} taken by no option"
        for word in argv:
            if word.startswith("specs/") and word.endswith(".arch") and "*" not in word:
                assert (ROOT / word).is_file(), f"{where}: {word} is no spec"
