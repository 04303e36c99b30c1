#!/usr/bin/env bash
# Install OpenMPI (mpirun + headers) and mpi4py so attnres-pretrain can run under mpirun; idempotent.
# Needs: Debian/Ubuntu apt-get (root, or sudo) when mpirun is missing; pip for mpi4py.
# Runs:  apt-get install openmpi-bin libopenmpi-dev only if `mpirun` is not on PATH, then
#        pip install mpi4py (the locked version without CUDA) only if it does not import.
#        About a second when all is present.
# Usage: bash scripts/install_mpi.sh        (PYTHON=/path/to/python picks the interpreter)
set -euo pipefail
PYTHON="${PYTHON:-python3}"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Run a command quietly; show its output only when it fails.
quiet() {
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: failed: $*" >&2
    exit 1
  fi
}

if ! command -v mpirun >/dev/null 2>&1; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "error: mpirun is missing and installing OpenMPI needs root or sudo" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: mpirun is missing and apt-get is not available; install OpenMPI (mpirun + headers)" \
      "with your package manager, then rerun" >&2
    exit 1
  fi
  echo "Installing OpenMPI (apt-get install openmpi-bin libopenmpi-dev) ..."
  quiet ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  quiet ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev
fi

if ! "$PYTHON" -c "import mpi4py" >/dev/null 2>&1; then
  echo "Installing mpi4py (pip install mpi4py) ..."
  quiet env PYTHON="$PYTHON" bash "$(dirname "$0")/pip_install.sh" mpi4py
fi

echo "mpirun: $(command -v mpirun) ($(mpirun --version 2>/dev/null | head -n 1))"
echo "mpi4py: $("$PYTHON" -c 'import mpi4py; print(mpi4py.__version__)')"
