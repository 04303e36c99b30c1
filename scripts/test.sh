#!/usr/bin/env bash
# Install what the tests need, lint, then run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/install_mpi.sh      # OpenMPI + mpi4py for the mpirun tests
python3 -m ruff check .
python3 -m pytest -q "$@"
