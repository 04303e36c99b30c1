"""``ModuleSpec`` builders for AttnRes GPT layers (local CPU-capable spec and TE spec)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from attnres_megatron.layers.norms import RMSNorm
from attnres_megatron.layers.sdpa_attention import SDPACoreAttention
from attnres_megatron.layers.transformer_layer import (
    AttnResTransformerLayer,
    AttnResTransformerLayerSubmodules,
)

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
CONTEXT_PARALLEL_NEEDS_TE = (
    "--context-parallel-size > 1 needs Transformer Engine attention: Megatron-Core's local "
    "attention has no context-parallel path. Use --transformer-impl transformer_engine on a "
    "GPU machine with Transformer Engine installed, or --context-parallel-size 1."
)


def transformer_engine_available() -> bool:
    """Whether Transformer Engine imports (Megatron-Core's own probe)."""
    return bool(getattr(gpt_layer_specs, "HAVE_TE", False))


def runs_on_cuda(device: Optional[str] = None) -> bool:
    """Whether ``device`` is a CUDA device (None or 'auto': whether CUDA is available)."""
    if device is None or device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def resolve_transformer_impl(transformer_impl: str, device: Optional[str] = None) -> str:
    """The one rule for every model family: 'auto' is 'transformer_engine' when TE imports and the
    device is CUDA, else 'local'; an explicit 'transformer_engine' is refused when TE is absent."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(
            f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)}; got {transformer_impl!r}."
        )
    if transformer_impl == "auto":
        return "transformer_engine" if transformer_engine_available() and runs_on_cuda(device) else "local"
    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ValueError(
            "--transformer-impl transformer_engine was requested but Transformer Engine is not "
            "installed; install it (pip install 'attnres-megatron[te]' on a CUDA machine) or "
            "use --transformer-impl local."
        )
    return transformer_impl


def with_attention_residuals(layer_spec: ModuleSpec) -> ModuleSpec:
    """Return a copy of a ``TransformerLayer`` spec that builds an AttnRes layer instead."""
    fields = {
        f.name: getattr(layer_spec.submodules, f.name) for f in dataclasses.fields(layer_spec.submodules)
    }
    return ModuleSpec(
        module=AttnResTransformerLayer,
        params=dict(layer_spec.params),
        submodules=AttnResTransformerLayerSubmodules(**fields),
    )


def _use_local_modules(layer_spec: ModuleSpec, normalization: str) -> ModuleSpec:
    """Swap in SDPA core attention and (for RMSNorm) the sequence-parallel-capable norm."""
    spec = copy.deepcopy(layer_spec)
    sub = spec.submodules
    if normalization == "RMSNorm":
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(sub, name) is not IdentityOp:
                setattr(sub, name, RMSNorm)
    attention = sub.self_attention.submodules
    attention.core_attention = SDPACoreAttention
    if normalization == "RMSNorm":
        for name in ("q_layernorm", "k_layernorm", "kv_layernorm"):
            if getattr(attention, name, IdentityOp) is not IdentityOp:
                setattr(attention, name, RMSNorm)
    return spec


def get_gpt_layer_spec(
    transformer_impl: str = "auto",
    attention_residuals: bool = True,
    normalization: str = "RMSNorm",
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    multi_latent_attention: bool = False,
) -> ModuleSpec:
    """GPT layer spec: Transformer Engine's when asked for (or ``auto`` picks it), else a local
    spec that runs on CPU (SDPA attention, sequence-parallel RMSNorm); AttnRes layers
    unless ``attention_residuals`` is false (then the stock Megatron layer)."""
    impl = resolve_transformer_impl(transformer_impl)
    if impl == "transformer_engine":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=moe_grouped_gemm,
            qk_layernorm=qk_layernorm,
            multi_latent_attention=multi_latent_attention,
        )
    else:
        spec = _use_local_modules(
            gpt_layer_specs.get_gpt_layer_local_spec(
                num_experts=num_experts,
                moe_grouped_gemm=moe_grouped_gemm,
                qk_layernorm=qk_layernorm,
                multi_latent_attention=multi_latent_attention,
                normalization=normalization,
            ),
            normalization,
        )
    return with_attention_residuals(spec) if attention_residuals else spec


def get_gpt_decoder_block_spec(
    config: TransformerConfig,
    layer_spec: ModuleSpec,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec for this pipeline stage whose final norm is the sequence-parallel RMSNorm
    (local specs with RMSNorm); other specs keep Megatron's default final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if config.normalization == "RMSNorm" and layer_spec.submodules.input_layernorm is RMSNorm:
        layer_norm = RMSNorm
    else:
        from megatron.core.transformer.transformer_block import LayerNormImpl

        layer_norm = LayerNormImpl
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=layer_norm)
