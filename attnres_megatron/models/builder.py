"""One call from a config to an AttnRes GPT model for the current pipeline stage."""

from __future__ import annotations

from typing import Optional

from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.models.gpt import AttnResGPTModel
from attnres_megatron.models.specs import (
    CONTEXT_PARALLEL_NEEDS_TE,
    get_gpt_decoder_block_spec,
    get_gpt_layer_spec,
    resolve_transformer_impl,
)


def build_gpt_model(
    config: AttnResTransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    transformer_impl: str = "auto",
    position_embedding_type: str = "rope",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    share_embeddings_and_output_weights: bool = False,
) -> AttnResGPTModel:
    """Build the AttnRes GPT (stock layers when ``attention_residuals='none'``)."""
    impl = resolve_transformer_impl(transformer_impl)
    if config.context_parallel_size > 1 and impl == "local":
        raise ValueError(CONTEXT_PARALLEL_NEEDS_TE)
    layer_spec = get_gpt_layer_spec(
        impl,
        attention_residuals=config.attn_res_enabled,
        normalization=config.normalization,
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
    )
    return AttnResGPTModel(
        config,
        get_gpt_decoder_block_spec(config, layer_spec, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        vp_stage=vp_stage,
    )
