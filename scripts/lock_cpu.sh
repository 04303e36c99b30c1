#!/usr/bin/env bash
# Regenerate the lock constraints/cpu.txt: resolve `.[test]` and mpi4py afresh in a new
# virtual environment (only torch held at the CPU build), then record every installed version.
# Run after changing setup.py's requirements; commit the new lock with the change.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)"
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
echo "torch==2.13.0" >"$venv/torch.txt"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$venv/torch.txt" -e ".[test]" mpi4py
{
  echo "# Locked versions of everything scripts/install.sh and scripts/install_mpi.sh install on"
  echo "# machines without CUDA (CPU development and CI): the CPU build of PyTorch, megatron-core,"
  echo "# their dependencies and the test tools. Regenerate with: bash scripts/lock_cpu.sh"
  "$venv/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check \
    | grep -v -E '^(pip|attnres-megatron)==' | sed -E 's/^torch==([^+]*)\+cpu$/torch==\1/'
} >constraints/cpu.txt
echo "wrote constraints/cpu.txt ($(grep -c '==' constraints/cpu.txt) packages)"
