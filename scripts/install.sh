#!/usr/bin/env bash
# Install attnres-megatron (editable) and its test tools; idempotent.
# Without CUDA, the CPU build of PyTorch pinned in constraints/cpu.txt is used, so pip
# never pulls a multi-GB CUDA build. Usage: bash scripts/install.sh [extras] (default: test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
constraint=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraint=(-c constraints/cpu.txt)
fi
python3 -m pip install --quiet --disable-pip-version-check "${constraint[@]}" -e ".[${extras}]"
