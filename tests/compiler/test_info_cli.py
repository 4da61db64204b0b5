"""`lmspec info`: parameters, FLOPs, breakdown, JSON, and the graph drawn to a file."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def info(*args):
    return subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", "info", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_info_prints_parameters_flops_and_blocks():
    out = info("specs/gpt2.arch")
    assert out.returncode == 0, out.stderr
    assert "parameters: 124,439,808" in out.stdout
    assert "block.0 (x12)" in out.stdout and "7,087,872" in out.stdout
    assert "input  tokens: i64[batch, seq <= 1024]" in out.stdout


@pytest.mark.parametrize("spec, printed", [
    ("specs/llama3.2-1b.arch", "parameters: 1,235,814,400  (tied: lm_head.weight)"),
    ("specs/llama3.1-70b.arch", "parameters: 70,553,706,496"),
    ("specs/mistral-7b.arch", "parameters: 7,241,732,096"),
    ("specs/qwen3-0.6b.arch", "parameters: 596,049,920  (tied: lm_head.weight)"),
    ("specs/qwen3-30b-a3b.arch", "parameters: 30,532,122,624"),
])
def test_info_prints_the_published_count_of_modern_specs(spec, printed):
    out = info(spec)
    assert out.returncode == 0, out.stderr
    assert printed in out.stdout.splitlines()


def test_info_json_agrees_with_the_medium_count():
    out = info("specs/gpt2-medium.arch", "--format", "json")
    data = json.loads(out.stdout)
    assert data["parameters"] == 354_823_168
    assert data["training_flops_per_token"] == 3 * data["forward_flops_per_token"]
    assert sum(g["parameters"] * g["count"] for g in data["breakdown"]) == 354_823_168


def test_info_draws_the_graph(tmp_path):
    dot, svg = tmp_path / "g.dot", tmp_path / "g.svg"
    assert info("specs/tiny.arch", "--set", "layers=1", "--graph", str(dot)).returncode == 0
    text = dot.read_text()
    assert text.startswith("digraph tiny") and "attention" in text and "->" in text
    assert info("specs/tiny.arch", "--set", "layers=1", "--graph", str(svg)).returncode == 0
    assert "<svg" in svg.read_text()[:500]
    bad = info("specs/tiny.arch", "--graph", str(tmp_path / "g.txt"))
    assert bad.returncode == 2 and "use a .dot, .svg" in bad.stderr and "Traceback" not in bad.stderr


def test_info_does_not_import_torch():
    code = ("import sys; from lmspec.runtime.cli import main; main(['info', 'specs/gpt2.arch']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_output_cut_short_by_a_closed_pipe_is_no_error():
    # `lmspec info … | head -1`: the reader is gone before lmspec writes (it starts in ~0.3 s).
    proc = subprocess.Popen([sys.executable, "-m", "lmspec.runtime.cli", "info", "specs/gpt2.arch"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and "error" not in stderr, stderr


def test_info_prints_the_tensor_parallel_split():
    out = info("specs/llama3.2-1b.arch", "--tp", "8")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith(("block.", "embed."))}
    # 32 query heads and 8 kv heads of 64 over 8 ranks: (4 + 2 * 1) * 64 rows of q|k|v on each
    assert "[3072, 2048]" in rows["block.{0-15}.attn.qkv.weight"] and "[384, 2048]" in rows["block.{0-15}.attn.qkv.weight"]
    assert "[2048, 1024]" in rows["block.{0-15}.mlp.proj.weight"]  # the 8192 hidden, by row
    assert "[16032, 2048]" in rows["embed.weight"]  # 128256 / 8 vocab rows
    data = json.loads(info("specs/llama3.2-1b.arch", "--tp", "8", "--format", "json").stdout)["tensor_parallel"]
    per_layer = 3072 * 2048 // 8 + 2048 * 2048 // 8 + 16384 * 2048 // 8 + 2048 * 8192 // 8 + 2 * 2048
    assert data["parameters_per_rank"] == 128256 * 2048 // 8 + 16 * per_layer + 2048


def test_info_refuses_a_split_that_does_not_divide_at_the_op():
    out = info("specs/gpt2.arch", "--tp", "5")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "specs/gpt2.arch:11:21: error: attention: 12 heads do not divide over tensor-parallel size 5" in out.stderr


def test_info_prints_pipeline_stages_covering_every_block():
    data = json.loads(info("specs/llama3.1-8b.arch", "--pp", "4", "--seq", "4096", "--format", "json").stdout)
    stages = data["pipeline_stages"]
    assert [b for s in stages for b in s["blocks"]] == [f"block.{i}" for i in range(32)]
    assert stages[0]["holds_embedding"] and stages[-1]["holds_head"]
    assert sum(s["parameters"] for s in stages) == data["parameters"]
    out = info("specs/tiny.arch", "--pp", "5")
    assert out.returncode == 1 and "specs/tiny.arch:9:3: error: --pp 5 needs at least 5 repeated layers" in out.stderr
