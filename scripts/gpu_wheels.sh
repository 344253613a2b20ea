#!/usr/bin/env bash
# Wheels that `make gpu-check` needs on a GPU host whose Python lacks them and that cannot reach a
# package registry (e.g. a lent machine with its own CUDA torch). Run here, where pip works; copy
# or carry the folder along with the tree, and `make gpu-check` installs them into a scratch
# folder on PYTHONPATH before it starts.
#
# Of requirements.txt, the training and engine code the check runs needs torch, numpy, pyarrow,
# tiktoken, PyYAML (and pytest for the CUDA tests): a CUDA host's Python usually has them.
# rustbpe (the tokenizer trainer, imported by engine/tokenizer.py) is the one it usually lacks.
#
#   scripts/gpu_wheels.sh [folder] [python version]     # default .whl and 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
pyver="${2:-3.12}"
pip="${PIP:-python3 -m pip}"
mkdir -p "$dest"
# Pinned like requirements.txt, as wheels for that Python on x86-64 Linux.
$pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" "$(grep -E '^rustbpe==' requirements.txt)"
ls -l "$dest"
