#!/usr/bin/env bash
# Install, then pretrain a tiny Block AttnRes GPT on CPU (Python standard library sources,
# byte tokens); the checkpoint and TensorBoard logs go to runs/tiny/. Extra arguments are passed
# to attnres-pretrain.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# A Llama-style model (SwiGLU without biases, RMSNorm, RoPE, untied output weights, no dropout)
# and AdamW with warmup and cosine decay; the defaults would be Megatron-LM's (GeLU, LayerNorm, ...).
attnres-pretrain --device cpu --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
  --ffn-hidden-size 512 --swiglu --disable-bias-linear --normalization RMSNorm \
  --position-embedding-type rope --untie-embeddings-and-output-weights \
  --hidden-dropout 0 --attention-dropout 0 \
  --seq-length 128 --micro-batch-size 4 --train-iters 100 --lr 3e-3 --min-lr 3e-4 \
  --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.1 --adam-beta2 0.95 --log-interval 10 \
  --attention-residuals block --attn-res-num-blocks 4 \
  --save runs/tiny/checkpoints --tensorboard-dir runs/tiny/tensorboard "$@"
