#!/usr/bin/env bash
# Pretrain a small Block AttnRes GPT on CPU with a real BPE tokenizer and evaluation.
#
# Needs: attnres-megatron installed (bash scripts/install.sh; the tokenizers extra comes with
#        the test tools); any CPU, about 2 GB of RAM; no download.
# Runs:  tools/train_tokenizer.py: a byte-level BPE of VOCAB_SIZE ids trained on the built-in
#        corpus (Python standard library sources), once, into WORK/tokenizer; then
#        attnres-pretrain on that corpus tokenized with it: 4 layers, hidden 128, Llama-style
#        (SwiGLU, RMSNorm, RoPE), Block AttnRes with 4 depth blocks, validation every
#        EVAL_INTERVAL iterations and a final validation and test evaluation. NPROC=2 runs
#        the same model with tensor parallelism 2 + sequence parallelism under torchrun.
#        Checkpoints and TensorBoard logs go to WORK. About 2 minutes on 2 cores.
#
# Settings come from the environment, extra arguments go to attnres-pretrain, e.g.
#   NPROC=2 TRAIN_ITERS=50 bash examples/pretrain_bpe_cpu.sh --summary-json /tmp/s.json
set -euo pipefail

PYTHON="${PYTHON:-python3}"
WORK="${WORK:-runs/bpe}"
NPROC="${NPROC:-1}"                            # 1, or 2 for TP2 + SP
VOCAB_SIZE="${VOCAB_SIZE:-4096}"
TOKENIZER_BYTES="${TOKENIZER_BYTES:-4000000}"  # corpus bytes the tokenizer is trained on
TRAIN_ITERS="${TRAIN_ITERS:-300}"
EVAL_INTERVAL="${EVAL_INTERVAL:-100}"
EVAL_ITERS="${EVAL_ITERS:-10}"
LOG_INTERVAL="${LOG_INTERVAL:-25}"
here="$(cd "$(dirname "$0")/.." && pwd)"

if [ ! -f "$WORK/tokenizer/tokenizer.json" ]; then
  "$PYTHON" "$here/tools/train_tokenizer.py" --vocab-size "$VOCAB_SIZE" \
    --corpus-bytes "$TOKENIZER_BYTES" --output "$WORK/tokenizer"
fi

launcher=("$PYTHON")
parallel=()
if [ "$NPROC" -gt 1 ]; then
  launcher=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29511}")
  parallel=(--tensor-model-parallel-size "$NPROC" --sequence-parallel)
fi

set -x
exec "${launcher[@]}" -m attnres_megatron.training.pretrain --device cpu \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORK/tokenizer" \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --micro-batch-size 4 \
  --swiglu --disable-bias-linear --normalization RMSNorm --position-embedding-type rope \
  --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 \
  --train-iters "$TRAIN_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
  --weight-decay 0.1 --adam-beta2 0.95 \
  --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval "$LOG_INTERVAL" \
  --attention-residuals block --attn-res-num-blocks 4 \
  "${parallel[@]}" --save "$WORK/checkpoints-np$NPROC" --tensorboard-dir "$WORK/tensorboard-np$NPROC" "$@"
