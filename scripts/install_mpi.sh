#!/usr/bin/env bash
# Install OpenMPI (mpirun + headers) and mpi4py for `mpirun` launches; idempotent.
# Needs: Debian/Ubuntu apt (root or sudo) when mpirun is missing; pip for mpi4py.
# Runs: apt-get install openmpi-bin libopenmpi-dev only if `mpirun` is not on PATH, then
# pip install mpi4py only if it does not import. Takes about a second when all is present.
# Usage: bash scripts/install_mpi.sh   (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
PYTHON="${PYTHON:-python3}"

if ! command -v mpirun >/dev/null 2>&1; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "error: mpirun is missing and installing OpenMPI needs root or sudo" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  echo "Installing OpenMPI (openmpi-bin libopenmpi-dev) with apt-get ..."
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    openmpi-bin libopenmpi-dev >/dev/null
fi

if ! "$PYTHON" -c "import mpi4py.MPI" >/dev/null 2>&1; then
  echo "Installing mpi4py with pip ..."
  "$PYTHON" -m pip install --quiet --disable-pip-version-check mpi4py
fi

echo "mpirun: $(command -v mpirun) ($(mpirun --version 2>/dev/null | head -n 1))"
echo "mpi4py: $("$PYTHON" -c 'import mpi4py; print(mpi4py.__version__)')"
