#!/usr/bin/env bash
# Pretrain a tiny Block AttnRes GPT with OpenMPI's mpirun: NP ranks, tensor parallel (+ sequence
# parallel) inside, data parallel across, on CPU by default.
#
# Needs: attnres-megatron installed (bash scripts/install.sh); OpenMPI and mpi4py
#        (bash scripts/install_mpi.sh). Rank 0 sends its address and a free port to the other
#        ranks over MPI; with MASTER_ADDR and MASTER_PORT set (exported to every rank with -x)
#        mpi4py is not needed. NP must be a multiple of TP.
# Runs:  mpirun -np $NP --allow-run-as-root --oversubscribe attnres-pretrain --device cpu:
#        4 ranks = TP 2 (sequence parallel) x data parallel 2; 4 layers, hidden 128, 4 heads,
#        sequence 128, micro batch 4, 50 iterations, Block AttnRes with 4 depth blocks.
#
# Every setting can be overridden from the environment, and extra arguments go to
# attnres-pretrain, e.g.
#   NP=2 TP=1 MPIRUN_ARGS="--hostfile hosts --map-by ppr:8:node" bash examples/pretrain_mpirun.sh
set -euo pipefail

NP="${NP:-4}"
MPIRUN="${MPIRUN:-mpirun}"
MPIRUN_ARGS="${MPIRUN_ARGS---allow-run-as-root --oversubscribe}"   # set to "" to drop
DEVICE="${DEVICE:-cpu}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # NP ranks share the cores

TP="${TP:-2}"
if [ "$TP" -gt 1 ]; then SP="${SP:-1}"; else SP="${SP:-0}"; fi
EP="${EP:-1}"
NUM_EXPERTS="${NUM_EXPERTS:-0}"               # 0 = dense MLP; > 0 = MoE with this many experts
TOPK="${TOPK:-2}"
MOE_FFN_HIDDEN="${MOE_FFN_HIDDEN:-256}"

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

read -r -a mpirun_args <<<"$MPIRUN_ARGS"
# Forward the variables the ranks read; MASTER_ADDR/MASTER_PORT only when set (they replace
# the mpi4py broadcast).
forward=(-x OMP_NUM_THREADS -x PATH)
for name in MASTER_ADDR MASTER_PORT PYTHONPATH VIRTUAL_ENV; do
  if [ -n "${!name:-}" ]; then forward+=(-x "$name"); fi
done
parallel=(--tensor-model-parallel-size "$TP" --expert-model-parallel-size "$EP")
if [ "$SP" = 1 ]; then parallel+=(--sequence-parallel); fi
if [ "$NUM_EXPERTS" -gt 0 ]; then
  parallel+=(--num-experts "$NUM_EXPERTS" --moe-router-topk "$TOPK" --moe-ffn-hidden-size "$MOE_FFN_HIDDEN"
    --moe-token-dispatcher-type alltoall)
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

set -x
exec "$MPIRUN" -np "$NP" ${mpirun_args[@]+"${mpirun_args[@]}"} "${forward[@]}" \
  attnres-pretrain --device "$DEVICE" \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --num-attention-heads "$NUM_HEADS" \
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --train-iters "$TRAIN_ITERS" \
  "${model[@]}" "${schedule[@]}" --log-interval "$LOG_INTERVAL" \
  "${parallel[@]}" "${attn_res[@]}" "$@"
