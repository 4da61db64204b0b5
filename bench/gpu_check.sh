#!/usr/bin/env bash
# One command that checks lmspec on a machine with one NVIDIA GPU and prints one summary line last:
# the GPU tests, GPT-2 small trained from the command line (bf16 + torch.compile: MFU and peak memory
# against `lmspec plan`'s prediction), generation against transformers (bench/gpu_generate.py), and
# `lmspec serve` with continuous batching against static batching on onnxruntime's CUDA provider
# (bench/serve.py; skipped, and said so, when the installed onnxruntime has no CUDA provider).
#
#   bench/gpu_check.sh               # from the repository root, under 8 minutes on an H100
#   bench/gpu_check.sh --cpu-smoke   # the same plumbing on the CPU with tiny sizes (or GPU_CHECK_SMOKE=1)
#
# Settings (environment): GPU_CHECK_BATCH (default 32 sequences of 1024 tokens), GPU_CHECK_STEPS (300),
# GPU_CHECK_TOKENS (256 new tokens to generate), GPU_CHECK_MFU_TARGET (40, percent), GPU_CHECK_COMPILE
# (1: train with --compile, the default on a GPU; where torch.compile cannot run, the training is run
# again without it, so that its figures are still taken, and the check fails), PYTHON (python3),
# GPU_CHECK_WHEELS (a folder of wheels to install from with no package index, made by
# bench/gpu_wheels.sh; default .whl when there is one).
# Exits non-zero if any part failed; the summary line is printed either way. Logs go to a temporary
# directory, removed when everything passed and kept (and named) otherwise.
set -uo pipefail  # not -e: a failed part is recorded and the next one still runs

cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
if [[ $# -gt 0 && "$1" != "--cpu-smoke" ]]; then
  echo "usage: bench/gpu_check.sh [--cpu-smoke]" >&2
  exit 2
fi
MFU_TARGET="${GPU_CHECK_MFU_TARGET:-40}"
WHEELS="${GPU_CHECK_WHEELS:-}"
[[ -z "$WHEELS" && -d .whl ]] && WHEELS=.whl
if [[ "$SMOKE" == 1 ]]; then
  # a 2-layer GPT-2 on the CPU: the same commands and parsing, in about two minutes. In fp32: a CPU
  # without bf16 instructions (AVX2) trains it 60 times slower in bf16, 10 minutes for 10 steps
  BATCH="${GPU_CHECK_BATCH:-2}" STEPS="${GPU_CHECK_STEPS:-10}" TOKENS="${GPU_CHECK_TOKENS:-16}"
  DEVICE=cpu
  PRECISION=fp32
  TRAIN_SHAPE=(--set layers=2 --seq 128 --device cpu --peak-tflops 1)
  COMPILE="${GPU_CHECK_COMPILE:-0}"
  GENERATE_SHAPE=(--device cpu --set layers=2)
  SERVE_ARGS=(--provider cpu --dim 64 --layers 2 --heads 2 --clients 4 --requests 1)
  MODEL_LABEL="GPT-2 2-layer fp32"
else
  BATCH="${GPU_CHECK_BATCH:-32}" STEPS="${GPU_CHECK_STEPS:-300}" TOKENS="${GPU_CHECK_TOKENS:-256}"
  DEVICE=cuda
  PRECISION=bf16
  TRAIN_SHAPE=(--seq 1024 --device cuda)
  COMPILE="${GPU_CHECK_COMPILE:-1}"
  GENERATE_SHAPE=(--device cuda)
  SERVE_ARGS=(--provider cuda --requests 2)
  MODEL_LABEL="GPT-2 small bf16"
fi
[[ "$COMPILE" == 1 ]] && MODEL_LABEL+="+compile"
[[ "$SMOKE" == 1 ]] && MODEL_LABEL+=" (cpu smoke)"
TRAIN_DIR=gpt2  # under $WORK; gpt2-eager when the run without --compile replaced it

START=$SECONDS
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lmspec-gpu-check.XXXXXX")"
FAILED=()
trap '[[ ${#FAILED[@]} -eq 0 ]] && rm -rf "$WORK"' EXIT

section() { printf '\n=== %s\n' "$*"; }
failed() { FAILED+=("$1"); }
has_failed() { [[ " ${FAILED[*]} " == *" $1 "* ]]; }

ensure_installed() {
  # lmspec with what its GPU tests and benchmarks need, only where that is missing
  "$PY" -c "import lmspec.runtime.cli, pytest, transformers, httpx" 2>/dev/null && return 0
  section "installing lmspec"
  local wanted=(-e '.[train,export,serve]' pytest transformers httpx)
  if [[ -n "$WHEELS" ]]; then
    # no package index from here: bench/gpu_wheels.sh downloaded, elsewhere, what this machine lacks
    "$PY" -m pip install --no-index --find-links "$WHEELS" 'setuptools>=68' &&
      "$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation "${wanted[@]}"
  elif "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    # a CUDA build of torch is here already: requirements.txt pins the CPU one, which would replace it
    "$PY" -m pip install "${wanted[@]}"
  else
    "$PY" -m pip install -r requirements.txt "${wanted[@]}"
  fi
}

gpu_name() {
  if [[ "$SMOKE" == 1 ]]; then
    echo "cpu (smoke run)"
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1
  else  # a container may lack the tool but not the GPU
    "$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo "no GPU found"
  fi
}

run_gpu_tests() {
  section "GPU tests: $PY -m pytest -q tests/gpu -m gpu"
  # -m gpu replaces pyproject's addopts -m 'not slow'
  "$PY" -m pytest -q -p no:cacheprovider tests/gpu -m gpu 2>&1 | tee "$WORK/tests.log"
  local code=$?
  TESTS="$(tail -n 1 "$WORK/tests.log" | sed -E 's/=//g; s/ in [0-9.]+s.*$//; s/^ +//')"
  if [[ $code -ne 0 ]]; then
    failed tests
  elif [[ "$SMOKE" != 1 && "$TESTS" == *skipped* ]]; then
    failed tests  # on a GPU machine a skip means torch sees no GPU: nothing was checked
  fi
}

train_gpt2() {
  local cmd=("$PY" -m lmspec.runtime.cli train specs/gpt2.arch --set dropout=0.0 --set vocab=50257 --pad-vocab 64
             --precision "$PRECISION" --batch "$BATCH" --steps "$STEPS" --lr 6e-4 --eval-batches 0 --ckpt-every 0
             --sample-tokens 0 --no-progress "${TRAIN_SHAPE[@]}")
  local compile=()
  [[ "$COMPILE" == 1 ]] && compile=(--compile)
  section "training: ${cmd[*]} ${compile[*]} --out $WORK/gpt2"
  "${cmd[@]}" "${compile[@]}" --out "$WORK/gpt2" 2>&1 | tee "$WORK/train.log" && return 0
  if [[ "$COMPILE" == 1 ]] && grep -q "torch.compile cannot compile the model here" "$WORK/train.log"; then
    failed compile  # the figures of a run without it are still worth having
    section "training again without --compile: ${cmd[*]} --out $WORK/gpt2-eager"
    TRAIN_DIR=gpt2-eager
    MODEL_LABEL="${MODEL_LABEL/+compile/} (eager: torch.compile could not run)"
    "${cmd[@]}" --out "$WORK/gpt2-eager" 2>&1 | tee "$WORK/train.log" && return 0
  fi
  failed train
}

read_train_figures() {
  # MFU: the mean of the logged values after the first 20% of the steps (torch.compile's warm-up);
  # peak memory: the largest the run logged, against the prediction it printed at its start
  [[ -s "$WORK/$TRAIN_DIR/metrics.jsonl" ]] || return 1
  "$PY" - "$WORK/$TRAIN_DIR/metrics.jsonl" "$WORK/train.log" "$STEPS" <<'EOF'
import json, re, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
mfu = [r["mfu"] for r in rows if "mfu" in r and r["step"] > 0.2 * int(sys.argv[3])]
plan = re.search(r"lmspec plan predicts ([\d.]+) GB", open(sys.argv[2]).read())
peak = max(r["peak_memory_bytes"] for r in rows) / 1e9
if not mfu or plan is None:
    sys.exit("no MFU logged after the warm-up, or no memory prediction printed")
predicted = float(plan.group(1))
print(f"{100 * sum(mfu) / len(mfu):.1f} {peak:.2f} {predicted:.2f} {peak / predicted:.2f}")
EOF
}

run_generate_bench() {
  local cmd=("$PY" bench/gpu_generate.py --tokens "$TOKENS" "${GENERATE_SHAPE[@]}")
  section "generation: ${cmd[*]}"
  "${cmd[@]}" 2>&1 | tee "$WORK/generate.log" || failed generate
}

read_generate_figures() {
  "$PY" - "$WORK/generate.log" <<'EOF'
import json, sys
# its last line of JSON (stderr shares the log, so do not trust the very last line)
lines = [line for line in open(sys.argv[1]).read().splitlines() if line.startswith('{"bench": "gpu_generate"')]
if not lines:
    sys.exit("bench/gpu_generate.py printed no summary")
summary = json.loads(lines[-1])
fp32 = summary["results"]["fp32"]
print(f"{fp32['ratio']:.2f}x transformers (fp32, {fp32['new_tokens']} tokens, "
      f"{fp32['matching_tokens']}/{fp32['new_tokens']} the same)")
EOF
}

run_serve_bench() {
  if [[ "$SMOKE" != 1 ]] && ! "$PY" -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())"; then
    SERVE_PART="serve: skipped (onnxruntime has no CUDA provider: install onnxruntime-gpu)"
    return 0
  fi
  local cmd=("$PY" bench/serve.py --workdir "$WORK/serve" "${SERVE_ARGS[@]}")
  section "serving: ${cmd[*]}"
  timeout 300 "${cmd[@]}" 2>&1 | tee "$WORK/serve.log" || failed serve
  SERVE_PART="$("$PY" - "$WORK/serve.log" <<'EOF'
import json, sys
lines = [line for line in open(sys.argv[1]).read().splitlines() if line.startswith('{"bench": "serve"')]
if not lines:
    sys.exit("serve: no figures")
r = json.loads(lines[-1])["ratios"]
print(f"serve: short behind long {r['short_behind_long_s']:.2f} s (was {r['was_s']:.2f} s), continuous/static "
      f"throughput {r['throughput']:.2f}x, p95 {r['p95']:.2f}x")
EOF
)" || { has_failed serve || failed serve-figures; SERVE_PART="serve: no figures"; }
}

