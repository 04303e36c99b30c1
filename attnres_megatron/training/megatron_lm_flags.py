"""The one table of Megatron-LM ``pretrain_gpt.py`` flags that ``attnres-pretrain`` does not take.

``attnres-pretrain`` spells its flags like Megatron-LM and accepts Megatron-LM's common ones with
Megatron-LM's meaning (see ``arguments.py``). The flags below are Megatron-LM's too, but have no
counterpart here: an unknown flag fails with argparse's error, and when it is listed here the
error also says what to use instead or why it is not supported. Tokenizer flags are not listed
(they are defined with the tokenizer options).
"""

from __future__ import annotations

from collections.abc import Sequence

_LOOP = "attnres-pretrain's training loop reduces gradients after the backward pass"
_USE_MEGATRON_LM = "run Megatron-LM's pretrain_gpt.py with the plugin (README 'Using with Megatron-LM')"
_CHECKPOINT_STATE = (
    "not supported: checkpoints always hold the model, optimizer and RNG states "
    "(--no-load-optim loads the weights only); drop it."
)
_ACTIVATION = "not supported: the MLP uses GeLU, or SwiGLU with --swiglu; drop it."
_ROPE = "not supported: RoPE uses base 10000 over the whole head dimension; drop it."

# Megatron-LM flag -> what to use with attnres-pretrain instead, or why it is not supported.
MEGATRON_LM_FLAGS: dict[str, str] = {
    # precision
    "--fp16": "not supported (attnres-pretrain has no fp16 loss scaling); use --bf16.",
    "--fp8-format": f"not supported by attnres-pretrain (fp32 or --bf16); for FP8 {_USE_MEGATRON_LM}, "
    "or measure it with attnres-profile --fp8-format.",
    "--fp8-recipe": "not supported by attnres-pretrain; see --fp8-format.",
    "--accumulate-allreduce-grads-in-fp32": "not needed: with --bf16 gradients are already "
    "accumulated and reduced in fp32; drop it.",
    # run length, schedule, batch
    "--train-samples": "not supported; use --train-iters (samples / --global-batch-size).",
    "--lr-warmup-samples": "not supported; use --lr-warmup-iters or --lr-warmup-fraction.",
    "--lr-decay-samples": "not supported; use --lr-decay-iters.",
    "--lr-wsd-decay-samples": "not supported; use --lr-wsd-decay-iters.",
    "--rampup-batch-size": "not supported: the global batch is constant; drop it and set "
    "--global-batch-size.",
    "--start-weight-decay": "not supported: the weight decay is constant; use --weight-decay.",
    "--end-weight-decay": "not supported: the weight decay is constant; use --weight-decay.",
    "--weight-decay-incr-style": "not supported: the weight decay is constant; use --weight-decay.",
    "--exit-duration-in-mins": "not supported; use --exit-interval, or send SIGTERM (with --save a "
    "checkpoint is written first).",
    # model
    "--use-legacy-models": "not supported: attnres-pretrain builds Megatron-Core models only; drop it.",
    "--encoder-num-layers": "use --num-layers.",
    "--decoder-num-layers": "use --num-layers.",
    "--encoder-seq-length": "use --seq-length.",
    "--use-rotary-position-embeddings": "use --position-embedding-type rope.",
    "--no-position-embedding": "use --position-embedding-type none.",
    "--rotary-base": _ROPE,
    "--rotary-percent": _ROPE,
    "--rotary-interleaved": _ROPE,
    "--rotary-seq-len-interpolation-factor": _ROPE,
    "--use-rope-scaling": _ROPE,
    "--squared-relu": _ACTIVATION,
    "--openai-gelu": _ACTIVATION,
    "--quick-geglu": _ACTIVATION,
    "--apply-layernorm-1p": "not supported; use --normalization LayerNorm or RMSNorm.",
    "--use-flash-attn": "not needed: attention kernels come from Transformer Engine or PyTorch SDPA; "
    "drop it.",
    "--multi-latent-attention": "not supported by attnres-pretrain's GPT; use --model kimi-linear-* "
    f"(NoPE MLA), or {_USE_MEGATRON_LM}.",
    "--spec": "not supported: the layer spec follows --transformer-impl; for custom specs "
    f"{_USE_MEGATRON_LM}.",
    "--yaml-cfg": "not supported: pass the options as flags.",
    "--mtp-num-layers": "not supported: attnres-pretrain trains next-token prediction only; drop it.",
    "--moe-layer-freq": "not supported: with --num-experts every layer is an MoE layer (the Kimi "
    "presets set their own pattern); drop it.",
    "--moe-router-dtype": "not supported: the router always runs in fp32; drop it.",
    # parallelism and recompute
    "--num-layers-per-virtual-pipeline-stage": "use --num-virtual-stages-per-pipeline-rank "
    "(= layers / (--pipeline-model-parallel-size x this)).",
    "--model-parallel-size": "use --tensor-model-parallel-size.",
    "--recompute-activations": "use --recompute-granularity selective.",
    "--checkpoint-activations": "use --recompute-granularity full --recompute-method uniform "
    "(or selective recompute: --recompute-granularity selective).",
    "--overlap-grad-reduce": f"not supported: {_LOOP}; drop it (or {_USE_MEGATRON_LM}).",
    "--overlap-param-gather": f"not supported: {_LOOP}; drop it (or {_USE_MEGATRON_LM}).",
    "--tp-comm-overlap": f"not supported by attnres-pretrain; drop it (or {_USE_MEGATRON_LM}).",
    "--use-torch-fsdp2": "not supported; use --use-distributed-optimizer to shard the optimizer state.",
    "--use-megatron-fsdp": "not supported; use --use-distributed-optimizer to shard the optimizer state.",
    # data
    "--data-cache-path": "use $ATTNRES_CACHE_DIR instead: Megatron's dataset indices are cached in "
    "$ATTNRES_CACHE_DIR/dataset-indices (default ~/.cache/attnres-megatron).",
    "--num-workers": "not supported: batches are read in the training process (no DataLoader "
    "workers); drop it.",
    "--dataloader-type": "not supported: batches follow Megatron's sample order in a single pass; drop it.",
    "--train-data-path": "not supported; use --data-path with --split.",
    "--valid-data-path": "not supported; use --data-path with --split.",
    "--test-data-path": "not supported; use --data-path with --split.",
    # checkpoints
    "--no-load-rng": _CHECKPOINT_STATE,
    "--no-save-optim": _CHECKPOINT_STATE,
    "--no-save-rng": _CHECKPOINT_STATE,
    "--use-dist-ckpt": "not needed: checkpoints are always Megatron-Core distributed checkpoints "
    "(--ckpt-format torch_dist); drop it.",
    "--async-save": "not supported: checkpoints are saved synchronously; drop it.",
    "--finetune": "not supported; use --load DIR --no-load-optim to start from a checkpoint's weights.",
    "--use-checkpoint-args": "not supported: pass the model flags again.",
    # robustness and profiling
    "--no-check-for-nan-in-loss-and-grad": "not supported: a NaN/Inf loss or gradient always stops "
    "training; --skip-nonfinite-steps skips such iterations instead.",
    "--profile": "use attnres-profile (step-time split, peak memory, tokens/s).",
}


def flag_name(token: str) -> str:
    """The option in a command-line token (``--flag=value`` -> ``--flag``)."""
    return token.split("=", 1)[0]


def megatron_lm_hints(extras: Sequence[str]) -> list[str]:
    """One line per unrecognised Megatron-LM flag in ``extras``: the flag and what to use instead."""
    hints = []
    for token in extras:
        flag = flag_name(token)
        if flag in MEGATRON_LM_FLAGS and not any(line.startswith(f"{flag} ") for line in hints):
            hints.append(f"{flag} (a Megatron-LM flag): {MEGATRON_LM_FLAGS[flag]}")
    return hints


def unrecognized_message(extras: Sequence[str]) -> str:
    """argparse's 'unrecognized arguments' message, followed by the Megatron-LM hints."""
    return "\n".join([f"unrecognized arguments: {' '.join(extras)}", *megatron_lm_hints(extras)])
