"""Megatron-LM's training loop runs its pipeline schedules through the plugin's AttnRes wrapper.

AttnRes stage payloads have a per-boundary width, planned before each schedule call by
:func:`attnres_megatron.pipeline.schedule.get_forward_backward_func` (same signature as
Megatron-Core's). Megatron-LM's ``megatron/training/training.py`` looks that function up in
its own module namespace at every ``train`` / ``evaluate`` call, so it is rebound there, once.
"""

from __future__ import annotations


def use_attnres_schedule() -> bool:
    """Point Megatron-LM's training loop at the AttnRes schedule; False when Megatron-LM is absent."""
    try:
        from megatron.training import training
    except ImportError:
        return False
    from megatron.core import pipeline_parallel

    from attnres_megatron.compat.versions import check_megatron_core_version
    from attnres_megatron.pipeline import schedule

    current = getattr(training, "get_forward_backward_func", None)
    if current is schedule.get_forward_backward_func:
        return True
    if current is not pipeline_parallel.get_forward_backward_func:
        raise RuntimeError(
            "megatron.training.training.get_forward_backward_func is not Megatron-Core's "
            f"({current!r}); this Megatron-LM is not the core_r0.16 layout the AttnRes pipeline "
            "schedule is installed into."
        )
    check_megatron_core_version()
    training.get_forward_backward_func = schedule.get_forward_backward_func
    return True
