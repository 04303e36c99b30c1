"""Kimi Linear configurations (48B-A3B release shape, a CPU-sized tiny model, a ~1B proxy) and a builder.

``KimiLinearConfig`` is an :class:`AttnResTransformerConfig` that is also a Megatron-Core
``MLATransformerConfig`` (MLA fields) and carries the Kimi Delta Attention (``kda_*``) and
layer-pattern (``kimi_*``) fields read by :mod:`attnres_megatron.models.kimi.layers`.
Architecture facts: ``shared/reference/kimi-linear-48b-a3b.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig

from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.models.gpt import AttnResGPTModel
from attnres_megatron.models.kimi.layers import (
    kimi_attention_pattern,
    kimi_linear_block_spec,
    kimi_moe_pattern,
)
from attnres_megatron.models.specs import CONTEXT_PARALLEL_NEEDS_TE, resolve_transformer_impl

KIMI_VOCAB_SIZE = 163840
_BLOCK_SIZE_OPTIONS = ("attn_res_block_size", "attn_res_layers_per_block", "attn_res_num_blocks")


@dataclass
class KimiLinearConfig(AttnResTransformerConfig, MLATransformerConfig):
    """Kimi Linear hybrid KDA/MLA MoE transformer config with Attention Residuals options."""

    # Defaults that differ from Megatron's: Kimi Linear's choices (NoPE MLA, SwiGLU, no biases).
    # (Fields of TransformerConfig are redeclared here: AttnResTransformerConfig's copies of them
    # come later in the MRO and would otherwise hide MLATransformerConfig's defaults.)
    multi_latent_attention: bool = True
    """Kimi Linear's full-attention layers are MLA."""

    normalization: str = "RMSNorm"
    """Pre-norm RMSNorm everywhere."""

    q_lora_rank: Optional[int] = None
    """Query low-rank dimension; Kimi Linear projects queries directly (None)."""

    rope_type: str = "rope"
    """Must stay 'rope': the NoPE MLA replaces it with a zero-channel rotary embedding."""

    rotary_scaling_factor: float = 1.0
    """No YaRN scaling (keeps the MLA softmax scale at 1/sqrt(qk head dim))."""

    gated_linear_unit: bool = True
    """SwiGLU MLPs and experts."""

    activation_func: Callable = F.silu
    """SiLU gate of the SwiGLU."""

    add_bias_linear: bool = False
    """Every Kimi Linear projection is bias-free."""

    kda_num_heads: Optional[int] = None
    """KDA heads (default: num_attention_heads)."""

    kda_head_dim: Optional[int] = None
    """KDA head dimension d_k = d_v (default: kv_channels)."""

    kda_gate_rank: int = 128
    """Rank of KDA's low-rank forget-gate and output-gate projections."""

    kda_conv_kernel: int = 4
    """Kernel of KDA's depthwise causal short convolutions."""

    kda_chunk_size: int = 64
    """Chunk length of the chunked KDA recurrence."""

    kda_norm_eps: float = 1e-5
    """Epsilon of KDA's gated per-head output RMSNorm."""

    kimi_first_k_dense: int = 1
    """Number of leading layers with a dense MLP instead of MoE (first_k_dense_replace)."""

    kimi_dense_ffn_hidden_size: Optional[int] = None
    """Width of the dense layers' SwiGLU MLP (default: ffn_hidden_size)."""

    kimi_mla_layers: Optional[list[int]] = None
    """1-based MLA layers; default every 4th layer and the last (release: 4,8,...,24,27)."""

    kimi_vocab_size: int = KIMI_VOCAB_SIZE
    """Vocabulary size the model builder uses unless given one."""

    def __post_init__(self) -> None:
        if not self.multi_latent_attention:
            raise ValueError("Kimi Linear's full-attention layers are MLA; keep multi_latent_attention=True.")
        if self.rope_type != "rope" or self.apply_rope_fusion:
            raise ValueError(
                "Kimi Linear's MLA is NoPE: keep rope_type='rope' and apply_rope_fusion=False "
                "(the positional slice is never rotated)."
            )
        moe_freq = kimi_moe_pattern(self.num_layers, self.kimi_first_k_dense)
        if isinstance(self.moe_layer_freq, list) and list(self.moe_layer_freq) != moe_freq:
            raise ValueError(
                f"moe_layer_freq={self.moe_layer_freq} contradicts kimi_first_k_dense="
                f"{self.kimi_first_k_dense}; set only kimi_first_k_dense."
            )
        if any(moe_freq):
            self.moe_layer_freq = moe_freq
        kimi_attention_pattern(self.num_layers, self.kimi_mla_layers)  # validates kimi_mla_layers
        super().__post_init__()
        if self.kimi_dense_ffn_hidden_size is None:
            self.kimi_dense_ffn_hidden_size = self.ffn_hidden_size
        self.kda_num_heads = self.kda_num_heads or self.num_attention_heads
        self.kda_head_dim = self.kda_head_dim or self.kv_channels
        for name in ("kda_num_heads", "kda_head_dim", "kda_gate_rank", "kda_conv_kernel", "kda_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if self.kda_num_heads % self.tensor_model_parallel_size:
            raise ValueError(
                f"kda_num_heads={self.kda_num_heads} must be divisible by tensor_model_parallel_size="
                f"{self.tensor_model_parallel_size}."
            )
        if self.kda_norm_eps <= 0:
            raise ValueError(f"kda_norm_eps must be > 0; got {self.kda_norm_eps}.")

    def attention_pattern(self) -> list[str]:
        """'kda'/'mla' for every layer, in global order."""
        return kimi_attention_pattern(self.num_layers, self.kimi_mla_layers)


_COMMON: dict[str, Any] = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-5,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.02,
    qk_layernorm=True,  # the kv latent RMSNorm
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_dtype="fp32",
    moe_router_load_balancing_type="none",
    moe_aux_loss_coeff=0.0,
    moe_router_topk_scaling_factor=2.446,
    moe_token_dispatcher_type="alltoall",
    kimi_first_k_dense=1,
    attention_residuals="block",
)

