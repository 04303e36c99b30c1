#!/usr/bin/env bash
# Install attnres-megatron (editable) and its test tools; idempotent.
# Without CUDA every version comes from the lock constraints/cpu.txt (the CPU build of
# PyTorch included, so pip never pulls a multi-GB CUDA build); see scripts/pip_install.sh.
# Usage: bash scripts/install.sh [extras] (default: test; e.g. te,mpi)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/pip_install.sh -e ".[${1:-test}]"
