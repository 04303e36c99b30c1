"""Two-phase block mixing (``--attn-res-impl two-phase``, or ``auto`` where it wins) for the
sublayers a block owns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Optional

from torch import Tensor

from attnres_megatron.layers.depth_attention import DepthAttention
from attnres_megatron.layers.depth_state import DepthState, MixerFactory
from attnres_megatron.ops.dispatch import algorithm_for
from attnres_megatron.ops.two_phase import TwoPhaseBlockAggregator


class TwoPhaseMixer:
    """Phase 1 once for the sublayers of one depth block, then phase 2 per sublayer."""

    def __init__(self, num_blocks: int, sublayers: list[int], aggregator: TwoPhaseBlockAggregator):
        self.num_blocks = num_blocks
        self.sublayers = sublayers
        self.aggregator = aggregator

    def serves(self, num_blocks: int, sublayer: int) -> bool:
        return num_blocks == self.num_blocks and sublayer in self.sublayers

    def mix(self, sublayer: int, partial: Optional[Tensor]) -> Tensor:
        return self.aggregator.mix(self.sublayers.index(sublayer), partial)


def two_phase_factory(modules: Mapping[int, DepthAttention], sublayers_per_block: int) -> MixerFactory:
    """Mixer factory over ``modules`` (global sublayer index -> its depth attention).

    A mixer serves the sublayers of the block that are in ``modules`` from the first one
    that asks onwards: a block split across pipeline stages or recompute groups gets one
    mixer per part, each exact.
    """

    def build(sublayer: int, blocks: tuple[Tensor, ...]) -> TwoPhaseMixer:
        block_end = (sublayer // sublayers_per_block + 1) * sublayers_per_block
        members = [j for j in range(sublayer, block_end) if j in modules]
        attention = [modules[j] for j in members]
        aggregator = TwoPhaseBlockAggregator(
            blocks,
            [m.pseudo_query for m in attention],
            [m.key_gain for m in attention],
            attention[0].eps,
        )
        return TwoPhaseMixer(len(blocks), members, aggregator)

    return build


def layer_depth_attention(layers) -> dict[int, DepthAttention]:
    """Global sublayer index -> depth attention of every sublayer in ``layers``."""
    modules = {}
    for layer in layers:
        modules[layer.first_sublayer] = layer.attn_res_attention
        modules[layer.first_sublayer + 1] = layer.attn_res_mlp
    return modules


def with_mixers(state: DepthState, layers, config) -> DepthState:
    """``state`` set up for ``config.attn_res_impl`` over ``layers`` (unchanged unless two-phase)."""
    sources = state.sources()
    if not sources:
        return state
    first = sources[0]
    algorithm = algorithm_for(
        config.attn_res_impl,
        config.attention_residuals,
        first.device.type,
        config.attn_res_recompute,
        first.numel() * first.element_size(),
    )
    if algorithm != "two-phase":
        return state
    factory = two_phase_factory(layer_depth_attention(layers), config.attn_res_sublayers_per_block)
    return replace(state, mixer_factory=factory, mixer=None)
