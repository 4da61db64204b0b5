#!/usr/bin/env bash
# Wheels for checking lmspec on a GPU machine that cannot reach a package index (an air-gapped
# cluster node, a locked-down container): run this where pip can download, copy DIR to the GPU
# machine beside the repository, and bench/gpu_check.sh installs from it with no index
# (GPU_CHECK_WHEELS=DIR; a .whl folder in the repository's root is used when present).
#
#   bench/gpu_wheels.sh [DIR] [--python 3.12] [--have FILE]
#
# DIR (default .whl): where the wheels go. --python: the GPU machine's Python (default this one's).
# --have FILE: what the GPU machine has already, one package a line (`pip freeze` there, or bare
# names): those are left out. torch, triton and NVIDIA's CUDA libraries are always left out: the GPU
# machine brings its own CUDA build of torch. The wheels are those of lmspec's train, export and serve
# extras, pytest, transformers and httpx (what gpu_check.sh runs), and setuptools (which builds lmspec), for
# Linux x86-64.
set -euo pipefail

cd "$(dirname "$0")/.." || exit 1
DIR=".whl"
PYVER="$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')"
HAVE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYVER="$2"; shift 2 ;;
    --have) HAVE="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "bench/gpu_wheels.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) DIR="$1"; shift ;;
  esac
done
if [[ -n "$HAVE" && ! -r "$HAVE" ]]; then
  echo "bench/gpu_wheels.sh: --have $HAVE: no such file" >&2
  exit 2
fi

PLATFORMS=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 \
           manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}")

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# The requirements of lmspec and its train, export and serve extras, torch left out: resolving torch
# would fetch its CUDA build (over 500 MB) and NVIDIA's libraries just to read their metadata, and fails
# where an index lacks one of those; the GPU machine has its own.
python3 - >"$WORK/requirements" <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + [r for extra in ("train", "export", "serve")
                                    for r in project["optional-dependencies"][extra]]
for requirement in dict.fromkeys(wanted):
    if re.split(r"[=<>!~ \[;]", requirement, maxsplit=1)[0].lower() != "torch":
        print(requirement)
EOF
# What pip would install on such a machine with nothing on it: a report, no downloads but metadata.
python3 -m pip install -q --dry-run --ignore-installed --report "$WORK/report.json" --target "$WORK/target" \
  "${TARGET[@]}" -r "$WORK/requirements" pytest transformers httpx 'setuptools>=68'
python3 - "$WORK/report.json" "$HAVE" >"$WORK/wanted" <<'EOF'
import json, re, sys

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

have = set()
if sys.argv[2]:
    for line in open(sys.argv[2], encoding="utf-8"):
        name = re.split(r"[=<>!~ @;\[]", line.strip(), maxsplit=1)[0]
        if name and not name.startswith("#"):
            have.add(canonical(name))
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    key = canonical(name)
    # setuptools builds lmspec itself there, and an older one than it needs may be what is there
    if (key in have and key != "setuptools") or key in ("lmspec", "torch", "triton") or key.startswith("nvidia-"):
        continue
    print(f"{name}=={version}")
EOF
mkdir -p "$DIR"
if [[ -s "$WORK/wanted" ]]; then
  xargs python3 -m pip download -q --no-deps "${TARGET[@]}" -d "$DIR" <"$WORK/wanted"
fi
echo "$(wc -l <"$WORK/wanted") wheels for Python $PYVER in $DIR ($(du -sh "$DIR" | cut -f1)):" \
     "$(sed 's/==.*//' "$WORK/wanted" | tr '\n' ' ')"
