"""Megatron's own layer split as a :class:`~attnres_megatron.pipeline.layout.PipelineLayout`.

The one place the layout arithmetic meets Megatron-Core: uneven first/last stages and
``--pipeline-model-parallel-layout`` come from Megatron's functions and Megatron's parsed layout,
not from a copy.
"""

from __future__ import annotations

from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from attnres_megatron.pipeline.layout import PipelineLayout

CACHE_FIELD = "attn_res_pipeline_cache"
"""Optional config attribute: ``False`` sends every block the receiver reads (the uncached
reference; same gradient routes, so bitwise-identical results). Default: the cache."""


def chunk_sublayer_ranges(config) -> tuple[tuple[int, int], ...]:
    """Global sublayer range of each chunk Megatron builds, in chunk order (chunk ``v * P + r``)."""
    pipeline = config.pipeline_model_parallel_size
    virtual = config.virtual_pipeline_model_parallel_size or 1
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        # Megatron-Core 0.16's get_transformer_layer_offset / get_num_layers_to_build ignore
        # ``pp_rank`` under a layout (they read this process's rank), and the layout's own
        # methods ignore ``vp_stage`` before the virtual pipeline size is in parallel_state. So
        # read Megatron's parsed layout: ``layout.layout[pp_rank][vp_stage]`` holds the layer
        # types of chunk ``vp_stage * P + pp_rank``, and layer ids follow the chunk order.
        counts = [
            layout.layout[index % pipeline][index // pipeline].count(LayerType.decoder)
            for index in range(pipeline * virtual)
        ]
        ranges, start = [], 0
        for count in counts:
            ranges.append((2 * start, 2 * (start + count)))
            start += count
        return tuple(ranges)
    ranges = []
    for index in range(pipeline * virtual):
        vp_stage, pp_rank = divmod(index, pipeline)
        vp = vp_stage if virtual > 1 else None
        offset = get_transformer_layer_offset(config, vp, pp_rank)
        count = get_num_layers_to_build(config, vp_stage=vp, pp_rank=pp_rank)
        ranges.append((2 * offset, 2 * (offset + count)))
    return tuple(ranges)


def layout_from_config(config) -> PipelineLayout:
    """The layout of the model ``config`` describes (Megatron's own layer split)."""
    return PipelineLayout(
        config.pipeline_model_parallel_size,
        config.virtual_pipeline_model_parallel_size or 1,
        config.attn_res_sublayers_per_block,
        chunk_sublayer_ranges(config),
        cached=bool(getattr(config, CACHE_FIELD, True)),
    )
