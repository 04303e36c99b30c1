"""Block mixers: how the sublayers of a run of layers mix their sources when not by one
independent call each (:func:`with_mixers` picks, from :mod:`attnres_megatron.ops.dispatch`).

* two-phase (``--attn-res-impl two-phase``, or ``auto`` where it wins): phase 1 once per block,
  then a merge per sublayer;
* shared block gradients (``auto`` with the C++ kernels on CPU or the Triton kernels on GPU, in
  training): one pass per sublayer, each completed block's gradient summed in place by the
  backward kernels of all the sublayers that read it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Optional

from torch import Tensor

from attnres_megatron.layers.depth_attention import DepthAttention
from attnres_megatron.layers.depth_state import DepthState, MixerFactory
from attnres_megatron.ops.dispatch import (
    algorithm_for,
    one_pass_function,
    shared_gradient_function,
    sums_gradients_in_place,
)
from attnres_megatron.ops.shared_gradients import SharedGradient
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


class SharedGradientMixer:
    """One-pass mixing of the sublayers after ``len(blocks)`` completed blocks, each block's
    gradient shared by all its readers (:class:`attnres_megatron.ops.shared_gradients.SharedGradient`)."""

    def __init__(self, blocks: tuple[Tensor, ...], shared: tuple, modules: Mapping[int, DepthAttention]):
        self.blocks, self.shared, self.modules = blocks, shared, modules

    def serves(self, num_blocks: int, sublayer: int) -> bool:
        return num_blocks == len(self.blocks) and sublayer in self.modules

    def mix(self, sublayer: int, partial: Optional[Tensor]) -> Tensor:
        module = self.modules[sublayer]
        sources, shared = self.blocks, self.shared
        if partial is not None:
            sources, shared = (*sources, partial), (*shared, None)
        aggregate = shared_gradient_function(sources[0].device.type, len(sources))
        if aggregate is None:  # more sources than the kernels take: a plain call, autograd adds its part
            return one_pass_function("auto")(sources, module.pseudo_query, module.key_gain, module.eps)
        return aggregate(sources, module.pseudo_query, module.key_gain, module.eps, shared)


class SharedGradients:
    """Mixer factory over ``modules`` with one :class:`SharedGradient` per completed block, made
    when the first sublayer reading the block asks for a mixer and kept for the later readers
    (and the output mix, :meth:`output_mix`)."""

    def __init__(self, modules: Mapping[int, DepthAttention]) -> None:
        self.modules = modules
        self.gradients: list[tuple[Tensor, Optional[SharedGradient]]] = []

    def __call__(self, sublayer: int, blocks: tuple[Tensor, ...]) -> SharedGradientMixer:
        return SharedGradientMixer(blocks, self.shared(blocks), self.modules)

    def shared(self, blocks: tuple[Tensor, ...]) -> tuple[Optional[SharedGradient], ...]:
        """The shared gradients of ``blocks`` (made for the blocks not seen before)."""
        for block in blocks[len(self.gradients) :]:
            self.gradients.append((block, SharedGradient(block) if block.requires_grad else None))
        if any(kept is not block for (kept, _), block in zip(self.gradients, blocks)):
            raise RuntimeError("shared block gradients: the blocks of a run changed under it.")
        return tuple(g for _, g in self.gradients[: len(blocks)])

    def output_mix(self, state: DepthState, module: DepthAttention) -> Callable[[], Tensor]:
        """The output layer's mix of ``state`` by ``module``, through the same shared gradients."""
        mixer = SharedGradientMixer(state.blocks, self.shared(state.blocks), {OUTPUT: module})
        return functools.partial(mixer.mix, OUTPUT, state.partial)


OUTPUT = -1
"""Key of the output layer's depth attention among a mixer's modules."""


def output_mix(state: DepthState, module: DepthAttention) -> Optional[Callable[[], Tensor]]:
    """The ``mix=`` of the output layer's depth attention: through the run's shared block
    gradients when it has them, else None (an independent call)."""
    if isinstance(state.mixer_factory, SharedGradients):
        return state.mixer_factory.output_mix(state, module)
    return None


def layer_depth_attention(layers) -> dict[int, DepthAttention]:
    """Global sublayer index -> depth attention of every sublayer in ``layers``."""
    modules = {}
    for layer in layers:
        modules[layer.first_sublayer] = layer.attn_res_attention
        modules[layer.first_sublayer + 1] = layer.attn_res_mlp
    return modules


def with_mixers(state: DepthState, layers, config) -> DepthState:
    """``state`` set up for ``config.attn_res_impl`` over ``layers`` (unchanged for plain one pass)."""
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
    modules = layer_depth_attention(layers)
    if algorithm == "two-phase":
        factory = two_phase_factory(modules, config.attn_res_sublayers_per_block)
    elif sums_gradients_in_place(config.attn_res_impl, algorithm, first.device.type, first.dtype):
        factory = SharedGradients(modules)
    else:
        return state
    return replace(state, mixer_factory=factory, mixer=None)
