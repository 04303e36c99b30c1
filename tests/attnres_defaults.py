"""``attnres-pretrain``'s defaults from before it took Megatron-LM's, for tests written against them.

``attnres-pretrain`` now has Megatron-LM's defaults: a GeLU MLP with biases, LayerNorm, learned
absolute positions, output weights tied to the embedding, dropout 0.1, Adam beta2 0.999, weight
decay 0.01, linear decay to 0, the allgather MoE dispatcher (``tests/test_megatron_flags.py``).
The tests below pass the old values explicitly, so they keep the model and schedule they were
written for: tests comparing losses across layouts need dropout 0 in particular. With
``--swiglu`` Megatron-LM's default MLP width is about 8/3 x hidden; the old one was 4 x hidden,
which these tests pass with :func:`old_ffn`.
"""

from __future__ import annotations

# SwiGLU MLP without biases, RMSNorm, RoPE, untied output weights, no dropout.
PRE_MEGATRON_MODEL = (
    "--swiglu",
    "--disable-bias-linear",
    "--normalization",
    "RMSNorm",
    "--position-embedding-type",
    "rope",
    "--untie-embeddings-and-output-weights",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
)
# AdamW (beta2 0.95, weight decay 0.1), cosine decay to 3e-4, alltoall MoE dispatcher.
PRE_MEGATRON_TRAINING = (
    "--min-lr",
    "3e-4",
    "--weight-decay",
    "0.1",
    "--adam-beta2",
    "0.95",
    "--lr-decay-style",
    "cosine",
    "--lr-wsd-decay-style",
    "linear",
    "--moe-token-dispatcher-type",
    "alltoall",
)
PRE_MEGATRON_DEFAULTS = (*PRE_MEGATRON_MODEL, *PRE_MEGATRON_TRAINING)


def old_ffn(hidden_size: int) -> tuple[str, str]:
    """``--ffn-hidden-size`` of the old default MLP width (4 x hidden size)."""
    return ("--ffn-hidden-size", str(4 * hidden_size))
