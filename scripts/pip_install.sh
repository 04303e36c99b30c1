#!/usr/bin/env bash
# pip install ARGS..., with the locked versions of constraints/cpu.txt on machines without
# CUDA (the CPU build of PyTorch and every package the CPU development and CI installs use);
# GPU machines keep the CUDA PyTorch they have and resolve the rest from setup.py's ranges.
# PYTHON picks the interpreter (default: python3 on PATH).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
constraint=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraint=(-c "$root/constraints/cpu.txt")
fi
PIP_ROOT_USER_ACTION=ignore "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check \
  "${constraint[@]}" "$@"
