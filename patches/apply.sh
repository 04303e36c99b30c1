#!/usr/bin/env bash
# Apply, check or revert the AttnRes patch of a Megatron-LM core_r0.16 checkout's pretrain_gpt.py.
#
# Needs: git (only its `git apply`; the checkout need not be a git repository); a Megatron-LM
#        checkout whose megatron/core/package_info.py says MAJOR = 0, MINOR = 16.
# Runs:  git apply --check, then git apply (or git apply --reverse with --revert) of
#        patches/megatron_lm_core_r0.16_pretrain_gpt.patch in MEGATRON_LM_DIR. Nothing is
#        changed when a check fails.
#
# Usage: patches/apply.sh MEGATRON_LM_DIR            apply
#        patches/apply.sh --check MEGATRON_LM_DIR    report whether it applies (or is applied)
#        patches/apply.sh --revert MEGATRON_LM_DIR   restore the original pretrain_gpt.py
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATCH="$HERE/megatron_lm_core_r0.16_pretrain_gpt.patch"
WANTED="0.16"

usage() { echo "usage: patches/apply.sh [--check | --revert] MEGATRON_LM_DIR"; }
die() { echo "error: $*" >&2; exit 1; }

mode=apply
case "${1:-}" in
  --revert) mode=revert; shift ;;
  --check) mode=check; shift ;;
  -h | --help) usage; exit 0 ;;
  -*) usage >&2; die "unknown option $1" ;;
esac
[ $# -eq 1 ] || { usage >&2; die "expected one MEGATRON_LM_DIR argument"; }
DIR="$1"

[ -d "$DIR" ] || die "$DIR is not a directory; pass the root of a Megatron-LM checkout."
INFO="$DIR/megatron/core/package_info.py"
if [ ! -f "$INFO" ] || [ ! -f "$DIR/pretrain_gpt.py" ]; then
  die "$DIR is not a Megatron-LM checkout (it needs megatron/core/package_info.py and pretrain_gpt.py); pass the repository root."
fi
major="$(sed -n 's/^MAJOR *= *\([0-9][0-9]*\).*/\1/p' "$INFO" | head -n 1)"
minor="$(sed -n 's/^MINOR *= *\([0-9][0-9]*\).*/\1/p' "$INFO" | head -n 1)"
if [ "$major.$minor" != "$WANTED" ]; then
  die "$DIR is Megatron-LM ${major:-?}.${minor:-?} ($INFO); this patch is for core_r$WANTED (MAJOR = 0, MINOR = 16). Check out the core_r0.16.0 branch, or use attnres_megatron.megatron_lm.pretrain_gpt_attnres without patching."
fi
command -v git >/dev/null 2>&1 || die "git is needed to apply the patch (git apply)."

cd "$DIR"
# Inside a larger git repository, git apply reads patch paths from that repository's top.
prefix="$(git rev-parse --show-prefix 2>/dev/null || true)"
patch_in_dir() { git apply ${prefix:+--directory="$prefix"} "$@" "$PATCH"; }

if patch_in_dir --check 2>/dev/null; then
  state=unapplied
elif patch_in_dir --reverse --check 2>/dev/null; then
  state=applied
else
  echo "git apply --check says:" >&2
  patch_in_dir --check >&2 || true
  die "pretrain_gpt.py in $DIR does not match the patch (locally modified, or another 0.16 revision); nothing was changed."
fi

case "$mode:$state" in
  check:unapplied) echo "the AttnRes patch applies cleanly to $DIR/pretrain_gpt.py" ;;
  check:applied) echo "the AttnRes patch is applied in $DIR/pretrain_gpt.py" ;;
  apply:applied) echo "the AttnRes patch is already applied in $DIR/pretrain_gpt.py; nothing to do" ;;
  revert:unapplied) echo "the AttnRes patch is not applied in $DIR/pretrain_gpt.py; nothing to revert" ;;
  apply:unapplied)
    patch_in_dir
    echo "applied the AttnRes patch to $DIR/pretrain_gpt.py (revert: $0 --revert $DIR)"
    ;;
  revert:applied)
    patch_in_dir --reverse
    echo "reverted the AttnRes patch in $DIR/pretrain_gpt.py"
    ;;
esac
