"""Kimi Linear's layer pattern (KDA/MLA token mixers, dense/MoE channel mixers) as Megatron specs.

Layer ``i`` (1-based, global) uses MLA when ``i`` is a multiple of 4 or the last layer, and
Kimi Delta Attention otherwise: for the released 27-layer model that is MLA at
``[4, 8, 12, 16, 20, 24, 27]`` (``full_attn_layers`` of its ``config.json``). The first
``kimi_first_k_dense`` layers use a dense SwiGLU MLP of width ``kimi_dense_ffn_hidden_size``;
the others use Megatron's ``MoELayer`` (routed experts, shared expert, sigmoid router with
expert bias, all set by the config).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from attnres_megatron.layers.norms import RMSNorm
from attnres_megatron.layers.sdpa_attention import SDPACoreAttention
from attnres_megatron.models.kimi.kda_attention import KimiDeltaAttention
from attnres_megatron.models.kimi.mla import MLASDPACoreAttention, NoPEMLASelfAttention
from attnres_megatron.models.specs import (
    get_gpt_layer_spec,
    resolve_transformer_impl,
    with_attention_residuals,
)

KDA, MLA = "kda", "mla"
MLA_EVERY = 4


def kimi_attention_pattern(num_layers: int, mla_layers: Optional[list[int]] = None) -> list[str]:
    """Token mixer per layer ('kda' or 'mla'): MLA at every 4th 1-based layer and the last layer."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive; got {num_layers}.")
    if mla_layers is None:
        mla = {i for i in range(1, num_layers + 1) if i % MLA_EVERY == 0} | {num_layers}
    else:
        mla = set(mla_layers)
        bad = sorted(i for i in mla if not 1 <= i <= num_layers)
        if bad:
            raise ValueError(f"MLA layers are 1-based and at most {num_layers}; got {bad}.")
    return [MLA if i in mla else KDA for i in range(1, num_layers + 1)]


def kimi_moe_pattern(num_layers: int, first_k_dense: int) -> list[int]:
    """``moe_layer_freq`` list for Kimi Linear: 0 (dense) for the first k layers, then 1 (MoE)."""
    if not 0 <= first_k_dense <= num_layers:
        raise ValueError(f"kimi_first_k_dense must be in [0, {num_layers}]; got {first_k_dense}.")
    return [0] * first_k_dense + [1] * (num_layers - first_k_dense)


def _layer_spec(
    config: TransformerConfig, mixer: str, moe: bool, transformer_impl: str, attention_residuals: bool
) -> ModuleSpec:
    """One layer: an MLA-layer base spec with its token mixer and channel mixer chosen."""
    spec = copy.deepcopy(
        get_gpt_layer_spec(
            transformer_impl,
            attention_residuals=False,
            normalization=config.normalization,
            num_experts=config.num_moe_experts if moe else None,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=True,  # the 512-d latent RMSNorm (kv_a_layernorm); no q norm without q_lora_rank
            multi_latent_attention=True,
        )
    )
    sub = spec.submodules
    if mixer == MLA:
        attention = copy.deepcopy(sub.self_attention)
        attention.module = NoPEMLASelfAttention
        if attention.submodules.core_attention is SDPACoreAttention:
            attention.submodules.core_attention = MLASDPACoreAttention
        sub.self_attention = attention
    else:
        sub.self_attention = ModuleSpec(module=KimiDeltaAttention)
    if not moe:
        dense = getattr(config, "kimi_dense_ffn_hidden_size", None) or config.ffn_hidden_size
        sub.mlp = dataclasses.replace(sub.mlp, params={**sub.mlp.params, "ffn_hidden_size": dense})
    return with_attention_residuals(spec) if attention_residuals else spec


def kimi_linear_layer_specs(
    config: TransformerConfig, attention_residuals: bool = True, transformer_impl: str = "local"
) -> list[ModuleSpec]:
    """Specs of all ``config.num_layers`` layers of the model (global order)."""
    impl = resolve_transformer_impl(transformer_impl)
    mixers = kimi_attention_pattern(config.num_layers, getattr(config, "kimi_mla_layers", None))
    moe_freq = kimi_moe_pattern(config.num_layers, getattr(config, "kimi_first_k_dense", 0))
    if any(moe_freq) and not config.num_moe_experts:
        raise ValueError(
            "Kimi Linear MoE layers need num_moe_experts; set it or kimi_first_k_dense=num_layers."
        )
    cache: dict[tuple[str, bool], ModuleSpec] = {}
    specs = []
    for mixer, moe in zip(mixers, moe_freq):
        key = (mixer, bool(moe))
        if key not in cache:
            cache[key] = _layer_spec(config, mixer, bool(moe), impl, attention_residuals)
        specs.append(cache[key])
    return specs


def kimi_linear_block_spec(
    config: TransformerConfig,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    attention_residuals: Optional[bool] = True,
    transformer_impl: str = "local",
) -> TransformerBlockSubmodules:
    """Block spec with the Kimi Linear layers of this pipeline stage (or virtual stage).

    ``attention_residuals=None`` follows ``config.attention_residuals``; ``True`` needs an
    AttnRes config with AttnRes enabled.
    """
    enabled = bool(getattr(config, "attn_res_enabled", False))
    if attention_residuals is None:
        attention_residuals = enabled
    elif attention_residuals and not enabled:
        raise ValueError(
            "kimi_linear_block_spec(attention_residuals=True) needs a config with attention_residuals "
            "'block' or 'full'; pass attention_residuals=False (or None) for standard residuals."
        )
    if config.normalization != "RMSNorm":
        raise ValueError(f"Kimi Linear uses RMSNorm; got normalization={config.normalization!r}.")
    layer_specs = kimi_linear_layer_specs(config, attention_residuals, transformer_impl)
    layout: Any = config.pipeline_model_parallel_layout
    if layout is not None:
        ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
        local = [layer_specs[i] for i in ids]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local = layer_specs[offset : offset + count]
    norm = layer_specs[0].submodules.input_layernorm
    if norm is not RMSNorm:  # Transformer Engine specs: Megatron's default final norm
        from megatron.core.transformer.transformer_block import LayerNormImpl

        norm = LayerNormImpl
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=norm)
