"""bench/gpu_check.sh, the one script a person with a GPU runs, keeps working between the times
someone has a GPU: its `--cpu-smoke` mode runs every part (the GPU tests, GPT-2 trained from the
CLI, generation against transformers, serving) with tiny sizes on the CPU and parses their output
into the summary line, as on a GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 2 minutes on 2 CPU cores
def test_the_gpu_check_runs_every_part_on_the_cpu_and_ends_with_its_summary(tmp_path):
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = last.split(" | ")
    assert parts[0] == "gpu_check: cpu (smoke run)" and parts[-1] == "ok", last
    assert re.fullmatch(r"gpu tests \d+ skipped", parts[1]), last  # no CUDA here: every GPU test skips
    assert re.fullmatch(r"GPT-2 2-layer fp32 \(cpu smoke\) MFU [\d.]+% \(target 40%: (met|missed)\)", parts[2]), last
    assert re.fullmatch(r"peak memory [\d.]+ GB vs plan [\d.]+ GB \([\d.]+x\)", parts[3]), last
    assert re.fullmatch(r"generate [\d.]+x transformers \(fp32, 16 tokens, 16/16 the same\)", parts[4]), last
    assert parts[5].startswith("serve: short behind long "), last
    assert not list(tmp_path.glob("lmspec-gpu-check.*"))  # its logs are removed when everything passed
