"""What both Megatron-LM routes do before ``pretrain``: launcher, flags, device, adaptations.

The no-patch driver (``python -m attnres_megatron.megatron_lm.pretrain_gpt_attnres``) and the
patched ``pretrain_gpt.py`` call :func:`prepare_pretrain` with Megatron-LM's ``pretrain`` and
the chained argument provider, before Megatron-LM's own ``maybe_wrap_for_inprocess_restart``
(which parses the command line without the plugin's flags) and before any CUDA initialisation:

1. the launcher's variables (torchrun, mpirun, srun or one process) become the ``RANK`` /
   ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` Megatron-LM reads;
2. the whole command line is parsed once with Megatron-LM's parser plus the plugin's flags,
   so ``--help`` lists every flag and a bad AttnRes or device flag stops here, naming itself;
3. the registry's adaptations for the device are installed (the AttnRes pipeline schedule on
   every device; on ``--device cpu`` the CPU ones), and on CPU ``pretrain`` is returned
   wrapped to serve CUDA placements from the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attnres_megatron.compat.megatron_lm_loop import on_cpu
from attnres_megatron.compat.registry import install_adaptations
from attnres_megatron.megatron_lm.arguments import resolved_device
from attnres_megatron.training.launch_env import discover_launch_env, export_for_torch


def parse_command_line(args_provider: Callable[[Any], Any]) -> Any:
    """Megatron-LM's ``parse_args`` with the plugin's flags (``--help`` and errors exit here)."""
    from megatron.training.arguments import parse_args

    return parse_args(args_provider)


def prepare_pretrain(pretrain: Callable[..., Any], args_provider: Callable[[Any], Any]) -> Callable[..., Any]:
    """Launcher variables, a full parse of the flags and the device's adaptations; the ``pretrain``
    to call (wrapped on CPU)."""
    export_for_torch(discover_launch_env())
    device = resolved_device(parse_command_line(args_provider))
    install_adaptations(device, megatron_lm=True)
    if device == "cpu":
        from attnres_megatron.compat.cpu_malloc import retain_freed_memory

        retain_freed_memory()
        return on_cpu(pretrain)
    return pretrain
