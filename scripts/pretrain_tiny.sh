#!/usr/bin/env bash
# Install, then pretrain a tiny Block AttnRes GPT on CPU (Python standard library sources,
# byte tokens); the checkpoint and TensorBoard logs go to runs/tiny/. Extra arguments are passed
# to attnres-pretrain.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
attnres-pretrain --device cpu --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
  --seq-length 128 --micro-batch-size 4 --train-iters 100 --lr 3e-3 \
  --attention-residuals block --attn-res-num-blocks 4 \
  --save runs/tiny/checkpoints --tensorboard-dir runs/tiny/tensorboard "$@"
