"""Which depth sources cross each pipeline boundary: exact, static, the strict minimum.

Pure arithmetic (no torch, no Megatron): the model (through
:mod:`attnres_megatron.pipeline.megatron_split`, which reads Megatron's layer split),
``tools/bench_pipeline_comm.py``, ``tools/plan_pipeline_stages.py`` and the tests all use
this one module.

Chunks are the model pieces in global order: virtual stage ``v`` of pipeline rank ``r`` is
chunk ``v * P + r``. Chunk ``c`` runs global sublayers ``[start, end)``. Block ``k >= 1``
holds sublayers ``[(k - 1) S, k S)``; ``b0`` is the embedding output. Before sublayer ``j``
the completed blocks are ``b0 .. b_{(j - 1) // S}`` and the partial sum of the next block,
so a chunk that starts at ``j0 > 0`` reads blocks ``0 .. (j0 - 1) // S`` plus the partial
sum (at a block boundary the partial sum *is* block ``j0 / S``, complete).

Cross-stage caching, the strict rule: under interleaved schedules a rank runs several
chunks of one micro-batch, and it *knows* a tensor of that micro-batch once it has received
or produced it. By the end of chunk ``c`` its rank has every block completed by then,
``0 .. end // S``: the blocks it received, the blocks sealed inside its chunks, and the block
its chunk ended with when ``end`` falls on a block boundary (sent on as the partial sum, and
kept). A hop carries only the blocks its receiver's rank does not know, plus the partial sum.
Knowledge only grows along the chunk order (chunk ``c + 1``'s rank knows what chunk ``c``'s
rank knows), so a block read from a rank's own store is never sent on again.

Gradients of kept blocks (see :mod:`attnres_megatron.pipeline.cache`): the chunk of a rank
that first had a block *holds* it for the rank's later chunks, whose gradients it collects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Optional


def even_split(num_layers: int, num_chunks: int) -> list[int]:
    """Layers per chunk: ``num_layers // num_chunks`` each, the remainder to the LAST chunks.

    With 10 layers over 4 chunks this gives ``[2, 2, 3, 3]``; Megatron's default split is
    this when ``num_chunks`` divides ``num_layers``. Raises ``ValueError`` when a chunk would
    get no layer (AttnRes needs at least one layer per chunk).
    """
    if num_chunks < 1:
        raise ValueError(f"need at least one chunk; got {num_chunks}")
    if num_layers < num_chunks:
        raise ValueError(f"{num_layers} layers cannot give each of {num_chunks} chunks a layer")
    base, extra = divmod(num_layers, num_chunks)
    return [base + (1 if chunk >= num_chunks - extra else 0) for chunk in range(num_chunks)]


def chunk_ranges(layers_per_chunk: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Global sublayer ranges ``[start, end)`` of the chunks (two sublayers per layer)."""
    ranges, start = [], 0
    for count in layers_per_chunk:
        ranges.append((2 * start, 2 * (start + count)))
        start += count
    return tuple(ranges)


def completed_blocks_before(sublayer: int, sublayers_per_block: int) -> int:
    """Highest block id a sublayer at ``sublayer`` reads as completed (b0 is id 0); the block
    that ends exactly at ``sublayer`` is still its partial sum."""
    return 0 if sublayer <= 0 else (sublayer - 1) // sublayers_per_block


def blocks_complete_at(sublayer: int, sublayers_per_block: int) -> int:
    """Highest block id complete once sublayers ``[0, sublayer)`` ran (b0 is id 0)."""
    return max(sublayer, 0) // sublayers_per_block


def sources_at(sublayer: int, sublayers_per_block: int) -> int:
    """Sources sublayer ``j`` aggregates: b0, completed blocks, and the partial (if started)."""
    return sublayer // sublayers_per_block + 1 + (1 if sublayer % sublayers_per_block else 0)


def num_blocks(num_layers: int, sublayers_per_block: int) -> int:
    """Blocks of a model, b0 not counted (the last one may be partial)."""
    return math.ceil(2 * num_layers / sublayers_per_block)


@dataclass(frozen=True)
class Chunk:
    """One model chunk: its place in the pipeline and its global sublayer range."""

    pp_rank: int
    vp_stage: int
    index: int
    start: int
    end: int


