"""The depth state threaded through AttnRes sublayers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Optional, Protocol

from torch import Tensor


class BlockMixer(Protocol):
    """Mixes the sublayers of one depth block from statistics shared across the block."""

    def serves(self, num_blocks: int, sublayer: int) -> bool:
        """Whether this mixer belongs to the block after ``num_blocks`` sealed blocks and
        still has ``sublayer`` to mix."""

    def mix(self, sublayer: int, partial: Optional[Tensor]) -> Tensor:
        """AttnRes input of ``sublayer``: the mix of the sealed blocks and ``partial``."""


MixerFactory = Callable[[int, tuple[Tensor, ...]], BlockMixer]
"""Builds the mixer of the block that ``sublayer`` (first argument) opens or continues."""


@dataclass(frozen=True)
class DepthState:
    """Completed block representations ``(b0, b1, ..)`` and the current partial sum.

    Immutable: every update returns a new state, so re-running a layer (activation
    recompute) can never seal a block twice.
    """

    blocks: tuple[Tensor, ...]
    partial: Optional[Tensor] = None
    on_seal: Optional[Callable[[int, Tensor], Tensor]] = field(default=None, compare=False)
    """Called with (block id, block) when a block is sealed; returns the tensor to keep
    (pipeline caching taps sealed blocks here)."""
    mixer_factory: Optional[MixerFactory] = field(default=None, compare=False)
    """Set for the two-phase implementation: sublayers then mix through per-block mixers."""
    mixer: Optional[BlockMixer] = field(default=None, compare=False)
    """The current block's mixer (built lazily by ``mixer_factory``)."""

    @classmethod
    def from_embedding(cls, embedding: Tensor) -> DepthState:
        return cls(blocks=(embedding,))

    def sources(self) -> list[Tensor]:
        """Values the next aggregation mixes: completed blocks, then the partial sum."""
        return list(self.blocks) + ([self.partial] if self.partial is not None else [])

    def seal(self) -> DepthState:
        """Close the current block: the partial sum becomes a completed block."""
        if self.partial is None:
            return self
        block = self.partial if self.on_seal is None else self.on_seal(len(self.blocks), self.partial)
        return replace(self, blocks=self.blocks + (block,), partial=None, mixer=None)

    def add(self, output: Tensor) -> DepthState:
        """Add one sublayer output to the partial sum."""
        partial = output if self.partial is None else self.partial + output
        return replace(self, partial=partial)

    def mix(self, sublayer: int, depth_attention: Callable[..., Tensor]) -> tuple[DepthState, Tensor]:
        """Input of ``sublayer``: ``depth_attention`` over the sources; when a block mixer is
        configured (the state then remembers the block's mixer), ``depth_attention`` is called
        with ``mix=`` the mixer's result, so its hooks (diagnostics, NVTX) still see every call."""
        if self.mixer_factory is None:
            return self, depth_attention(self.sources())
        state = self
        if self.mixer is None or not self.mixer.serves(len(self.blocks), sublayer):
            state = replace(self, mixer=self.mixer_factory(sublayer, self.blocks))
        return state, depth_attention(
            self.sources(), mix=functools.partial(state.mixer.mix, sublayer, self.partial)
        )


def seals_before(sublayer: int, sublayers_per_block: int) -> bool:
    """Whether a block boundary falls before global sublayer ``sublayer`` (0-based)."""
    return sublayer > 0 and sublayer % sublayers_per_block == 0
