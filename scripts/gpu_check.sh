#!/usr/bin/env bash
# GPU check kit: one command on a single-GPU machine with Python 3.12, CUDA PyTorch and Triton
# preinstalled and no network (docs/gpu.md). megatron-core and flash-linear-attention come along
# as wheels downloaded beforehand on a networked machine:
#
#   bash scripts/gpu_check.sh --fetch-wheels            # networked machine: wheels/ (git-ignored)
#   bash scripts/gpu_check.sh --out runs/gpu_check      # GPU machine, with wheels/ copied along
#   bash scripts/gpu_check.sh --dry-run                 # any machine: CPU, tiny shapes
#
# The GPU run installs the wheels with `pip install --no-index --no-deps --target` into a
# directory put first on PYTHONPATH (not a venv: where python3 is itself a virtual
# environment, a `--system-site-packages` venv made from it would not see its CUDA torch).
# Other arguments go to tools/gpu_check.py (--only, --skip, --deadline, --plan).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
WHEELS_DIR="wheels"
SITE_DIR="${TMPDIR:-/tmp}/attnres-gpu-check-site"
# Exact versions; their other needs (torch, numpy, packaging, einops, transformers) are on the
# GPU image. fla-core holds fla.ops (chunk_kda); flash-linear-attention its layers and models.
PINNED=(megatron-core==0.16.1 fla-core==0.4.2 flash-linear-attention==0.4.2)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64 manylinux1_x86_64)

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  echo
  echo "Options: --fetch-wheels [DIR] (default $WHEELS_DIR), --wheels DIR, --site DIR, --dry-run,"
  echo "and those of tools/gpu_check.py (--out DIR, --only CHECK..., --skip CHECK..., --deadline S, --plan)."
}

# The wheel file of one pin in DIR, e.g. megatron-core==0.16.1 -> DIR/megatron_core-0.16.1-*.whl.
wheel_of() {
  local dir="$1" pin="$2" name version
  name="${pin%%==*}"
  version="${pin##*==}"
  compgen -G "$dir/${name//-/_}-${version}-*.whl" || true
}

fetch_wheels() {
  local dir="$1" platform_args=()
  for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
  mkdir -p "$dir"
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d "$dir" "${PINNED[@]}"
  check_wheels "$dir"
  du -ch "$dir"/*.whl
}

# Exactly one wheel per pin (two versions of one package stop the whole install).
check_wheels() {
  local dir="$1" missing=0 found
  for pin in "${PINNED[@]}"; do
    found="$(wheel_of "$dir" "$pin")"
    if [[ -z "$found" ]]; then
      echo "wheels: $pin missing in $dir/" >&2
      missing=1
    elif [[ "$(wc -l <<<"$found")" -gt 1 ]]; then
      echo "wheels: more than one wheel for $pin in $dir/: $found" >&2
      missing=1
    else
      echo "wheels: $(basename "$found")"
    fi
  done
  return "$missing"
}

install_wheels() {
  local dir="$1" wheels=()
  for pin in "${PINNED[@]}"; do wheels+=("$(wheel_of "$dir" "$pin")"); done
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE_DIR" "${wheels[@]}"
  export PYTHONPATH="$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed ${#wheels[@]} wheels into $SITE_DIR"
}

main() {
  local dry_run=0 args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h | --help) usage; return 0 ;;
      --fetch-wheels)
        if [[ $# -gt 1 && "$2" != --* ]]; then fetch_wheels "$2"; else fetch_wheels "$WHEELS_DIR"; fi
        return ;;
      --wheels) WHEELS_DIR="$2"; shift ;;
      --site) SITE_DIR="$2"; shift ;;
      --dry-run) dry_run=1; args+=("$1") ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  echo "python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  if [[ $dry_run -eq 1 ]]; then
    echo "dry run: nothing is installed; wheels the GPU run would install from $WHEELS_DIR/:"
    check_wheels "$WHEELS_DIR" || echo "dry run: (fetch them with --fetch-wheels on a networked machine)"
  elif check_wheels "$WHEELS_DIR"; then
    install_wheels "$WHEELS_DIR"
  else
    echo "no complete wheel set in $WHEELS_DIR/: using the packages already installed" >&2
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PYTHON" tools/gpu_check.py "${args[@]}"
}

main "$@"
