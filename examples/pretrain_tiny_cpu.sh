#!/usr/bin/env bash
# Pretrain a tiny Block AttnRes GPT on CPU in one process (no launcher, no GPU).
#
# Needs: attnres-megatron installed (bash scripts/install.sh); any CPU, about 1 GB of RAM.
# Runs:  attnres-pretrain --device cpu: 4 layers, hidden 128, 4 heads, sequence 128, micro
#        batch 4, 100 iterations, Block AttnRes with 4 depth blocks, on byte tokens of the
#        Python standard library sources (no download). About half a minute on 2 cores.
#
# Every setting can be overridden from the environment, and extra arguments go to
# attnres-pretrain, e.g.
#   TRAIN_ITERS=20 ATTN_RES=full bash examples/pretrain_tiny_cpu.sh --summary-json /tmp/s.json
set -euo pipefail

PRETRAIN="${PRETRAIN:-attnres-pretrain}"     # or: PRETRAIN="python -m attnres_megatron.training.pretrain"
DEVICE="${DEVICE:-cpu}"
NUM_LAYERS="${NUM_LAYERS:-4}"
HIDDEN_SIZE="${HIDDEN_SIZE:-128}"
NUM_HEADS="${NUM_HEADS:-4}"
SEQ_LENGTH="${SEQ_LENGTH:-128}"
MICRO_BATCH="${MICRO_BATCH:-4}"
TRAIN_ITERS="${TRAIN_ITERS:-100}"
LR="${LR:-3e-3}"
MIN_LR="${MIN_LR:-3e-4}"
WARMUP="${WARMUP:-10}"
ATTN_RES="${ATTN_RES:-block}"                 # none | block | full
ATTN_RES_NUM_BLOCKS="${ATTN_RES_NUM_BLOCKS:-4}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"

read -r -a pretrain <<<"$PRETRAIN"
# attnres-pretrain's model flags are Megatron-LM's; its defaults (GeLU with biases, LayerNorm,
# learned positions, tied output weights, dropout 0.1) are Megatron-LM's too. This example
# builds a Llama-style model: SwiGLU without biases, RMSNorm, RoPE, untied output weights, no
# dropout, MLP width 4 x hidden, trained with AdamW (beta2 0.95, weight decay 0.1), warmup and
# cosine decay to a tenth of the peak learning rate.
model=(--swiglu --disable-bias-linear --normalization RMSNorm --position-embedding-type rope
  --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0
  --ffn-hidden-size "$((4 * HIDDEN_SIZE))")
schedule=(--lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" --lr-decay-style cosine
  --weight-decay 0.1 --adam-beta2 0.95)
attn_res=(--attention-residuals "$ATTN_RES")
if [ "$ATTN_RES" = "block" ]; then
  attn_res+=(--attn-res-num-blocks "$ATTN_RES_NUM_BLOCKS")
fi

set -x
exec "${pretrain[@]}" --device "$DEVICE" \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --num-attention-heads "$NUM_HEADS" \
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --train-iters "$TRAIN_ITERS" \
  "${model[@]}" "${schedule[@]}" --log-interval "$LOG_INTERVAL" \
  "${attn_res[@]}" "$@"
