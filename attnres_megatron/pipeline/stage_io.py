"""One model chunk's side of the pipeline protocol: receive, unpack, cache, ledger, send.

The transformer block makes two calls per micro-batch, :meth:`StageIO.receive` at the
chunk's start (the depth sources to start from) and :meth:`StageIO.send` at its end (the
payload for the next chunk), plus :meth:`StageIO.accept` when Megatron hands it the
received payload (``set_input_tensor``). Everything else is decided here, once per chunk,
from the pure :class:`~attnres_megatron.pipeline.layout.PipelineLayout`:

* which blocks arrive in the payload and which the rank already has (the strict rule:
  a rank knows a tensor once it received or produced it);
* which blocks this chunk holds for the rank's later chunks
  (:meth:`~attnres_megatron.pipeline.cache.SourceCache.hold`, including the block the
  chunk ends with when its end is a block boundary), and which it reads from an earlier
  chunk's hold (:meth:`~attnres_megatron.pipeline.cache.SourceCache.read`);
* what the next chunk's payload carries, and the byte ledger (only when enabled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial as bind
from typing import Optional

from torch import Tensor

from attnres_megatron.pipeline.cache import SourceCache, get_source_cache
from attnres_megatron.pipeline.layout import Chunk, PipelineLayout
from attnres_megatron.pipeline.ledger import PipelineByteLedger, get_byte_ledger
from attnres_megatron.pipeline.payload import pack_sources, unpack_sources


@dataclass(frozen=True)
class StageInputs:
    """What a chunk starts from: completed blocks ``(b0, b1, ..)``, the partial sum (None at
    the first chunk), and the callback that keeps blocks sealed inside the chunk."""

    blocks: tuple[Tensor, ...]
    partial: Optional[Tensor]
    on_seal: Callable[[int, Tensor], Tensor]


class StageIO:
    """The pipeline boundary of one chunk (``layout.chunks[chunk.index]``) on this rank."""

    def __init__(
        self,
        layout: PipelineLayout,
        chunk: Chunk,
        cache: Optional[SourceCache] = None,
        ledger: Optional[PipelineByteLedger] = None,
    ) -> None:
        self.layout, self.chunk = layout, chunk
        self.cache = get_source_cache() if cache is None else cache
        self.ledger = get_byte_ledger() if ledger is None else ledger
        self.needed = tuple(layout.blocks_needed(chunk))
        self.known = frozenset(layout.blocks_known(chunk))
        self.arriving = tuple(layout.blocks_received(chunk))
        self.held = frozenset(layout.blocks_held(chunk))
        self.releases = layout.virtual_size > 1 and layout.next_on_rank(chunk) is None
        per_block = layout.sublayers_per_block
        self.ends_block = chunk.end // per_block if chunk.end % per_block == 0 else None
        receiver = layout.chunks[chunk.index + 1] if chunk.index + 1 < len(layout.chunks) else None
        self.outgoing = tuple(layout.blocks_received(receiver)) if receiver else ()
        self.receiver_known = frozenset(layout.blocks_known(receiver)) if receiver else frozenset()
        self.payload: Optional[Tensor] = None

    @property
    def sources_in(self) -> int:
        """Tensors in the payload this chunk receives (0 for the first chunk)."""
        return self.layout.sources_received(self.chunk)

    def accept(self, payload: Tensor) -> Tensor:
        """Keep the payload Megatron received; returns its partial sum, the tensor Megatron
        may look at (its length drives rotary embeddings: the sequence, not the payload)."""
        self.payload = payload
        return payload[-(payload.shape[0] // self.sources_in) :]

    def receive(self, micro_batch: int, embedding: Optional[Tensor] = None) -> StageInputs:
        """The depth sources this chunk starts from: ``b0`` from the embedding (first chunk),
        or the blocks and partial sum of the received payload and the blocks its rank holds."""
        on_seal = bind(self._hold, micro_batch)
        if self.chunk.index == 0:
            return StageInputs((self._hold(micro_batch, 0, embedding),), None, on_seal)
        payload, self.payload = self.payload, None
        if payload is None:
            raise RuntimeError(f"pipeline chunk {self.chunk.index} runs without a received payload")
        if self.ledger.enabled and payload.requires_grad:
            sender, ledger = self.chunk.index - 1, self.ledger
            payload.register_hook(lambda grad: ledger.record_backward(sender, micro_batch, grad))
        *received, partial = unpack_sources(payload, len(self.arriving) + 1)
        arrived = dict(zip(self.arriving, received))
        blocks = tuple(
            self.cache.read(micro_batch, block, arrived.get(block))
            if block in self.known
            else self._hold(micro_batch, block, arrived[block])
            for block in self.needed
        )
        if self.releases:
            self.cache.release(micro_batch)
        return StageInputs(blocks, partial, on_seal)

    def send(self, micro_batch: int, blocks: tuple[Tensor, ...], partial: Tensor) -> Tensor:
        """The payload for the next chunk: the blocks its rank lacks, then the partial sum.
        Blocks its rank has (only sent uncached) carry no gradient back: it reaches them
        through that rank's own hold, as with the cache."""
        if self.ends_block is not None:
            partial = self._hold(micro_batch, self.ends_block, partial)
        known = self.receiver_known
        sources = [blocks[block].detach() if block in known else blocks[block] for block in self.outgoing]
        payload = pack_sources(sources + [partial])
        if self.ledger.enabled:
            self.ledger.record_forward(self.chunk.index, micro_batch, payload, len(sources) + 1)
        return payload

    def _hold(self, micro_batch: int, block: int, tensor: Tensor) -> Tensor:
        if block not in self.held:
            return tensor
        return self.cache.hold(micro_batch, block, tensor, keep_value=self.layout.cached)