@dataclass(frozen=True)
class PipelineLayout:
    """Sublayer ranges of every chunk and the block ids each boundary carries.

    ``cached`` chooses what the model sends: the strict minimum (True), or every block the
    receiver reads (False: the uncached reference, same gradient routes).
    """

    pipeline_size: int
    virtual_size: int
    sublayers_per_block: int
    chunk_ranges: tuple[tuple[int, int], ...]
    cached: bool = True

    def __post_init__(self) -> None:
        if len(self.chunk_ranges) != self.pipeline_size * self.virtual_size:
            raise ValueError(
                f"{len(self.chunk_ranges)} chunk ranges for {self.pipeline_size} x {self.virtual_size} chunks"
            )
        for index, (start, end) in enumerate(self.chunk_ranges):
            if end <= start:
                raise ValueError(
                    f"pipeline chunk {index} (stage {index % self.pipeline_size}, virtual stage "
                    f"{index // self.pipeline_size}) has no layers; attention residuals need at least one "
                    "layer per chunk: change the layer split or the pipeline sizes."
                )

    @classmethod
    def from_layer_counts(
        cls,
        pipeline_size: int,
        virtual_size: int,
        sublayers_per_block: int,
        layers_per_chunk: Sequence[int],
        cached: bool = True,
    ) -> PipelineLayout:
        """A layout from the layers of each chunk, in chunk order."""
        ranges = chunk_ranges(layers_per_chunk)
        return cls(pipeline_size, virtual_size, sublayers_per_block, ranges, cached)

    @classmethod
    def even(
        cls,
        num_layers: int,
        pipeline_size: int,
        virtual_size: int,
        sublayers_per_block: int,
        cached: bool = True,
    ) -> PipelineLayout:
        """The even split (:func:`even_split`) of ``num_layers`` over ``P * V`` chunks."""
        counts = even_split(num_layers, pipeline_size * virtual_size)
        return cls.from_layer_counts(pipeline_size, virtual_size, sublayers_per_block, counts, cached)

    @cached_property
    def chunks(self) -> tuple[Chunk, ...]:
        return tuple(
            Chunk(index % self.pipeline_size, index // self.pipeline_size, index, start, end)
            for index, (start, end) in enumerate(self.chunk_ranges)
        )

    def chunk(self, pp_rank: int, vp_stage: int) -> Chunk:
        return self.chunks[vp_stage * self.pipeline_size + pp_rank]

    def previous_on_rank(self, chunk: Chunk) -> Optional[Chunk]:
        """The same rank's chunk of the previous virtual stage (None at virtual stage 0)."""
        return self.chunks[chunk.index - self.pipeline_size] if chunk.vp_stage else None

    def next_on_rank(self, chunk: Chunk) -> Optional[Chunk]:
        """The same rank's chunk of the next virtual stage (None at the last one)."""
        if chunk.vp_stage + 1 == self.virtual_size:
            return None
        return self.chunks[chunk.index + self.pipeline_size]

    def blocks_needed(self, chunk: Chunk) -> range:
        """Block ids a chunk reads at its start (all completed blocks), in order."""
        if chunk.index == 0:
            return range(0)
        return range(completed_blocks_before(chunk.start, self.sublayers_per_block) + 1)

    def blocks_known(self, chunk: Chunk) -> range:
        """Block ids this chunk's rank has (received or produced) before the chunk starts."""
        previous = self.previous_on_rank(chunk)
        if previous is None:
            return range(0)
        return range(blocks_complete_at(previous.end, self.sublayers_per_block) + 1)

    def blocks_received(self, chunk: Chunk, cached: Optional[bool] = None) -> range:
        """Block ids the hop into ``chunk`` carries, besides the partial sum: the needed ones
        its rank does not know (both are ranges from b0, so the difference is a range too)."""
        cached = self.cached if cached is None else cached
        needed = len(self.blocks_needed(chunk))
        known = len(self.blocks_known(chunk)) if cached else 0
        return range(min(known, needed), needed)

    def sources_received(self, chunk: Chunk, cached: Optional[bool] = None) -> int:
        """Tensors the hop into ``chunk`` carries: new blocks plus the partial sum."""
        return 0 if chunk.index == 0 else len(self.blocks_received(chunk, cached)) + 1

    def hop_sources(self, cached: Optional[bool] = None) -> list[int]:
        """Tensors carried by the hop into each chunk ``1 .. C-1`` (one micro-batch, forward)."""
        return [self.sources_received(chunk, cached) for chunk in self.chunks[1:]]

    def blocks_held(self, chunk: Chunk) -> list[int]:
        """Block ids this chunk holds for its rank's later chunks: those its rank first has in
        this chunk (received, sealed, or ended with) and later chunks read."""
        following = self.next_on_rank(chunk)
        if following is None:
            return []
        known = set(self.blocks_known(chunk))
        return [block for block in self.blocks_known(following) if block not in known]

    def holder(self, chunk: Chunk, block: int) -> Chunk:
        """The chunk of ``chunk``'s rank that holds ``block`` for it."""
        previous = self.previous_on_rank(chunk)
        while previous is not None:
            if block in self.blocks_held(previous):
                return previous
            previous = self.previous_on_rank(previous)
        raise ValueError(f"no earlier chunk of rank {chunk.pp_rank} holds b{block} for chunk {chunk.index}")
