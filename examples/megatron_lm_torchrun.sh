#!/usr/bin/env bash
# Megatron-LM's GPT pretraining (pretrain_gpt.py) with Block AttnRes on one node, under torchrun.
#
# Needs: a node with NVIDIA GPUs, CUDA PyTorch, Transformer Engine and attnres-megatron
#        (bash scripts/install.sh te); a Megatron-LM core_r0.16 checkout in MEGATRON_LM_DIR
#        (git clone -b core_r0.16.0 https://github.com/NVIDIA/Megatron-LM). Data: DATA_PATH, one
#        or more Megatron indexed dataset prefixes, with TOKENIZER_ARGS naming their tokenizer;
#        without DATA_PATH, Megatron-LM's mock dataset and null tokenizer (no files needed).
# Runs:  torchrun --standalone --nproc-per-node $NPROC (default: one process per GPU) with
#        ROUTE=driver (default): python -m attnres_megatron.megatron_lm.pretrain_gpt_attnres, no patch;
#        ROUTE=patched: $MEGATRON_LM_DIR/pretrain_gpt.py after bash patches/apply.sh $MEGATRON_LM_DIR.
#        A 12-layer GPT (hidden 768, 12 heads, SwiGLU, RMSNorm, RoPE, untied embeddings), bf16,
#        TP 2 + sequence parallel, data parallel over the other GPUs, Block AttnRes with 4 blocks
#        (24 sublayers: S = 6), 2000 iterations, checkpoints and TensorBoard logs in CKPT_DIR.
#        DRY_RUN=1 prints the command instead of running it.
#
# Every setting can be overridden from the environment, and extra arguments go to Megatron-LM, e.g.
#   MEGATRON_LM_DIR=$HOME/Megatron-LM NPROC=4 TP=1 ATTN_RES=full bash examples/megatron_lm_torchrun.sh
#   DATA_PATH=/data/mycorpus_text_document \
#     TOKENIZER_ARGS="--tokenizer-type HuggingFaceTokenizer --tokenizer-model gpt2" \
#     bash examples/megatron_lm_torchrun.sh
set -euo pipefail

MEGATRON_LM_DIR="${MEGATRON_LM_DIR:-}"
if [ -z "$MEGATRON_LM_DIR" ] || [ ! -f "$MEGATRON_LM_DIR/pretrain_gpt.py" ]; then
  echo "error: set MEGATRON_LM_DIR to a Megatron-LM core_r0.16 checkout (the directory holding" \
    "pretrain_gpt.py): git clone -b core_r0.16.0 https://github.com/NVIDIA/Megatron-LM" >&2
  exit 1
fi
DRY_RUN="${DRY_RUN:-0}"
ROUTE="${ROUTE:-driver}"                       # driver | patched
if [ -z "${NPROC:-}" ]; then
  NPROC="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  if [ "$NPROC" = 0 ] && [ "$DRY_RUN" = 1 ]; then NPROC=8; fi
fi
if [ "$NPROC" = 0 ]; then
  echo "error: no GPU found (nvidia-smi -L); this script launches one process per GPU. On the CPU," \
    "run the driver with --device cpu (README, 'Using with Megatron-LM'), or set NPROC." >&2
  exit 1
fi

# Parallelism: TP x PP x CP must divide NPROC; the rest is data parallel.
TP="${TP:-2}"
PP="${PP:-1}"
if [ "$TP" -gt 1 ]; then SP="${SP:-1}"; else SP="${SP:-0}"; fi

# Model, AttnRes and training.
NUM_LAYERS="${NUM_LAYERS:-12}"
HIDDEN_SIZE="${HIDDEN_SIZE:-768}"
FFN_HIDDEN_SIZE="${FFN_HIDDEN_SIZE:-2048}"
NUM_HEADS="${NUM_HEADS:-12}"
SEQ_LENGTH="${SEQ_LENGTH:-2048}"
ATTN_RES="${ATTN_RES:-block}"                  # none | block | full
ATTN_RES_NUM_BLOCKS="${ATTN_RES_NUM_BLOCKS:-4}"
MICRO_BATCH="${MICRO_BATCH:-4}"
GLOBAL_BATCH="${GLOBAL_BATCH:-64}"
TRAIN_ITERS="${TRAIN_ITERS:-2000}"
LR="${LR:-3e-4}"
MIN_LR="${MIN_LR:-3e-5}"
WARMUP="${WARMUP:-200}"
CKPT_DIR="${CKPT_DIR:-$PWD/checkpoints/megatron-lm-attnres-gpt}"
DATA_PATH="${DATA_PATH:-}"
TOKENIZER_ARGS="${TOKENIZER_ARGS:---tokenizer-type NullTokenizer --vocab-size 32000}"

read -r -a tokenizer <<<"$TOKENIZER_ARGS"
read -r -a data_path <<<"$DATA_PATH"
if [ -n "$DATA_PATH" ]; then
  data=(--data-path "${data_path[@]}" --split 969,30,1 "${tokenizer[@]}")
else
  data=(--mock-data "${tokenizer[@]}")
fi
parallel=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
if [ "$SP" = 1 ]; then parallel+=(--sequence-parallel); fi
attn_res=(--attention-residuals "$ATTN_RES")
if [ "$ATTN_RES" = block ]; then attn_res+=(--attn-res-num-blocks "$ATTN_RES_NUM_BLOCKS"); fi

args=(
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --ffn-hidden-size "$FFN_HIDDEN_SIZE"
  --num-attention-heads "$NUM_HEADS" --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
  --swiglu --disable-bias-linear --normalization RMSNorm --position-embedding-type rope
  --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0
  --transformer-impl transformer_engine --bf16
  "${parallel[@]}" "${attn_res[@]}"
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP"
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
  --use-distributed-optimizer
  "${data[@]}"
  --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval 500 --ckpt-format torch_dist
  --log-interval 10 --eval-interval 500 --eval-iters 10 --tensorboard-dir "$CKPT_DIR/tensorboard"
)

case "$ROUTE" in
  driver)
    entry=(-m attnres_megatron.megatron_lm.pretrain_gpt_attnres)
    export PYTHONPATH="$MEGATRON_LM_DIR${PYTHONPATH:+:$PYTHONPATH}"
    ;;
  patched)
    if ! grep -q attnres_megatron "$MEGATRON_LM_DIR/pretrain_gpt.py"; then
      echo "error: $MEGATRON_LM_DIR/pretrain_gpt.py is not patched; run bash patches/apply.sh" \
        "$MEGATRON_LM_DIR first, or use ROUTE=driver" >&2
      exit 1
    fi
    entry=("$MEGATRON_LM_DIR/pretrain_gpt.py")
    ;;
  *)
    echo "error: ROUTE must be driver or patched; got $ROUTE" >&2
    exit 1
    ;;
esac

export CUDA_DEVICE_MAX_CONNECTIONS=1           # Megatron: keep TP/SP communication kernels in order
command=(torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" "${entry[@]}" "${args[@]}" "$@")
if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
mkdir -p "$CKPT_DIR"
exec "${command[@]}"