ensure_installed || failed install
GPU="$(gpu_name)"
section "device: $GPU"
TESTS="not run"
run_gpu_tests

train_gpt2
if figures="$(read_train_figures)"; then
  read -r MFU PEAK PLAN RATIO <<<"$figures"
  verdict=$(awk -v m="$MFU" -v t="$MFU_TARGET" 'BEGIN { print (m >= t ? "met" : "missed") }')
  TRAIN_PART="$MODEL_LABEL MFU $MFU% (target $MFU_TARGET%: $verdict)"
  MEMORY_PART="peak memory $PEAK GB vs plan $PLAN GB (${RATIO}x)"
else
  has_failed train || failed train-metrics  # a run that failed has no figures: one failure, not two
  TRAIN_PART="$MODEL_LABEL: no figures"
  MEMORY_PART="peak memory: no figures"
fi

run_generate_bench
if figures="$(read_generate_figures)"; then
  GENERATE_PART="generate $figures"
else
  has_failed generate || failed generate-figures
  GENERATE_PART="generate: no figures"
fi

run_serve_bench

ELAPSED=$((SECONDS - START))
STATUS="ok"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  STATUS="FAILED: ${FAILED[*]}"
  printf '\nlogs kept in %s\n' "$WORK"
fi
echo
echo "gpu_check: $GPU | gpu tests $TESTS | $TRAIN_PART | $MEMORY_PART | $GENERATE_PART | $SERVE_PART |" \
     "$((ELAPSED / 60))m$(printf '%02d' $((ELAPSED % 60)))s | $STATUS"
[[ ${#FAILED[@]} -eq 0 ]]
