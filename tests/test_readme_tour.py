"""The README's tour runs as written: its commands, in order, in a scratch directory laid out like the
repository (`specs/` and `../shared/data` reachable), the server on a free port in place of 8000.

The tour is the text between `<!-- tour -->` and `<!-- /tour -->` in README.md; in it, every ```sh
block holds shell commands (one a line, `\\` continues a line) and every ```python block is one
program. `lmspec serve` runs in the background until the commands after it are done.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TOUR = re.compile(r"<!-- tour -->(.*?)<!-- /tour -->", re.S)
BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```", re.S | re.M)
STEP_TIMEOUT = 600

# Every stage the tour promises, by how its command starts.
STAGES = ("lmspec data prepare", "lmspec tokenizer train", "lmspec data tokenize", "lmspec check", "lmspec info",
          "lmspec train", "lmspec sample", "lmspec finetune classify", "lmspec classify",
          "lmspec finetune instruct", "lmspec chat", "lmspec eval", "lmspec export", "lmspec generate",
          "lmspec serve", "curl")


def tour_steps(readme: str) -> list[tuple[str, str]]:
    """(kind, text) in the README's order: ("sh", one command) or ("python", one program)."""
    tours = TOUR.findall(readme)
    assert len(tours) == 1, "README.md needs one <!-- tour --> ... <!-- /tour --> section"
    steps = []
    for kind, body in BLOCK.findall(tours[0]):
        if kind == "python":
            steps.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                steps.append(("sh", line))
    return steps


def test_the_tour_covers_every_stage():
    steps = tour_steps((ROOT / "README.md").read_text())
    commands = [text for kind, text in steps if kind == "sh"]
    for stage in STAGES:
        assert any(c == stage or c.startswith(stage + " ") or f"| {stage} " in c for c in commands), stage
    assert any(kind == "python" and "from openai import OpenAI" in text for kind, text in steps)
    assert sum(1 for c in commands if c.startswith("lmspec serve")) == 1


def test_the_readme_tour_runs_as_written(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is missing: the tour reads its data from ../shared/data")
    steps = tour_steps((ROOT / "README.md").read_text())
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA, target_is_directory=True)
    work = tmp_path / "repo"
    work.mkdir()
    (work / "specs").symlink_to(ROOT / "specs", target_is_directory=True)
    # One torch thread: as fast for a model this small, and with other processes on the cores two threads
    # that wait for each other can make training ten times slower.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    port = _free_port()
    server = None
    try:
        for kind, text in steps:
            if server is not None:
                text = re.sub(r"\b8000\b", str(port), text)
            if kind == "python":
                program = tmp_path / "client.py"
                program.write_text(text)
                out = _run([sys.executable, str(program)], work, env, "the Python client")
                assert out.stdout.strip(), "the openai client printed no completion"
            elif text.startswith("lmspec serve"):
                text = re.sub(r"--port \d+", f"--port {port}", text)
                assert f"--port {port}" in text, "the tour's serve command should name its --port"
                server = _start_server(text, work, env, tmp_path / "serve.log", port)
            else:
                out = _run(["bash", "-o", "pipefail", "-c", text], work, env, text)
                _check(text, out, work)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    assert server is not None, "the tour never started `lmspec serve`"
    assert server.returncode in (0, -15), (tmp_path / "serve.log").read_text()[-4000:]


def _run(argv: list[str], cwd: Path, env: dict, label: str) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert out.returncode == 0, (f"{label}\nexit {out.returncode}\n"
                                 f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}")
    return out


def _check(command: str, out: subprocess.CompletedProcess, cwd: Path) -> None:
    """What each step must have printed and written: every --out/-o path exists, and the verb's own output."""
    words = shlex.split(command)
    for flag, value in zip(words, words[1:]):
        if flag in ("--out", "-o", "--output", "--responses"):
            assert (cwd / value).exists(), f"{command}\ndid not write {value}"
    text = out.stdout + out.stderr
    verb = command.split("|")[-1].strip()
    expected = {
        "lmspec data prepare": r"documents in .* -> [\d,]+ kept",
        "lmspec tokenizer train": r"wrote \S+: [\d,]+ tokens",
        "lmspec data tokenize": r"train: [\d,]+ tokens .*val: [1-9][\d,]* tokens",
        "lmspec check": r"checked 1 file: ok",
        "lmspec info": r"parameters: [\d,]+",
        "lmspec train": r"done: step \d+, train loss [\d.]+, val loss [\d.]+",
        "lmspec finetune classify": r"test accuracy: [\d.]+% \(\d+ texts\)",
        "lmspec finetune instruct": r"done: \d+ steps, train loss [\d.]+, val loss [\d.]+",
        "lmspec eval": r"perplexity [\d.]+|accuracy [\d.]+%",
        "lmspec export": r"parity fp32: max \|logits difference\|",
        "lmspec sample": r"\S",
        "lmspec generate": r"\S",
        "lmspec chat": r"\S",
    }
    for start, pattern in expected.items():
        if verb.startswith(start + " "):
            assert re.search(pattern, text), f"{command}\nprinted no /{pattern}/:\n{text[-3000:]}"
            break
    if verb.startswith("lmspec classify "):
        texts = [w for w in words[3:] if not w.startswith("-")]
        lines = out.stdout.strip().splitlines()
        assert len(lines) == len(texts), text
        for line, sms in zip(lines, texts):
            assert re.fullmatch(r"(ham|spam)\s+[01]\.\d+\s+" + re.escape(sms), line), line
    if verb.startswith("lmspec train "):
        run = cwd / words[words.index("--out") + 1]
        assert (run / "checkpoints" / "latest").exists() and (run / "metrics.jsonl").exists()
    if verb.startswith("lmspec export "):
        bundle = cwd / words[words.index("-o") + 1]
        assert bundle.with_suffix(".lmspec.json").exists()
    if words[0] == "curl":
        answer = json.loads(out.stdout)
        assert answer["choices"][0]["text"].strip(), answer
        assert answer["usage"]["completion_tokens"] > 0, answer


def _start_server(command: str, cwd: Path, env: dict, log: Path, port: int) -> subprocess.Popen:
    """`lmspec serve` in the background, returned once /health answers."""
    with log.open("w") as sink:
        server = subprocess.Popen(["bash", "-c", "exec " + command], cwd=cwd, env=env,
                                  stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"{command}\nexited {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    pytest.fail(f"{command}\ndid not answer on port {port} within 120 s:\n{log.read_text()[-4000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
