"""Models, configs and the fp64 loss shared by the multi-process parity workers."""

from __future__ import annotations

import torch


def small_gpt_config(**fields):
    """A tiny fp64 AttnRes GPT config with the workers' common settings; ``fields`` add to it."""
    from attnres_megatron import AttnResTransformerConfig

    base = dict(
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=48,
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float64,
    )
    return AttnResTransformerConfig(**{**base, **fields})


def kimi_tiny_config(**fields):
    """The ``kimi-linear-tiny`` preset in fp64 (router included)."""
    from attnres_megatron.models.kimi.presets import kimi_linear_config

    return kimi_linear_config(
        "kimi-linear-tiny",
        use_cpu_initialization=True,
        params_dtype=torch.float64,
        moe_router_dtype="fp64",
        **fields,
    )


def build_local(config, vocab: int, seq: int, **stage):
    """The local-spec model for ``config`` (GPT or Kimi Linear) for one pipeline stage."""
    from attnres_megatron.models.builder import build_gpt_model
    from attnres_megatron.models.kimi.presets import KimiLinearConfig, build_kimi_linear_model

    if isinstance(config, KimiLinearConfig):
        return build_kimi_linear_model(config, max_sequence_length=seq, transformer_impl="local", **stage)
    return build_gpt_model(config, vocab, seq, transformer_impl="local", **stage)


def fp64_next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over [b, s, vocab] logits."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
