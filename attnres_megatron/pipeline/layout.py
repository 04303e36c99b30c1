"""Which depth sources cross each pipeline boundary (exact, static, no padding).

Chunks are the model pieces in global order: virtual stage ``v`` of pipeline rank ``r`` is
chunk ``v * P + r``. Chunk ``c`` runs global sublayers ``[start, end)``. Before sublayer
``j`` the completed blocks are ``b0 .. b_{j // S}`` (block ids), so a chunk that starts at
``j0 > 0`` needs blocks ``0 .. (j0 - 1) // S`` plus the partial sum. With cross-stage
caching (interleaved schedules), a rank keeps the blocks it saw in its earlier chunks of
the same micro-batch, so a hop carries only the blocks the receiving rank lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset


@dataclass(frozen=True)
class Chunk:
    """One model chunk: its place in the pipeline and its global sublayer range."""

    pp_rank: int
    vp_stage: int
    index: int
    start: int
    end: int


def completed_blocks_before(sublayer: int, sublayers_per_block: int) -> int:
    """Highest block id completed before global sublayer ``sublayer`` (b0 is id 0)."""
    return 0 if sublayer <= 0 else (sublayer - 1) // sublayers_per_block


@dataclass(frozen=True)
class PipelineLayout:
    """Sublayer ranges of every chunk and the block ids each boundary must carry."""

    pipeline_size: int
    virtual_size: int
    sublayers_per_block: int
    chunk_ranges: tuple[tuple[int, int], ...]

    @classmethod
    def from_config(cls, config) -> PipelineLayout:
        """Read Megatron's own layer split (uneven first/last stages and layouts included)."""
        pipeline = config.pipeline_model_parallel_size
        virtual = config.virtual_pipeline_model_parallel_size or 1
        ranges = []
        for index in range(pipeline * virtual):
            vp_stage, pp_rank = divmod(index, pipeline)
            vp = vp_stage if virtual > 1 else None
            offset = get_transformer_layer_offset(config, vp, pp_rank)
            count = get_num_layers_to_build(config, vp_stage=vp, pp_rank=pp_rank)
            ranges.append((2 * offset, 2 * (offset + count)))
        for index, (start, end) in enumerate(ranges):
            if end <= start:
                raise ValueError(
                    f"pipeline chunk {index} (stage {index % pipeline}, virtual stage "
                    f"{index // pipeline}) has no layers; attention residuals need at least one "
                    "layer per chunk: change the layer split or the pipeline sizes."
                )
        return cls(pipeline, virtual, config.attn_res_sublayers_per_block, tuple(ranges))

    @cached_property
    def chunks(self) -> tuple[Chunk, ...]:
        return tuple(
            Chunk(index % self.pipeline_size, index // self.pipeline_size, index, start, end)
            for index, (start, end) in enumerate(self.chunk_ranges)
        )

    def chunk(self, pp_rank: int, vp_stage: int) -> Chunk:
        return self.chunks[vp_stage * self.pipeline_size + pp_rank]

    def blocks_needed(self, chunk: Chunk) -> list[int]:
        """Block ids a chunk reads at its start (all completed blocks), in order."""
        if chunk.index == 0:
            return []
        return list(range(completed_blocks_before(chunk.start, self.sublayers_per_block) + 1))

    def blocks_known(self, chunk: Chunk) -> list[int]:
        """Block ids this chunk's rank already holds from its earlier chunks (the cache)."""
        if chunk.vp_stage == 0:
            return []
        earlier = self.chunk(chunk.pp_rank, chunk.vp_stage - 1)
        return list(range(completed_blocks_before(earlier.end, self.sublayers_per_block) + 1))

    def blocks_received(self, chunk: Chunk, cached: bool = True) -> list[int]:
        """Block ids the hop into ``chunk`` carries, besides the partial sum."""
        known = set(self.blocks_known(chunk)) if cached else set()
        return [block for block in self.blocks_needed(chunk) if block not in known]

    def sources_received(self, chunk: Chunk, cached: bool = True) -> int:
        """Tensors the hop into ``chunk`` carries: new blocks plus the partial sum."""
        return 0 if chunk.index == 0 else len(self.blocks_received(chunk, cached)) + 1

    def keeps_for_later(self, chunk: Chunk) -> bool:
        """Whether a later chunk on the same rank will read this chunk's blocks."""
        return chunk.vp_stage + 1 < self.virtual_size
