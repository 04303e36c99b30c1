"""Megatron-LM's ``pretrain_gpt.py`` with the AttnRes providers, without patching Megatron-LM.

Takes ``pretrain_gpt.py``'s arguments plus the plugin's flags; Megatron-LM's dataset
provider, forward step and embedding ranks come from its ``pretrain_gpt.py``::

    export PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH      # or MEGATRON_LM_DIR=/path/to/Megatron-LM
    torchrun --nproc-per-node 8 -m attnres_megatron.megatron_lm.pretrain_gpt_attnres \\
        <pretrain_gpt.py arguments> --attention-residuals block --attn-res-num-blocks 8

Without ``--attention-residuals`` (or with ``none``) and ``--model gpt`` the run is
Megatron-LM's own: its model provider builds the model.
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import partial
from types import ModuleType

from attnres_megatron.compat.versions import check_megatron_lm_version
from attnres_megatron.megatron_lm.arguments import (
    chain_args_providers,
    driver_args_provider,
    extra_args_provider,
)
from attnres_megatron.megatron_lm.launch import prepare_pretrain
from attnres_megatron.megatron_lm.provider import (
    MEGATRON_LM_MISSING,
    MegatronLMNotFoundError,
    model_provider_or,
)
from attnres_megatron.training.quiet import optional_packages_line, quiet_start

_SCRIPT_MODULES = ("pretrain_gpt", "gpt_builders", "model_provider")


def load_pretrain_gpt() -> ModuleType:
    """Megatron-LM's ``pretrain_gpt`` module, from ``PYTHONPATH`` or ``$MEGATRON_LM_DIR``."""
    root = os.environ.get("MEGATRON_LM_DIR")
    if root and root not in sys.path:
        sys.path.insert(0, root)
    try:
        importlib.import_module("megatron.training")
    except ImportError as error:
        raise MegatronLMNotFoundError(MEGATRON_LM_MISSING) from error
    try:
        check_megatron_lm_version()
    except ImportError as error:
        raise MegatronLMNotFoundError(str(error)) from error
    try:
        return importlib.import_module("pretrain_gpt")
    except ModuleNotFoundError as error:
        if error.name not in _SCRIPT_MODULES:
            raise
        raise MegatronLMNotFoundError(
            f"Megatron-LM's {error.name}.py is not importable: put the root of the Megatron-LM "
            "checkout (the directory holding pretrain_gpt.py) on PYTHONPATH, or set MEGATRON_LM_DIR."
        ) from error


def announce_missing_packages() -> None:
    """The one optional-packages line, on global rank 0 (before Megatron-LM starts its groups)."""
    missing = optional_packages_line()
    if missing and os.environ.get("RANK", "0") == "0":
        print(f"> {missing}", flush=True)


def main() -> None:
    """Run Megatron-LM's GPT pretraining with the AttnRes argument and model providers."""
    quiet_start()  # also done on import of the package when started as this module
    try:
        lm = load_pretrain_gpt()
    except MegatronLMNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    announce_missing_packages()
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain

    lm.train_valid_test_datasets_provider.is_distributed = True
    modelopt_args = lm.add_modelopt_args if getattr(lm, "has_nvidia_modelopt", False) else None
    args_provider = chain_args_providers(extra_args_provider, driver_args_provider, modelopt_args)
    pretrain = prepare_pretrain(pretrain, args_provider)
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    pretrain(
        lm.train_valid_test_datasets_provider,
        model_provider_or(partial(lm.model_provider, lm.gpt_builder)),
        ModelType.encoder_or_decoder,
        lm.forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=args_provider,
        store=store,
        get_embedding_ranks=lm.get_embedding_ranks,
    )


if __name__ == "__main__":
    main()
