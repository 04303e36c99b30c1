"""Megatron-LM launch integration: argument and model providers for ``megatron.training.pretrain``.

``extra_args_provider`` adds the plugin's flags to Megatron-LM's parser; ``model_provider``
builds the AttnRes GPT or Kimi Linear chunk of a pipeline stage from Megatron-LM's
arguments; ``model_provider_or(stock)`` uses it only when the flags ask for AttnRes (or a
Kimi preset); ``prepare_pretrain(pretrain, args_provider)`` parses the flags, sets up the
launcher variables and installs the device's adaptations before Megatron-LM starts.
``python -m attnres_megatron.megatron_lm.pretrain_gpt_attnres`` runs
Megatron-LM's ``pretrain_gpt.py`` with them, and ``patches/`` wires them into that script.
"""

from attnres_megatron.megatron_lm.arguments import (
    attnres_requested,
    chain_args_providers,
    extra_args_provider,
    validate_attn_res_args,
)
from attnres_megatron.megatron_lm.config import (
    AttnResMLATransformerConfig,
    config_from_megatron_args,
    megatron_lm_available,
)
from attnres_megatron.megatron_lm.launch import prepare_pretrain
from attnres_megatron.megatron_lm.provider import (
    MEGATRON_LM_MISSING,
    MegatronLMNotFoundError,
    model_provider,
    model_provider_or,
)

__all__ = [
    "MEGATRON_LM_MISSING",
    "AttnResMLATransformerConfig",
    "MegatronLMNotFoundError",
    "attnres_requested",
    "chain_args_providers",
    "config_from_megatron_args",
    "extra_args_provider",
    "megatron_lm_available",
    "model_provider",
    "model_provider_or",
    "prepare_pretrain",
    "validate_attn_res_args",
]