PRESETS: dict[str, dict[str, Any]] = {
    # moonshotai/Kimi-Linear-48B-A3B config.json, with Block AttnRes (S = 6: 10 sources at the output).
    "kimi-linear-48b-a3b": dict(
        _COMMON,
        num_layers=27,
        hidden_size=2304,
        num_attention_heads=32,
        ffn_hidden_size=9216,
        kimi_dense_ffn_hidden_size=9216,
        kv_lora_rank=512,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        kda_num_heads=32,
        kda_head_dim=128,
        kda_gate_rank=128,
        kda_conv_kernel=4,
        num_moe_experts=256,
        moe_router_topk=8,
        moe_ffn_hidden_size=1024,
        moe_shared_expert_intermediate_size=1024,
        kimi_vocab_size=KIMI_VOCAB_SIZE,
        attn_res_block_size=6,
    ),
    # Same pattern (MLA at layers 4 and 5) and routing at CPU size; byte vocabulary.
    "kimi-linear-tiny": dict(
        _COMMON,
        num_layers=5,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        kimi_dense_ffn_hidden_size=128,
        kv_lora_rank=16,
        qk_head_dim=16,
        qk_pos_emb_head_dim=8,
        v_head_dim=16,
        kda_num_heads=2,
        kda_head_dim=16,
        kda_gate_rank=8,
        kda_conv_kernel=4,
        kda_chunk_size=16,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        kimi_vocab_size=256,
        attn_res_block_size=4,
    ),
    # About 1B total parameters for one GPU: the release's pattern and routing, 64 experts top-8.
    "kimi-linear-1b-proxy": dict(
        _COMMON,
        num_layers=16,
        hidden_size=1024,
        num_attention_heads=8,
        ffn_hidden_size=4096,
        kimi_dense_ffn_hidden_size=4096,
        kv_lora_rank=256,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        kda_num_heads=8,
        kda_head_dim=128,
        kda_gate_rank=64,
        kda_conv_kernel=4,
        num_moe_experts=64,
        moe_router_topk=8,
        moe_ffn_hidden_size=256,
        moe_shared_expert_intermediate_size=256,
        kimi_vocab_size=KIMI_VOCAB_SIZE,
        attn_res_block_size=6,
    ),
}


def kimi_linear_config(name: str, **overrides: Any) -> KimiLinearConfig:
    """Config of a preset with field overrides (AttnRes, parallelism, dtype, sizes...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Kimi Linear preset {name!r}; choose one of {', '.join(sorted(PRESETS))}.")
    fields = copy.deepcopy(PRESETS[name])
    if any(key in overrides for key in ("attention_residuals", *_BLOCK_SIZE_OPTIONS)):
        # The caller chooses the depth mixing; keep only the block-size option they gave.
        for key in _BLOCK_SIZE_OPTIONS:
            fields.pop(key, None)
    if overrides.get("attention_residuals", fields["attention_residuals"]) == "block" and not any(
        key in overrides for key in _BLOCK_SIZE_OPTIONS
    ):
        fields["attn_res_block_size"] = PRESETS[name].get("attn_res_block_size")
    fields.update(overrides)
    return KimiLinearConfig(**fields)


def build_kimi_linear_model(
    config: KimiLinearConfig,
    vocab_size: Optional[int] = None,
    max_sequence_length: int = 4096,
    transformer_impl: str = "local",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    parallel_output: bool = True,
) -> AttnResGPTModel:
    """Kimi Linear for this pipeline stage: untied embeddings, NoPE (no position embedding)."""
    if not isinstance(config, KimiLinearConfig):
        raise TypeError("build_kimi_linear_model needs a KimiLinearConfig (see kimi_linear_config).")
    impl = resolve_transformer_impl(transformer_impl)
    if config.context_parallel_size > 1 and impl == "local":
        raise ValueError(CONTEXT_PARALLEL_NEEDS_TE)
    block_spec = kimi_linear_block_spec(
        config, vp_stage=vp_stage, attention_residuals=config.attn_res_enabled, transformer_impl=impl
    )
    return AttnResGPTModel(
        config,
        block_spec,
        vocab_size=vocab_size or config.kimi_vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
        vp_stage=vp_stage,
    )
