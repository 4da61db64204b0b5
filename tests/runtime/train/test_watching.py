"""Watching a run: `--log tensorboard` writes TensorBoard event files holding what metrics.jsonl holds
(read back with TensorBoard's own reader), a resumed run shows no step twice, loss.png is redrawn at
each evaluation (so a run stopped early has one), a finetune verb logs the same way, and `lmspec plot`
draws runs over each other, its bad input one clear line."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime_helpers import ROOT, SMALL, VERDICT
from lmspec.runtime.cli.main import main
from lmspec.runtime.train import watch
from lmspec.runtime.train.metrics import read_metrics

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# 30 steps, logged every 10 (the loop's log_every), evaluated every 10: three records, three evaluations
TINY = ["train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--steps", "30", "--eval-every", "10",
        "--eval-batches", "1", "--batch", "2", "--seq", "16", "--warmup", "5", "--no-progress", "--sample-tokens", "0"]


@pytest.fixture(autouse=True)
def _needs_the_verdict():
    if not VERDICT.is_file():
        pytest.skip(f"shared data not found at {VERDICT}")


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard log directory, as TensorBoard itself reads it (purges applied)."""
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def numbers(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers by key, as (step, value): what TensorBoard should show."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((r["step"], value))
    return series


def assert_same_series(tensorboard: dict, metrics: dict) -> None:
    assert set(tensorboard) == set(metrics)
    for key, expected in metrics.items():
        got = tensorboard[key]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        # TensorBoard keeps float32
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key


def record_draws(patch: pytest.MonkeyPatch, draws: list) -> None:
    """Each loss.png the loop draws while it trains, into `draws`: (the last step logged when it was
    drawn, the PNG's size just after)."""
    real = watch.plot_loss_curve

    def drawing(jsonl, png, *rest):
        real(jsonl, png, *rest)
        draws.append((read_metrics(jsonl)[-1]["step"], Path(png).stat().st_size))

    patch.setattr(watch, "plot_loss_curve", drawing)


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A tiny run trained with --log tensorboard, and each loss.png drawn while it trained."""
    run = tmp_path_factory.mktemp("watched") / "run"
    draws = []
    with pytest.MonkeyPatch.context() as patch:
        record_draws(patch, draws)
        assert main([*TINY, "--log", "tensorboard", "--out", str(run)]) == 0
    return run, draws


def test_tensorboard_holds_every_number_metrics_jsonl_holds(watched):
    run, _ = watched
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30]
    expected = numbers(records)
    assert {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes", "tokens"} <= set(expected)
    assert_same_series(scalars(run / "tensorboard"), expected)
    assert [t for _, t in expected["tokens"]] == [s * 2 * 16 for s in (10, 20, 30)]  # step x batch x seq


def test_loss_png_is_redrawn_at_each_evaluation(watched):
    run, draws = watched
    assert [step for step, _ in draws] == [10, 20, 30]  # after each evaluation's record, not only at the end
    assert all(size > 1000 for _, size in draws)
    assert (run / "loss.png").stat().st_size > 1000


def test_a_resumed_run_shows_no_step_twice(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--ckpt-every", "20", "--log", "tensorboard", "--out", str(run)]) == 0
    # a run that died after logging step 30 but before checkpointing it: its last checkpoint is step 20
    checkpoints = run / "checkpoints"
    shutil.rmtree(checkpoints / "step_000030")
    (checkpoints / "latest").write_text("step_000020")
    first = scalars(run / "tensorboard")
    assert [s for s, _ in first["loss"]] == [10, 20, 30]
    time.sleep(1.1)  # TensorBoard orders event files by name, whose first part is the second they were opened
    assert main([*TINY, "--log", "tensorboard", "--out", str(run), "--resume"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    after = scalars(run / "tensorboard")
    assert_same_series(after, numbers(records))  # step 30 once, the resumed session's values
    assert after["elapsed"][-1][1] != pytest.approx(first["elapsed"][-1][1], rel=1e-6)


def test_a_run_stopped_with_ctrl_c_has_its_plot_and_events(tmp_path):
    run = tmp_path / "run"
    args = [arg if arg != "30" else "100000" for arg in TINY]  # long enough to be stopped, never to end
    # Started as a background job of a non-interactive shell (`pytest … &`), pytest ignores SIGINT, and
    # so would its children: this one gets the default back, as a run started from a terminal has.
    proc = subprocess.Popen([sys.executable, "-m", "lmspec.runtime.cli", *args, "--threads", "1",
                             "--log", "tensorboard", "--out", str(run)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "loss.png").exists() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()  # the plot appeared while it trained
        assert (run / "loss.png").exists()
        while time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < 2:
            time.sleep(0.05)  # a record past the first evaluation, so that one is whole when stopped
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # not left training its 100,000 steps after the test
            raise
    assert proc.returncode == 130 and err.decode().strip().endswith("interrupted")
    records = read_metrics(run / "metrics.jsonl")
    assert records[-1]["step"] < 100000 and any("val_loss" in r for r in records)
    # closed on the way out, nothing buffered lost: every record but the last, which Ctrl-C may have cut short
    got, expected = scalars(run / "tensorboard"), numbers(records[:-1])
    assert {"loss", "val_loss", "lr"} <= set(expected)
    for key, series in expected.items():
        assert [s for s, _ in got[key][:len(series)]] == [s for s, _ in series], key
        assert [v for _, v in got[key][:len(series)]] == pytest.approx([v for _, v in series], rel=1e-6), key


def test_ctrl_c_while_the_logs_are_written_is_raised_once_they_are_whole(tmp_path, monkeypatch):
    """A Ctrl-C that lands while a record is written (inside TensorBoard's writer, say, which could
    leave its lock taken: runtime/train/interrupt.py) is raised once the record is whole."""
    import os
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # what a process starts with
    try:
        log = watch.RunLog.fresh(tmp_path, "tensorboard")
        flush, flushed = watch.TensorBoardLog.flush, []

        def flush_hit_by_ctrl_c(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs the handler between two bytecodes: it would raise here
            flush(self)
            flushed.append(True)
        monkeypatch.setattr(watch.TensorBoardLog, "flush", flush_hit_by_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            log.append({"step": 10, "loss": 2.5, "val_loss": 2.75}, redraw=True)
        assert flushed == [True]  # raised after the writing, not inside it
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        log.close()
        assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 10, "loss": 2.5, "val_loss": 2.75}]
        assert scalars(tmp_path / "tensorboard") == {"loss": [(10, 2.5)], "val_loss": [(10, 2.75)]}
        assert (tmp_path / "loss.png").is_file()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_finetune_instruct_logs_to_tensorboard_and_redraws(tmp_path, bpe):
    from lmspec.compiler import load_spec
    from lmspec.compiler.lower import lower
    from lmspec.compiler.rewrites import spec_record
    from lmspec.runtime.checkpoint.store import save_checkpoint
    settings = {"layers": 1, "dim": 16, "heads": 2, "context": 256, "vocab": 400, "dropout": 0.0}
    graph = load_spec("specs/gpt2.arch", settings)
    base = tmp_path / "base"
    save_checkpoint(base, step=0, model=lower(graph, seed=0), optimizer=None, rng=None, train_config={}, metrics={},
                    tokenizer=bpe.to_json(), spec=spec_record(graph, settings))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}"}
                                for i in range(20)]))
    out = tmp_path / "ft"
    draws = []
    with pytest.MonkeyPatch.context() as patch:
        record_draws(patch, draws)
        assert main(["finetune", "instruct", str(base), "--data", str(data), "--out", str(out), "--epochs", "1",
                     "--batch", "4", "--split", "0.8,0.2,0", "--eval-every", "2", "--no-progress",
                     "--log", "tensorboard"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert_same_series(scalars(out / "tensorboard"), numbers(records))
    assert [step for step, _ in draws] == [0, 2, 4]  # step 0, every 2 steps, the end
    assert (out / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("argv", [
    ["train", "specs/tiny.arch", "--data", "no/such.txt"],
    ["finetune", "instruct", "no/such/run", "--data", "no/such.json"],
    ["finetune", "dpo", "no/such/run", "--data", "no/such.json"],
    ["finetune", "classify", "no/such/run", "--data", "no/such.tsv", "--labels", "a,b"],
])
def test_log_tensorboard_without_the_package_is_one_line_before_any_work(argv, tmp_path, capsys, monkeypatch):
    for module in ("tensorboard", "torch.utils.tensorboard"):  # as if never installed
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "run"
    code = main([*argv, "--out", str(out), "--log", "tensorboard"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"lmspec {' '.join(argv[:2]) if argv[0] == 'finetune' else 'train'}: error: --log tensorboard "
                   f"needs the tensorboard package: pip install tensorboard\n")
    assert not (out / "metrics.jsonl").exists()


def test_log_is_none_by_default(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "10", "--out", str(run)]) == 0
    assert (run / "metrics.jsonl").is_file() and (run / "loss.png").is_file()
    assert not (run / "tensorboard").exists()


# ------------------------------------------------------------------------------------------ lmspec plot

def made_run(root: Path, name: str, records: list[dict], tokens_per_step: int | None = None) -> Path:
    """A run directory with these records, and a checkpoint's meta.json saying tokens so far when given."""
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if tokens_per_step is not None:
        step = records[-1]["step"]
        checkpoint = run / "checkpoints" / f"step_{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "meta.json").write_text(json.dumps({"step": step, "metrics": {"tokens": step * tokens_per_step}}))
    return run


def colour_pixels(png: Path, colour: str) -> int:
    """How many pixels of the image are (nearly) this matplotlib colour."""
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread
    image = imread(str(png))[..., :3]
    return int((np.abs(image - np.array(to_rgb(colour))).max(axis=-1) < 0.05).sum())


def test_plot_draws_two_runs_over_each_other(watched, tmp_path, capsys):
    run, _ = watched
    records = [{"step": s, "loss": 5 - s / 10, "lr": 1e-3} for s in (5, 10, 15, 20)]
    other = made_run(tmp_path, "other", records[:-1] + [records[-1] | {"val_loss": 5.0}])
    png = tmp_path / "both.png"
    assert main(["plot", str(run), str(other), "-o", str(png)]) == 0
    assert capsys.readouterr().out == f"{png}: 2 runs (run, other) against steps\n"
    from matplotlib.image import imread
    assert imread(str(png)).shape[:2] == (700, 900)
    assert colour_pixels(png, "C0") > 200 and colour_pixels(png, "C1") > 200  # each run's own colour
    alone = tmp_path / "alone.png"
    assert main(["plot", str(run), "-o", str(alone)]) == 0
    assert colour_pixels(alone, "C1") == 0


def test_plot_against_tokens(watched, tmp_path, capsys):
    from lmspec.runtime.train.plots import read_runs
    run, _ = watched
    # logged before records carried tokens: its checkpoint says 64 tokens a step
    older = made_run(tmp_path, "older", [{"step": s, "loss": 4.0, "lr": 1e-3} for s in (10, 20)], tokens_per_step=64)
    png = tmp_path / "tokens.png"
    assert main(["plot", str(run), str(older), "--x", "tokens", "-o", str(png)]) == 0
    assert "against tokens" in capsys.readouterr().out and png.stat().st_size > 1000
    mine, theirs = read_runs([run, older])
    assert mine.xs("tokens") == [r["tokens"] for r in mine.records] == [320, 640, 960]
    assert theirs.xs("tokens") == [640, 1280] and theirs.xs("steps") == [10, 20]


def test_a_run_with_the_same_name_is_labelled_by_its_path(tmp_path):
    from lmspec.runtime.train.plots import read_runs
    a = made_run(tmp_path / "a", "run", [{"step": 1, "loss": 1.0}])
    b = made_run(tmp_path / "b", "run", [{"step": 1, "loss": 1.0}])
    c = made_run(tmp_path, "c", [{"step": 1, "loss": 1.0}])
    assert [r.label for r in read_runs([a, b, c])] == [str(a), str(b), "c"]


@pytest.mark.parametrize("case, message", [
    ("missing", "no/such/run: no such run directory"),
    ("file", "not a run directory"),
    ("no_metrics", "not a run directory (no metrics.jsonl in it)"),
    ("empty", "metrics.jsonl: no records yet"),
    ("unwritable", "cannot write"),
    ("tokens_of_a_finetuning_run", "plot it with --x steps"),
])
def test_plot_errors_are_one_clear_line(case, message, tmp_path, capsys):
    good = made_run(tmp_path, "good", [{"step": 1, "loss": 2.0, "lr": 1e-3}])
    png, extra, run = tmp_path / "out.png", [], str(good)
    if case == "missing":
        run = "no/such/run"
    elif case == "file":
        run = str(good / "metrics.jsonl")
    elif case == "no_metrics":
        (tmp_path / "bare").mkdir()
        run = str(tmp_path / "bare")
    elif case == "empty":
        run = str(made_run(tmp_path, "empty", []))
    elif case == "unwritable":
        png = good / "metrics.jsonl" / "out.png"  # a path through a file
    else:
        extra = ["--x", "tokens"]
    code = main(["plot", str(good), run, "-o", str(png), *extra])
    err = capsys.readouterr().err
    assert code != 0 and message in err, err
    assert err.count("\n") == 1 and err.startswith("lmspec plot: error:") and "Traceback" not in err
    assert not png.exists()
