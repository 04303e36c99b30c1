"""Megatron-Core's forward-backward schedules, prepared for AttnRes stage payloads."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func as megatron_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from attnres_megatron.compat.pipeline_shapes import finish_pipeline_shapes, plan_pipeline_shapes
from attnres_megatron.pipeline.cache import get_source_cache


def _layout_and_config(model):
    first = model[0] if isinstance(model, list) else model
    decoder = get_attr_wrapped_model(first, "decoder")
    return getattr(decoder, "attn_res_layout", None), decoder.config


def get_forward_backward_func():
    """Megatron's schedule for the current parallel state, wrapped so that AttnRes
    payload shapes are planned before each call and the cross-stage cache is checked for
    lost gradients after it. Same signature and return value as Megatron's."""
    schedule = megatron_forward_backward_func()

    def forward_backward(
        *, model, num_microbatches, seq_length, micro_batch_size, forward_only=False, **kwargs
    ):
        layout, config = _layout_and_config(model)
        if layout is not None:
            rows = seq_length // config.context_parallel_size
            if config.sequence_parallel:
                rows //= config.tensor_model_parallel_size
            plan_pipeline_shapes(
                layout,
                parallel_state.get_pipeline_model_parallel_rank(),
                num_microbatches,
                rows,
                micro_batch_size,
                config.hidden_size,
                forward_only,
                config.microbatch_group_size_per_vp_stage or layout.pipeline_size,
            )
        result = schedule(
            model=model,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
            **kwargs,
        )
        if layout is not None:
            finish_pipeline_shapes()
            get_source_cache().finish_iteration()
        return result

    return forward_backward
