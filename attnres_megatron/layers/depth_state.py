"""The depth state threaded through AttnRes sublayers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


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
        return DepthState(blocks=self.blocks + (block,), on_seal=self.on_seal)

    def add(self, output: Tensor) -> DepthState:
        """Add one sublayer output to the partial sum."""
        partial = output if self.partial is None else self.partial + output
        return DepthState(blocks=self.blocks, partial=partial, on_seal=self.on_seal)


def seals_before(sublayer: int, sublayers_per_block: int) -> bool:
    """Whether a block boundary falls before global sublayer ``sublayer`` (0-based)."""
    return sublayer > 0 and sublayer % sublayers_per_block == 0
