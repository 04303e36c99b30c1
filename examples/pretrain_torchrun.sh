#!/usr/bin/env bash
# Pretrain a small Block AttnRes GPT on one node with torchrun: tensor parallel (+ sequence
# parallel) by default, optionally with MoE experts and expert parallelism.
#
# Needs: attnres-megatron installed (bash scripts/install.sh); torchrun (ships with PyTorch);
#        NPROC processes: GPUs if nvidia-smi is present (one per GPU), else CPU with gloo.
#        NPROC must be a multiple of TP x CP (the rest is data parallel), and EP must divide it.
# Runs:  torchrun --standalone --nproc-per-node $NPROC --no-python attnres-pretrain with
#        TP=2 + sequence parallel, EP=1 and a dense MLP by default (tiny model, 50 iterations).
#        NUM_EXPERTS=8 EP=2 TOPK=2 switches to an MoE MLP with 2-way expert parallelism.
#
# Every setting can be overridden from the environment, and extra arguments go to
# attnres-pretrain, e.g.
#   NPROC=4 TP=2 EP=2 NUM_EXPERTS=8 bash examples/pretrain_torchrun.sh --log-interval 5
set -euo pipefail

if [ -z "${DEVICE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
NPROC="${NPROC:-2}"                           # processes on this node (one per GPU on GPUs)
TORCHRUN="${TORCHRUN:-torchrun}"
TORCHRUN_ARGS="${TORCHRUN_ARGS---standalone --nnodes 1}"   # set to "" to drop

# Parallelism. SP (sequence parallel) needs TP > 1; it is on by default whenever TP > 1.
TP="${TP:-2}"
if [ "$TP" -gt 1 ]; then SP="${SP:-1}"; else SP="${SP:-0}"; fi
CP="${CP:-1}"
EP="${EP:-1}"
NUM_EXPERTS="${NUM_EXPERTS:-0}"               # 0 = dense MLP; > 0 = MoE with this many experts
TOPK="${TOPK:-2}"
MOE_FFN_HIDDEN="${MOE_FFN_HIDDEN:-256}"
MOE_SHARED_HIDDEN="${MOE_SHARED_HIDDEN:-0}"   # 0 = no shared expert
MOE_SCORE="${MOE_SCORE:-softmax}"             # softmax | sigmoid
MOE_DISPATCHER="${MOE_DISPATCHER:-alltoall}"

# Model and training (tiny by default so that it also runs on CPU).
NUM_LAYERS="${NUM_LAYERS:-4}"
HIDDEN_SIZE="${HIDDEN_SIZE:-128}"
NUM_HEADS="${NUM_HEADS:-4}"
SEQ_LENGTH="${SEQ_LENGTH:-128}"
MICRO_BATCH="${MICRO_BATCH:-4}"
TRAIN_ITERS="${TRAIN_ITERS:-50}"
LR="${LR:-3e-3}"
MIN_LR="${MIN_LR:-3e-4}"
WARMUP="${WARMUP:-10}"
ATTN_RES="${ATTN_RES:-block}"
ATTN_RES_NUM_BLOCKS="${ATTN_RES_NUM_BLOCKS:-4}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                  # e.g. EXTRA_ARGS=--bf16 on GPUs

# ${array[@]+"${array[@]}"} below expands an empty array safely under set -u on bash < 4.4.
read -r -a torchrun_args <<<"$TORCHRUN_ARGS"
read -r -a extra <<<"$EXTRA_ARGS"
parallel=(--tensor-model-parallel-size "$TP" --context-parallel-size "$CP"
  --expert-model-parallel-size "$EP")
if [ "$SP" = 1 ]; then parallel+=(--sequence-parallel); fi
moe=()
if [ "$NUM_EXPERTS" -gt 0 ]; then
  moe=(--num-experts "$NUM_EXPERTS" --moe-router-topk "$TOPK" --moe-ffn-hidden-size "$MOE_FFN_HIDDEN"
    --moe-router-score-function "$MOE_SCORE" --moe-token-dispatcher-type "$MOE_DISPATCHER")
  if [ "$MOE_SHARED_HIDDEN" -gt 0 ]; then
    moe+=(--moe-shared-expert-intermediate-size "$MOE_SHARED_HIDDEN")
  fi
fi
attn_res=(--attention-residuals "$ATTN_RES")
if [ "$ATTN_RES" = "block" ]; then attn_res+=(--attn-res-num-blocks "$ATTN_RES_NUM_BLOCKS"); fi
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

# torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process.
set -x
exec "$TORCHRUN" ${torchrun_args[@]+"${torchrun_args[@]}"} --nproc-per-node "$NPROC" --no-python \
  attnres-pretrain --device "$DEVICE" \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --num-attention-heads "$NUM_HEADS" \
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --train-iters "$TRAIN_ITERS" \
  "${model[@]}" "${schedule[@]}" --log-interval "$LOG_INTERVAL" \
  "${parallel[@]}" ${moe[@]+"${moe[@]}"} "${attn_res[@]}" ${extra[@]+"${extra[@]}"} "$@"
