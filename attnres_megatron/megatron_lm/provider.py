"""Model providers for Megatron-LM's ``pretrain``: the AttnRes GPT / Kimi Linear chunk of this stage."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Optional

from megatron.core import parallel_state

from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.megatron_lm.arguments import attnres_requested, resolved_device, validate_attn_res_args
from attnres_megatron.megatron_lm.config import config_from_megatron_args
from attnres_megatron.models.families import chunk_inputs, model_family
from attnres_megatron.models.gpt import AttnResGPTModel
from attnres_megatron.ops.dispatch import choose_for_model

MEGATRON_LM_MISSING = (
    "Megatron-LM's training package (megatron.training) is not importable: the megatron-core "
    "wheel ships megatron/core only. Put a Megatron-LM core_r0.16 checkout on PYTHONPATH, e.g. "
    "git clone -b core_r0.16.0 https://github.com/NVIDIA/Megatron-LM && "
    "export PYTHONPATH=$PWD/Megatron-LM:$PYTHONPATH"
)

# Process groups of a ProcessGroupCollection and parallel_state's getters for the same groups.
_DEFAULT_GROUPS = {
    "tp": parallel_state.get_tensor_model_parallel_group,
    "pp": parallel_state.get_pipeline_model_parallel_group,
    "cp": parallel_state.get_context_parallel_group,
    "ep": parallel_state.get_expert_model_parallel_group,
    "expt_tp": parallel_state.get_expert_tensor_parallel_group,
}


class MegatronLMNotFoundError(ImportError):
    """Megatron-LM (``megatron.training``) is needed but not importable."""


def megatron_lm_args() -> argparse.Namespace:
    """Megatron-LM's parsed global arguments (``megatron.training.get_args()``)."""
    try:
        from megatron.training import get_args
    except ImportError as error:
        raise MegatronLMNotFoundError(MEGATRON_LM_MISSING) from error
    return get_args()


def _check_default_groups(pg_collection: Any) -> None:
    """The builders use parallel_state's groups; refuse a collection with other groups."""
    if pg_collection is None:
        return
    for name, getter in _DEFAULT_GROUPS.items():
        group = getattr(pg_collection, name, None)
        if group is not None and group is not getter(check_initialized=False):
            raise NotImplementedError(
                f"the AttnRes model provider builds on Megatron's default process groups; "
                f"pg_collection.{name} is another group."
            )


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    config: Optional[AttnResTransformerConfig] = None,
    pg_collection: Any = None,
    *,
    args: Optional[argparse.Namespace] = None,
) -> AttnResGPTModel:
    """Build this pipeline chunk's AttnRes GPT or Kimi Linear model from Megatron-LM's arguments
    (``get_args()`` unless ``args`` is given), as ``attnres-pretrain`` builds it."""
    args = megatron_lm_args() if args is None else args
    validate_attn_res_args(args)
    _check_default_groups(pg_collection)
    if config is None:
        config = config_from_megatron_args(args)
    elif not isinstance(config, AttnResTransformerConfig):
        raise TypeError(f"the AttnRes model provider needs an AttnResTransformerConfig; got {type(config)}.")
    inputs = chunk_inputs(args, args.padded_vocab_size)  # auto: the one rule, on this process's device
    if config.attn_res_enabled and not vp_stage:
        _log_aggregation_choice(config, args)
    return model_family(args.model).build_chunk(config, inputs, pre_process, post_process, vp_stage)


def _print_rank_0(message: str) -> None:
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


def _log_aggregation_choice(config: AttnResTransformerConfig, args: argparse.Namespace) -> None:
    """Megatron-LM's rank-0 log line naming what ``--attn-res-impl`` resolved to here."""
    try:
        from megatron.training.utils import print_rank_0
    except ImportError:  # the provider used without Megatron-LM's training package
        print_rank_0 = _print_rank_0

    device = resolved_device(args) if hasattr(args, "device") else "cuda"
    # Megatron-LM always parses both; a provider called with a partial namespace logs for size 0.
    choice = choose_for_model(
        config, device, getattr(args, "seq_length", 0), getattr(args, "micro_batch_size", 1)
    )
    print_rank_0(f"> {choice.describe()}")


def model_provider_or(stock_provider: Callable[..., Any]) -> Callable[..., Any]:
    """A model provider that builds the AttnRes model when the flags ask for it (AttnRes on, or a
    Kimi Linear preset) and calls ``stock_provider`` (Megatron-LM's own) otherwise."""

    def provider(
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        config: Any = None,
        pg_collection: Any = None,
        *,
        args: Optional[argparse.Namespace] = None,
    ) -> Any:
        args = megatron_lm_args() if args is None else args
        if attnres_requested(args):
            return model_provider(pre_process, post_process, vp_stage, config, pg_collection, args=args)
        return stock_provider(
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            config=config,
            pg_collection=pg_collection,
        )

    return provider
