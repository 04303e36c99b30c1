"""Megatron-LM arguments to an AttnRes config, with Megatron-LM's own mapping when it is importable."""

from __future__ import annotations

import argparse
import copy
import importlib.util
from typing import Any

import torch.nn.functional as F

from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.models.families import AttnResMLATransformerConfig as AttnResMLATransformerConfig
from attnres_megatron.models.families import field_names as _field_names
from attnres_megatron.models.families import model_family
from attnres_megatron.models.kimi.presets import KimiLinearConfig
from attnres_megatron.training.model_setup import attn_res_overrides

# Megatron-LM arguments whose config field has another name: field -> argument.
RENAMED = {
    "num_moe_experts": "num_experts",
    "num_layers_in_first_pipeline_stage": "decoder_first_pipeline_num_layers",
    "num_layers_in_last_pipeline_stage": "decoder_last_pipeline_num_layers",
    "fp8_param": "fp8_param_gather",
    "pipeline_dtype": "params_dtype",
    "layernorm_epsilon": "norm_epsilon",
}
# Fields set from the negation of an argument: field -> argument.
NEGATED = {"persist_layer_norm": "no_persist_layer_norm", "batch_p2p_comm": "overlap_p2p_comm"}


class _RecordedKwargs(KimiLinearConfig):
    """Has every config field (GPT, MLA, AttnRes, Kimi); keeps the keyword arguments instead of validating."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


def megatron_lm_available() -> bool:
    """Whether Megatron-LM's ``megatron.training`` is importable (a checkout on ``PYTHONPATH``)."""
    try:
        return importlib.util.find_spec("megatron.training") is not None
    except (ImportError, ValueError):
        return False


def transformer_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The config keyword arguments Megatron-LM derives from ``args``, for every config field."""
    if getattr(args, "heterogeneous_layers_config_path", None) is not None:
        raise ValueError("--heterogeneous-layers-config-path is not supported by the AttnRes model provider.")
    rope_type = getattr(args, "rope_type", None)
    mla = bool(getattr(args, "multi_latent_attention", False))
    if not mla and rope_type not in (None, "rope"):
        raise ValueError(f"--rope-type {rope_type} needs --multi-latent-attention.")
    if megatron_lm_available():
        kwargs = _kwargs_from_megatron_lm(args)
    else:
        kwargs = _kwargs_from_namespace(args)
    kwargs["multi_latent_attention"] = mla
    kwargs.pop("rope_type", None)
    if rope_type is not None:
        kwargs["rope_type"] = rope_type
    return kwargs


def _kwargs_from_megatron_lm(args: argparse.Namespace) -> dict[str, Any]:
    """Megatron-LM's ``core_transformer_config_from_args``, recording instead of building."""
    from megatron.training.arguments import core_transformer_config_from_args

    # With MLA set, Megatron-LM picks its own config class; MLA and rope_type are restored by the caller.
    view = copy.copy(args)
    view.multi_latent_attention = False
    view.rope_type = None
    return core_transformer_config_from_args(view, config_class=_RecordedKwargs).kwargs


def _kwargs_from_namespace(args: argparse.Namespace) -> dict[str, Any]:
    """The same mapping without Megatron-LM: same-named arguments plus its renamed and derived ones."""
    names = _field_names(_RecordedKwargs)
    kwargs = {name: getattr(args, name) for name in names if hasattr(args, name)}
    kwargs.update({field: getattr(args, arg) for field, arg in RENAMED.items() if hasattr(args, arg)})
    kwargs.update({field: not getattr(args, arg) for field, arg in NEGATED.items() if hasattr(args, arg)})
    kwargs["deallocate_pipeline_outputs"] = True
    if hasattr(args, "seed"):
        kwargs["inference_sampling_seed"] = args.seed
    if getattr(args, "swiglu", False):
        kwargs.update(gated_linear_unit=True, activation_func=F.silu)
        kwargs["bias_activation_fusion"] = getattr(args, "bias_swiglu_fusion", False)
    elif hasattr(args, "bias_gelu_fusion"):
        kwargs["bias_activation_fusion"] = args.bias_gelu_fusion
    if getattr(args, "squared_relu", False):
        from megatron.core.activations import squared_relu

        kwargs["activation_func"] = squared_relu
    if not getattr(args, "group_query_attention", False):
        kwargs["num_query_groups"] = None
    cp_comm_type = getattr(args, "cp_comm_type", None)
    if isinstance(cp_comm_type, list) and len(cp_comm_type) == 1:
        kwargs["cp_comm_type"] = cp_comm_type[0]
    return kwargs


def config_from_megatron_args(args: argparse.Namespace) -> AttnResTransformerConfig:
    """The AttnRes config for Megatron-LM arguments (``attention_residuals='none'`` unless asked)."""
    family = model_family(args.model)
    fields = family.megatron_lm_fields(transformer_config_kwargs(args))
    config = family.make_config(**fields, **attn_res_overrides(args))
    args.attn_res_eps = config.attn_res_eps  # the resolved value, saved in Megatron-LM's checkpoints
    return config
